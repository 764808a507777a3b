"""Helpers shared by the stages: the recipe, markers, readers, the LR schedule, the sampler."""
