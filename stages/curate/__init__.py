"""curate: the stage (stage.py) and what only it uses: reading and validating records
(records), the datatrove steps that read, split and write them (steps), MinHash signatures
(minhash) and near-duplicate detection (near_dedup)."""
