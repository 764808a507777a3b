"""The `refit` command line.

    refit validate RECIPE                 check a recipe; every problem listed with its field and line
    refit stage STAGE RECIPE [--force]    run one stage (curate ... publish) as a plain function
    refit plan RECIPE                     run the data stages as needed and print the mixture plan
    refit demo                            build the demo base model if missing, then run the demo recipe

Exit codes: 0 success, 1 a stage failed, 2 the recipe (or the command line) is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from stages.audit import AuditFailed
from stages.config import Recipe, RecipeError, load_recipe
from stages.curate import CurationError
from stages.markers import StageNotReady, stage_dir
from stages.publish import PublishRefused
from stages.train import TrainingError

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "deployments" / "demo.yaml"
DEMO_LEGACY_CORPUS = REPO / "datasets" / "legacy_python_docs.jsonl.gz"


def describe(recipe: Recipe) -> str:
    """A short human summary of what a valid recipe will run."""
    from stages.mix import phase_plan
    from stages.schedule import schedule_for, tokens_per_step

    schedule = schedule_for(recipe)
    lines = [
        f"recipe {recipe.name}: continue {recipe.base_model.path}",
        f"  workdir   {recipe.workdir}",
        f"  sources   " + ", ".join(f"{s.name} ({s.role}, {len(s.paths)} path{'s' * (len(s.paths) > 1)})" for s in recipe.sources),
        f"  schedule  {recipe.schedule.decay} from max_lr {recipe.peak_lr:.2e} to {schedule.min_lr:.2e}, "
        f"warmup {schedule.warmup_steps} steps, {schedule.total_steps} steps of {tokens_per_step(recipe)} tokens",
    ]
    for phase in phase_plan(recipe, schedule):
        weights = ", ".join(f"{name} {share:.0%}" for name, share in phase["weights"].items())
        trigger = ("from step 0" if phase["lr_below"] is None else
                   f"at LR <= {phase['lr_below']} x max_lr, step {phase['start_step']} ({phase['start_fraction']:.1%})")
        lines.append(f"  phase     {phase['name']}: {weights}; {trigger}")
    lines.append(f"  evaluate  " + (", ".join(b.name for b in recipe.evaluate.benchmarks) or "validation loss only"))
    lines.append(f"  publish   {recipe.publish.registry}/{recipe.model_name}")
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: valid")
    print(describe(recipe))
    return 0


STAGES = ("curate", "tokenize", "mix", "train", "evaluate", "audit", "publish")
DATA_STAGES = STAGES[:3]


def stage_functions() -> dict:
    """The stages that run so far, in pipeline order (imported lazily: heavy dependencies)."""
    from stages.audit import run_audit
    from stages.curate import run_curate
    from stages.evaluate import run_evaluate
    from stages.mix import run_mix
    from stages.publish import run_publish
    from stages.tokenize import run_tokenize
    from stages.train import run_train

    return dict(zip(STAGES, (run_curate, run_tokenize, run_mix, run_train, run_evaluate, run_audit, run_publish)))


def _workdir(args: argparse.Namespace, recipe: Recipe) -> Path:
    return Path(args.workdir) if args.workdir else Path(recipe.workdir)


def cmd_stage(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    report = stage_functions()[args.stage](recipe, _workdir(args, recipe), force=args.force)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))
    print(f"{args.stage}: done, outputs in {stage_dir(_workdir(args, recipe), args.stage)}")
    return 0


def run_plan(recipe: Recipe, workdir: Path) -> str:
    from stages.mix import format_plan

    manifest = None
    functions = stage_functions()
    for stage in DATA_STAGES:  # each is skipped when its output is up to date
        manifest = functions[stage](recipe, workdir)
    return format_plan(manifest)


def cmd_plan(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    print(run_plan(recipe, _workdir(args, recipe)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stages.demo_base import build_demo_base

    recipe = load_recipe(DEMO_RECIPE, check_files=False)
    base = Path(recipe.base_model.path)
    if (base / "config.json").is_file() and not args.rebuild_base:
        print(f"demo base model: {base} (exists; --rebuild-base to retrain it)")
    else:
        print(f"demo base model: pretraining it at {base} on {DEMO_LEGACY_CORPUS.name} (about 3 minutes on 2 cores)")
        build_demo_base(DEMO_LEGACY_CORPUS, base)
    recipe = load_recipe(DEMO_RECIPE)  # now with the base model's pretraining record and every file checked
    print(describe(recipe))
    print(run_plan(recipe, Path(recipe.workdir)))
    report = stage_functions()["train"](recipe, Path(recipe.workdir))
    switches = ", ".join(f"{s['phase']} at step {s['step']}" for s in report["switches"]) or "none"
    print(f"\ntrained {report['steps']} steps ({report['tokens']:,} tokens) in {report['seconds']:.0f} s: loss "
          f"{report['first_loss']:.3f} -> {report['final_loss']:.3f}; switches: {switches}; model in {report['final_model']}")
    print(format_evaluation(stage_functions()["evaluate"](recipe, Path(recipe.workdir))))
    audit = stage_functions()["audit"](recipe, Path(recipe.workdir))  # raises AuditFailed with every reason
    print(f"\naudit PASSED ({len(audit['gates'])} gates); read {stage_dir(Path(recipe.workdir), 'audit') / 'report.md'}")
    published = stage_functions()["publish"](recipe, Path(recipe.workdir))
    print(f"published {recipe.model_name} {published['version']} at {published['path']}"
          + (" (already there)" if published["already_published"] else ""))
    return 0


def _pm(value: float, error: float | None) -> str:
    """A fraction as 'points +- stderr points'."""
    return f"{value * 100:.1f}" + (f" +- {error * 100:.1f}" if error is not None else "")


def format_evaluation(report: dict) -> str:
    """Base against candidate: accuracy per benchmark (points) and validation loss per source."""
    lines = ["", f"{'benchmark':<16}{'domain':<8}{'items':>6}{'base acc':>16}{'candidate acc':>16}{'difference':>16}"]
    rows = [(name, b["domain"], b["items"], b["acc"]) for name, b in report["benchmarks"].items()]
    if report["average_acc"]:
        rows.append(("average", "", sum(b["items"] for b in report["benchmarks"].values()), report["average_acc"]))
    for name, domain, items, acc in rows:
        lines.append(f"{name:<16}{domain:<8}{items:>6}{_pm(acc['base'], acc['base_stderr']):>16}"
                     f"{_pm(acc['candidate'], acc['candidate_stderr']):>16}{_pm(acc['delta'], acc['delta_stderr']):>16}")
    lines += ["", f"{'validation':<16}{'role':<8}{'docs':>6}{'base loss':>16}{'candidate loss':>16}{'bits/byte':>16}"]
    for name, v in report["validation"].items():
        lines.append(f"{name:<16}{v['role']:<8}{v['docs']:>6}{v['base_loss_per_token']:>16.3f}{v['candidate_loss_per_token']:>16.3f}"
                     f"{v['base_bits_per_byte']:>8.3f} -> {v['candidate_bits_per_byte']:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refit", description="Refresh a pretrained LM by continued pretraining.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a recipe and list every problem")
    validate.add_argument("recipe", type=Path)
    validate.set_defaults(run=cmd_validate)
    stage = commands.add_parser("stage", help="run one stage of a recipe")
    stage.add_argument("stage", choices=STAGES)
    stage.add_argument("recipe", type=Path)
    stage.add_argument("--workdir", type=Path, help="default: the recipe's workdir")
    stage.add_argument("--force", action="store_true", help="rerun even if the output is up to date (curate: start over)")
    stage.set_defaults(run=cmd_stage)
    plan = commands.add_parser("plan", help="print phases, steps, tokens and epochs per source, without training")
    plan.add_argument("recipe", type=Path)
    plan.add_argument("--workdir", type=Path, help="default: the recipe's workdir")
    plan.set_defaults(run=cmd_plan)
    demo = commands.add_parser("demo", help="build the demo base model if missing and run the demo recipe")
    demo.add_argument("--rebuild-base", action="store_true", help="retrain the demo base model even if it exists")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.verbose:  # datatrove logs per-step statistics, in worker processes too: keep warnings only
        os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    try:
        return args.run(args)
    except RecipeError as error:
        print(error, file=sys.stderr)
        return 2
    except (CurationError, StageNotReady, TrainingError, FloatingPointError, AuditFailed, PublishRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
