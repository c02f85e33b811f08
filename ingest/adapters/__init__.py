"""Survey adapters: fetch tiles from survey services and turn them into ``tile.v1`` records."""
