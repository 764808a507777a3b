"""What every stage uses and no stage owns: the recipe (config), the stage contract (contract),
done markers, fingerprints and atomic outputs (markers), the LR schedule and its phase rule
(schedule), Arrow shards (shards), datatrove executors (executors), benchmark scores
(scores), the workdir lock (lock), process lifelines (lifeline), progress lines (progress),
path checks (paths), text helpers (text), full-disk reports (disk), memoized file hashes
(file_hashes) and remote-code checks (remote_code). Nothing here imports a stage."""
