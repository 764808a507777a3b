"""Refit pipeline stages: pure functions, no Prefect imports."""
