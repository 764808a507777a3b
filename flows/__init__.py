"""Prefect flows and the `refit` CLI wrapping the stages."""
