"""mix: the shard indexes and the recipe into the manifest training reads (stage.py)."""
