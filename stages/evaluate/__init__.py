"""evaluate: the stage (stage.py) and what only it uses: log-likelihood scoring of
multiple-choice benchmarks (scorer), the safety and fairness probes (safety_probes) and
the lm-evaluation-harness backend (lm_eval_backend)."""
