"""Getting survey tiles into galsift: file readers, survey adapters, the publisher and the ingest stage."""
