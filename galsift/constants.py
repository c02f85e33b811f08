"""Facts shared by the schema, the models and the services.

Changing one of these needs an Alembic migration (the embedding column and the HEALPix index
are typed by them).
"""

#: dimension of every stored embedding (``vector(256)`` with an HNSW cosine index); each model
#: variant's pooled embedding is projected to this size and L2-normalised
EMBEDDING_DIM = 256
#: nested HEALPix order of the ``tiles.healpix`` column (order 10: nside 1024, ~3.4 arcmin pixels)
HEALPIX_ORDER = 10
