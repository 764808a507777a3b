"""publish: an audited checkpoint into the model registry, all or nothing (stage.py)."""
