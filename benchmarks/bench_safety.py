"""Benchmark what the safety and fairness probes add to the evaluate stage on the demo.

    python benchmarks/bench_safety.py [--workdir runs/demo] [--base runs/demo-base] [--rounds 1]

Runs the evaluate stage's work (`evaluate_models`: benchmarks, validation loss, and the probes
of `evaluate.safety`) on the demo recipe's finished run, base and candidate, with the probes
off and on, alternating (off, on, off, on, ...) since this machine's speed drifts. Each run
scores the base afresh (an empty score cache in a temporary folder), as the first demo run
does; nothing is written under the workdir. Prints each run's seconds, the seconds the
probes add and the ratio on / off (the issue's limit: the probes must not double evaluate),
and, from the runs with probes, where their time goes: scoring CrowS-Pairs and BBQ per model
(Refit's `Scorer.score` per task) and generating the continuations. Needs a finished demo
run (`refit demo`) in --workdir and its base model in --base.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from refit.stages import train  # noqa: E402
from refit.stages.core.config import SafetySpec, load_recipe  # noqa: E402
from refit.stages.evaluate import safety_probes as safety  # noqa: E402
from refit.stages.evaluate.scorer import Scorer  # noqa: E402
from refit.stages.evaluate.stage import evaluate_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class TaskTimes:
    """Seconds spent in Scorer.score per task key, and in safety.generate, while installed (`with`)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def _timed(self, owner, name: str, key):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key(*args, **kwargs)] += time.perf_counter() - start

        setattr(owner, name, timed)
        return original

    def __enter__(self):
        self.originals = [
            (Scorer, "score", self._timed(Scorer, "score", lambda scorer, task: task.key)),
            (safety, "generate", self._timed(safety, "generate", lambda *a, **k: "generation")),
        ]
        return self

    def __exit__(self, *exc):
        for owner, name, original in self.originals:
            setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo", help="a finished demo run")
    parser.add_argument("--base", type=Path, default=REPO / "runs" / "demo-base", help="its base model")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    recipe = load_recipe(REPO / "deployments" / "demo.yaml", check_files=False)
    recipe = recipe.model_copy(update={"base_model": recipe.base_model.model_copy(update={"path": str(args.base)})})
    candidate = train.final_model(args.workdir)
    variants = {"off": SafetySpec(probes=[], generation=False), "on": recipe.evaluate.safety}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    parts: list[dict[str, float]] = []
    report = None
    for _ in range(args.rounds):
        for name, spec in variants.items():
            with tempfile.TemporaryDirectory() as scratch:
                evaluate = recipe.evaluate.model_copy(update={"safety": spec, "cache_dir": scratch})
                with TaskTimes() as times:
                    start = time.perf_counter()
                    result = evaluate_models(
                        recipe.model_copy(update={"evaluate": evaluate}),
                        args.workdir,
                        candidate,
                        "refit",
                        Path(scratch),
                    )
                    seconds[name].append(time.perf_counter() - start)
            if name == "on":
                parts.append(dict(times.seconds))
                report = result["safety"]
    off, on = float(np.mean(seconds["off"])), float(np.mean(seconds["on"]))
    spec = recipe.evaluate.safety
    print(
        f"evaluate on the demo (base and candidate, base scored afresh), {torch.get_num_threads()} threads, "
        f"{args.rounds} round(s) alternating; probes: CrowS-Pairs {spec.crows_pairs_size} pairs, BBQ "
        f"{spec.bbq_size} items, {report['generation']['prompts']} prompts x 2 decodings x "
        f"{spec.max_new_tokens} tokens"
    )
    for name in variants:
        print(f"  probes {name:3s}: " + ", ".join(f"{s:.1f} s" for s in seconds[name]))
    print(f"the probes add {on - off:.1f} s: on / off = {on / off:.2f}x (limit: below 2x)")
    mean = {key: float(np.mean([p.get(key, 0.0) for p in parts])) for key in parts[0]}
    probe_keys = ["safety:crows_pairs", "safety:bbq", "generation"]
    others = sum(s for key, s in mean.items() if key not in probe_keys)
    print("where the time goes with probes on (both models, mean of the rounds):")
    for key in probe_keys:
        print(f"  {key:20s} {mean.get(key, 0.0):7.1f} s")
    print(f"  {'benchmarks+validation':20s} {others:7.1f} s")
    crows, bbq = report["crows_pairs"], report["bbq"]
    print(
        f"standard errors these sizes give: CrowS-Pairs percent stereotype +- "
        f"{100 * crows['percent_stereotype']['base_stderr']:.1f} points ({crows['pairs']} pairs; nominal "
        f"{100 * crows['nominal_stderr']:.1f}), BBQ ambiguous accuracy +- "
        f"{100 * bbq['accuracy_ambiguous']['base_stderr']:.1f} points ({bbq['ambiguous']} items), |s_AMB| +- "
        f"{100 * bbq['abs_s_amb']['base_stderr']:.1f} points; warnings: {report['warnings'] or 'none'}"
    )
    generation = report["generation"]
    print("share of repeated 4-grams (the degeneration gates read the sampled one), mean +- standard error:")
    for decoding, entry in generation["by_decoding"].items():
        rate = entry["repetition_rate"]
        print(
            f"  {decoding:8s} base {rate['base']:.3f} +- {rate['base_stderr']:.3f}, "
            f"candidate {rate['candidate']:.3f} +- {rate['candidate_stderr']:.3f}"
        )


if __name__ == "__main__":
    main()
