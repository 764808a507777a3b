"""Recipe templates (`refit init`): a complete, commented recipe for the user's own paths.

Each knob is written with a one-line comment saying what it does and the value of "Reuse,
Don't Retrain" (Parmar et al., 2024), or that the value is Refit's own default where the
paper gives none. Templates differ in a few knobs only (TEMPLATES); the rest is the paper's
recipe. The output is validated by `refit init` itself before it is kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from refit.stages.core.config import PRETRAINING_RECORD


@dataclass(frozen=True)
class Template:
    summary: str
    total_tokens: str
    general: tuple[float, float]  # legacy, new shares of the general blend
    qa_share: float = 0.1
    lr_below: float = 0.2
    lr_below_range: tuple[float, float] = (0.05, 0.5)  # the TPE search's range of it
    decay: str = "cosine"
    max_legacy_loss_increase: float = 0.05
    budget_fraction: float = 0.25


TEMPLATES = {
    "paper": Template(
        "the recipe as published: cosine from the base's pretraining minimum LR to max_lr/100, no "
        "warmup, the QA blend from LR <= max_lr/5",
        total_tokens="1B",
        general=(0.6, 0.4),
    ),
    "wsd": Template(
        "warmup-stable-decay: max_lr held, then a linear decay over the last 20% of the run, with "
        "the switch to the QA blend at the start of the decay",
        total_tokens="1B",
        general=(0.6, 0.4),
        lr_below=0.99,
        lr_below_range=(0.05, 0.99),
        decay="wsd",
    ),
    "domain-adapt": Template(
        "domain adaptation: a higher share of new data, and the forgetting gate tightened to 2%",
        total_tokens="1B",
        general=(0.3, 0.7),
        max_legacy_loss_increase=0.02,
    ),
    "quick-pilot": Template(
        "a small budget for a first look: the paper's recipe on 20M tokens, swept at half of that",
        total_tokens="20M",
        general=(0.6, 0.4),
        budget_fraction=0.5,
    ),
}


def _quoted(value: str) -> str:
    """value as one line of YAML that reads back as exactly this string: double-quoted, with
    newlines and other specials escaped (unquoted, a newline would start a key of its own, and
    2024 or yes would read as a number or a boolean)."""
    return yaml.safe_dump(value, default_style='"', allow_unicode=True, width=math.inf).rstrip("\n")


def _flow(weights: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {round(share, 4):g}" for name, share in weights.items()) + "}"


def render(
    template: str,
    name: str,
    base: str,
    legacy: str,
    new: str,
    qa: str | None = None,
    max_lr: float | None = None,
    total_tokens: str | None = None,
) -> str:
    """The recipe text of `template` for these paths (globs); `max_lr` is required unless the
    base has a refit_pretraining.json with its pretraining minimum LR."""
    spec = TEMPLATES[template]
    legacy_share, new_share = spec.general
    general = {"legacy": legacy_share, "new": new_share}
    record = Path(base) / PRETRAINING_RECORD
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    lines = [
        f"# Refit recipe from the `{template}` template (`refit init`): {spec.summary}.",
        "# Edit freely; `refit validate` checks it. Every field is documented in stages/core/config.py.",
        f"name: {_quoted(name)}  # names the workdir (runs/<name>), the flow runs and the published model",
        f"description: {template} template  # free text for the model card",
        "",
        "base_model:",
        f"  path: {_quoted(base)}  # Hugging Face checkpoint (safetensors) to continue from",
    ]
    if recorded.get("pretraining_min_lr") is None:
        lines.append("  # pretraining_min_lr: 3.0e-4  # the base's final pretraining LR: the default max_lr (paper)")
    else:
        lines.append(f"  # pretraining LRs and tokens are read from {PRETRAINING_RECORD} in that folder")
    lines += [
        "",
        "sources:",
        "  - name: legacy",
        f"    paths: [{_quoted(legacy)}]  # files or globs of data like the base's pretraining",
        "    role: legacy                # forgetting is measured on it",
        "  - name: new",
        f"    paths: [{_quoted(new)}]  # files or globs of the new domain",
        "    role: new                   # the data to learn",
    ]
    if qa:
        lines += [
            "  - name: qa",
            f"    paths: [{_quoted(qa)}]  # QA-formatted data for the late phase",
            "    role: qa                    # only in the last phase",
        ]
    lines += [
        "",
        "curate:",
        "  validation_fraction: 0.02  # share of each source held out for validation loss (Refit default)",
        "  max_bad_fraction: 0.05     # a source with more bad records fails curation (Refit default)",
        "",
        "tokenize:",
        "  seq_len: 2048  # tokens per packed training sequence (Refit's choice; match your base's context)",
        "",
        "mixture:",
        "  phases:",
        "    - name: general",
        f"      weights: {_flow(general)}  # old and new data from step 0 (Refit's default 0.6/0.4)",
    ]
    if qa:
        qa_blend = {source: (1 - spec.qa_share) * share for source, share in general.items()}
        qa_blend["qa"] = spec.qa_share
        lines += [
            "    - name: qa",
            f"      lr_below: {spec.lr_below:g}  # the QA blend starts when LR <= lr_below x max_lr (paper: 0.2)",
            f"      weights: {_flow(qa_blend)}  # the general blend plus QA data (paper: about 10% QA)",
        ]
    lines += ["", "schedule:"]
    if max_lr is not None:
        lines.append(f"  max_lr: {max_lr:.3e}  # initial LR (paper: the base's pretraining minimum LR)")
    elif recorded.get("pretraining_min_lr") is None:
        lines.append("  max_lr: null  # REQUIRED: initial LR (paper: the base's pretraining minimum LR)")
    else:
        lines.append(
            f"  # max_lr: {recorded['pretraining_min_lr']:.3e}  # default: the base's pretraining minimum (paper)"
        )
    lines += [
        "  min_lr_ratio: 0.01  # the LR decays to min_lr_ratio x max_lr (paper: max_lr/100)",
        "  warmup_fraction: 0.0  # share of steps warming up from 0 (paper: no warmup)",
        f"  decay: {spec.decay}  # decay shape: cosine, linear, wsd or constant (paper: cosine)",
    ]
    if spec.decay == "wsd":
        lines.append("  wsd_decay_fraction: 0.2  # for wsd: final share of the run spent decaying (Refit default)")
    lines += [
        f"  total_tokens: {_quoted(total_tokens or spec.total_tokens)}  # training tokens of the whole run "
        "(paper: 300B for a 15B model pretrained on 8T)",
        "",
        "train:",
        "  micro_batch_size: 8  # sequences per forward/backward pass on one process (fit your memory)",
        "  sequences_per_step: 32  # global batch in sequences per optimizer step (Refit default)",
        "  precision: auto  # bf16 where supported, else fp32",
        "  checkpoint_every: 100  # optimizer steps between checkpoints; a killed run resumes from the last",
        "  seed: 0  # the run is a function of it",
        "",
        "evaluate:",
        "  benchmarks: []  # multiple-choice JSONL files: {name: ..., path: ..., domain: legacy|new}",
        "",
        "gates:",
        "  min_average_gain: 0.0  # average accuracy gain over the base must exceed this (Refit default)",
        "  max_benchmark_drop: 0.02  # no benchmark may fall by more than this (Refit default)",
        f"  max_legacy_loss_increase: {spec.max_legacy_loss_increase:g}  # relative legacy validation loss "
        "increase allowed: the forgetting gate (Refit default 0.05)",
        "  noise_sigmas: 2.0  # differences count only beyond this many standard errors",
        "",
        "sweep:",
        f"  budget_fraction: {spec.budget_fraction:g}  # share of total_tokens per pilot variant (`refit sweep`)",
        "  # must_pass: [forgetting]  # gates a variant must win with (default: every gate it can be judged on)",
        "  search:  # the space of `refit sweep --search tpe --trials N`",
        "    # max_lr: [1.0e-4, 1.0e-3]  # log-scale range of max_lr (default: max_lr/3 to 3 x max_lr)",
        "    min_lr_ratio: [0.003, 0.1]  # log-scale range of min_lr_ratio (paper: 0.01)",
    ]
    if qa:
        low, high = spec.lr_below_range
        lines += [
            f"    lr_below: [{low:g}, {high:g}]  # range of the switch threshold (paper: 0.2)",
            "    qa_share: [0.05, 0.3]  # range of the QA share of the last phase (paper: about 0.1)",
        ]
    else:
        lines += [
            "    lr_below: null  # no QA phase: no switch to search",
            "    qa_share: null  # no QA source: no share to search",
        ]
    return "\n".join(lines) + "\n"
