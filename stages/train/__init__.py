"""train: the stage (stage.py), which launches the training processes, and what only it
uses: the training loop they run (loop), the data order as a function of the step
(sampler) and the processes' heartbeats (heartbeat)."""
