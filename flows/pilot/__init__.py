"""What runs whole pipelines at a fraction of the budget before a full run: the pilot
sweep's variants and their judging (variants) and the Bayesian search's study (study)."""
