"""tokenize: curated documents into packed Arrow shards (stage.py)."""
