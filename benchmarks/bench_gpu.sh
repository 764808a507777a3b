#!/bin/sh
# One H200, about 8 minutes: train stage vs bare loop (tokens/s, MFU), Refit scorer vs lm-eval (items/s).
cd "$(dirname "$0")/.." && HF_HUB_OFFLINE=1 exec .venv/bin/python benchmarks/bench_gpu.py "$@"
