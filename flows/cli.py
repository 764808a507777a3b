"""The `refit` command line.

    refit init --template NAME OUT.yaml --base PATH --legacy GLOB --new GLOB [--qa GLOB]
                                            write a complete, commented recipe for one's own data
    refit validate RECIPE                   check a recipe; every problem listed with its field and line
    refit run RECIPE [--force STAGE ...]    the refresh flow on Prefect: every stage, cached when unchanged
    refit stage STAGE RECIPE [--force]      one stage (curate ... publish) as a plain function
    refit plan RECIPE                       run the data stages as needed; print the mixture and capacity plans
    refit report WORKDIR                    the audit verdict, gates, accuracy and cost of a workdir
    refit sweep RECIPE --grid KEY=V1,V2     pilot-sweep recipe knobs at a fraction of the budget, with baselines
    refit sweep RECIPE --search tpe --trials N   the same as a Bayesian search (Optuna TPE, pruned, resumable)
    refit serve RECIPE [--cron EXPR]        serve the nightly refresh and per-stage rerun deployments
    refit demo                              build the demo base model if missing, then refresh it
    refit ui [--port N] [--stop]            start (or reuse) a Prefect server with its UI in the background

Exit codes: 0 success, 1 a stage failed, 2 the recipe (or the command line) is invalid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from refit.flows.environment import drift_warning
from refit.flows.pilot.variants import SweepError
from refit.flows.templates import TEMPLATES, render
from refit.stages.audit.stage import AuditFailed
from refit.stages.core.capacity import Plan, base_shape, plan_for
from refit.stages.core.config import (
    Recipe,
    RecipeError,
    load_recipe,
    missing_pretraining_facts,
    name_problem,
    parse_recipe,
    recipe_problem,
)
from refit.stages.core.disk import DiskFull, full_disk_cause, no_space
from refit.stages.core.input_files import InputFileError
from refit.stages.core.lock import WorkdirBusy, check_workdir_free, workdir_lock
from refit.stages.core.markers import StageNotReady, write_text_atomic
from refit.stages.core.remote_code import RemoteCodeRefused
from refit.stages.curate.stage import CurationError
from refit.stages.pipeline import NAMES, STAGES
from refit.stages.publish.stage import PublishRefused
from refit.stages.train.stage import TrainingError

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "deployments" / "demo.yaml"
DEMO_LEGACY_CORPUS = REPO / "datasets" / "legacy_python_docs.jsonl.gz"


def describe(recipe: Recipe) -> str:
    """A short human summary of what a valid recipe will run."""
    from refit.stages.core.schedule import schedule_for, tokens_per_step
    from refit.stages.mix.stage import phase_plan

    schedule = schedule_for(recipe)
    lines = [
        f"recipe {recipe.name}: continue {recipe.base_model.path}",
        f"  workdir   {recipe.workdir}",
        "  sources   "
        + ", ".join(f"{s.name} ({s.role}, {len(s.paths)} path{'s' * (len(s.paths) > 1)})" for s in recipe.sources),
        f"  schedule  {recipe.schedule.decay} from max_lr {recipe.peak_lr:.2e} to {schedule.min_lr:.2e}, "
        f"warmup {schedule.warmup_steps} steps, {schedule.total_steps} steps of {tokens_per_step(recipe)} tokens",
    ]
    for phase in phase_plan(recipe, schedule):
        weights = ", ".join(f"{name} {share:.0%}" for name, share in phase.weights.items())
        trigger = (
            "from step 0"
            if phase.lr_below is None
            else f"at LR <= {phase.lr_below} x max_lr, step {phase.start_step} ({phase.start_fraction:.1%})"
        )
        lines.append(f"  phase     {phase.name}: {weights}; {trigger}")
    lines.append("  evaluate  " + (", ".join(b.name for b in recipe.evaluate.benchmarks) or "validation loss only"))
    lines.append(f"  publish   {recipe.publish.registry}/{recipe.model_name}")
    return "\n".join(lines)


def cmd_init(args: argparse.Namespace) -> int:
    """Write a template's recipe for the user's paths once it validates like `refit validate`."""
    import re

    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists (--overwrite to replace it)", file=sys.stderr)
        return 2
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", args.out.stem)
    if args.name is None and (why := name_problem(name)):
        print(f"error: {args.out.name} makes no run name ({name!r}: {why}): give one with --name", file=sys.stderr)
        return 2
    paths = {key: os.path.abspath(getattr(args, key)) for key in ("base", "legacy", "new")}
    qa = os.path.abspath(args.qa) if args.qa else None
    text = render(args.template, name, **paths, qa=qa, max_lr=args.max_lr, total_tokens=args.tokens)
    # validated before it is written: an invalid result (a glob that matches nothing) exits 2,
    # listing why, and leaves OUT as it was
    recipe = parse_recipe(text, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    print(f"wrote {args.out} from the {args.template} template")
    print(describe(recipe))
    return 0


def capacity(recipe: Recipe) -> tuple[Plan | None, str]:
    """The recipe's capacity plan and its text; no plan, and why, when transformers cannot
    build the base model from its config."""
    from refit.flows.report import format_capacity

    try:
        plan = plan_for(recipe, base_shape(recipe))
    except (ValueError, OSError) as error:
        return None, f"capacity: not planned, {recipe.base_model.path}: {str(error).strip().splitlines()[0]}"
    return plan, format_capacity(plan)


def cmd_validate(args: argparse.Namespace) -> int:
    from refit.flows.report import capacity_problem, format_power

    recipe = load_recipe(args.recipe)
    plan, plan_text = capacity(recipe)
    if plan is not None and (problem := capacity_problem(plan)):
        raise recipe_problem(args.recipe, ("train",), problem)
    print(f"{args.recipe}: valid")
    print(describe(recipe))
    print(format_power(recipe))
    print(plan_text)
    if note := missing_pretraining_facts(recipe):
        print(f"note: {note}")
    return 0


def _workdir(args: argparse.Namespace, recipe: Recipe) -> Path:
    return Path(args.workdir) if args.workdir else Path(recipe.workdir)


def cmd_stage(args: argparse.Namespace) -> int:
    """One stage as a plain function (no Prefect server); the same base and lock as a flow run."""
    from refit.flows.continuation import continue_from, stage_options

    recipe = load_recipe(args.recipe)
    workdir = _workdir(args, recipe)
    with workdir_lock(workdir, f"refit stage {args.stage} {args.recipe}", wait=args.wait):
        recipe, why = continue_from(recipe, workdir)
        print(why)
        options = stage_options(args.stage, recipe, workdir, args.backend, args.force)
        report = STAGES[args.stage].run(recipe, workdir, options)
    figures = STAGES[args.stage].as_json(report)
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, (dict, list))}, indent=2))
    print(f"{args.stage}: done, outputs in {STAGES[args.stage].output(workdir)}")
    return 0


def run_plan(recipe: Recipe, workdir: Path) -> str:
    from refit.stages.mix.stage import format_plan

    manifest = None
    for stage in ("curate", "tokenize", "mix"):  # each is skipped when its output is up to date
        manifest = STAGES[stage].run(recipe, workdir)
    return format_plan(recipe.name, manifest)


def cmd_plan(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    from refit.flows.report import format_power

    with workdir_lock(_workdir(args, recipe), f"refit plan {args.recipe}", wait=args.wait):
        print(run_plan(recipe, _workdir(args, recipe)))
    print(format_power(recipe))
    print(capacity(recipe)[1])
    return 0


def run_refresh(recipe_path: Path, workdir: Path | None, force: list[str], wait: bool, backend: str) -> int:
    """The refresh flow, recorded into the `refit ui` server when it runs (else on a temporary
    one, unless PREFECT_API_URL names one), then its verdict and where to see it in the UI."""
    from refit.flows.artifacts import artifact_key
    from refit.flows.refresh import refresh
    from refit.flows.report import format_audit
    from refit.flows.temporary_server import start_temporary_server
    from refit.flows.ui import artifact_url, flow_run_url, recording_into

    recipe = load_recipe(recipe_path)  # invalid recipes exit 2 before any server starts
    workdir = Path(workdir or recipe.workdir).resolve()
    check_workdir_free(workdir, wait=wait)  # so is a busy workdir; the flow then takes the lock itself
    with recording_into() as ui:
        start_temporary_server()  # unless recording into a server that stays
        state = refresh(
            recipe=str(Path(recipe_path).resolve()),
            workdir=str(workdir),
            force=force,
            wait=wait,
            eval_backend=backend,
            return_state=True,
        )
        links = []
        if ui is not None:
            run_id = state.state_details.flow_run_id
            links.append(f"flow run: {flow_run_url(ui, run_id)}")
            audit_page = artifact_url(ui, artifact_key("audit", recipe.name), run_id)
            if audit_page:
                links.append(f"audit:    {audit_page}")
    try:
        result = state.result()  # a failed flow raises its error here
        print("\nstages: " + ", ".join(f"{stage} {name.lower()}" for stage, name in result["stages"].items()))
        print(format_audit(workdir)[1])
    except AuditFailed:  # the verdict, every gate with its reason, is the whole message
        print(format_audit(workdir)[1])
        return 1
    finally:  # the flow run's logs say why it failed
        print_links(links)
    return 0


def print_links(links: list[str]) -> None:
    if links:
        print("\n".join(["in the Prefect UI:", *(f"  {link}" for link in links)]))


def cmd_run(args: argparse.Namespace) -> int:
    return run_refresh(args.recipe, args.workdir, args.force, args.wait, args.backend)


def cmd_report(args: argparse.Namespace) -> int:
    from refit.flows.report import format_audit
    from refit.stages.audit.stage import has_report

    if not has_report(args.workdir):
        print(
            f"error: no audit in {args.workdir}: run `refit run RECIPE` (or `refit stage audit`) first", file=sys.stderr
        )
        return 1
    passed, text = format_audit(args.workdir)
    print(text)
    return 0 if passed else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from refit.flows.pilot.variants import check_grid
    from refit.flows.temporary_server import start_temporary_server
    from refit.flows.ui import flow_run_url, recording_into

    recipe = load_recipe(args.recipe)
    if args.search:  # a bad command line exits 2 before any server starts or stage runs
        if args.grid or not args.trials:
            raise SweepError("--search tpe takes --trials N (at least 1) and no --grid")
        from refit.flows.pilot.study import space

        space(recipe)
    else:
        if not args.grid or args.trials:
            raise SweepError("give --grid KEY=V1,V2,... (a grid) or --search tpe --trials N")
        check_grid(recipe, args.grid)
    check_workdir_free(Path(args.workdir or recipe.workdir))
    common = dict(
        recipe=str(args.recipe.resolve()),
        budget_fraction=args.budget_fraction,
        workdir=str(args.workdir) if args.workdir else None,
        return_state=True,
    )
    with recording_into() as ui:
        start_temporary_server()  # unless recording into a server that stays
        if args.search:
            from refit.flows.search import search

            state = search(trials=args.trials, **common)
        else:
            from refit.flows.sweep import sweep

            state = sweep(grid=args.grid, **common)
    summary = state.result()
    sweep_dir = Path(args.workdir or recipe.workdir) / "sweep"
    print((sweep_dir / "results.md").read_text())
    print(f"best recipe: {summary['best_recipe']}" if summary["winner"] else "no winner")
    print(f"results: {sweep_dir / 'results.md'}, {sweep_dir / 'results.json'}, {sweep_dir / 'accuracy_vs_compute.png'}")
    print_links([f"flow run: {flow_run_url(ui, state.state_details.flow_run_id)}"] if ui else [])
    return 0 if summary["winner"] else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect.client.schemas.schedules import CronSchedule

    from refit.flows.serve import serve_recipe
    from refit.flows.ui import UIError, recording_into

    try:
        CronSchedule(cron=args.cron, timezone=args.timezone)
    except ValueError as error:
        print(f"error: --cron {args.cron!r} --timezone {args.timezone!r}: {error}", file=sys.stderr)
        return 2
    try:
        with recording_into(start=True):  # scheduled runs need a server that stays, to be reviewed in its UI
            serve_recipe(args.recipe, args.cron, args.timezone)
    except UIError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from refit.flows.demo_base import build_demo_base

    recipe = load_recipe(DEMO_RECIPE, check_files=False)
    base = Path(recipe.base_model.path)
    if (base / "config.json").is_file() and not args.rebuild_base:
        print(f"demo base model: {base} (exists; --rebuild-base to retrain it)")
    else:
        print(f"demo base model: pretraining it at {base} on {DEMO_LEGACY_CORPUS.name} (about 2 minutes on 2 cores)")
        build_demo_base(DEMO_LEGACY_CORPUS, base)
    print(describe(load_recipe(DEMO_RECIPE)))  # now with the base model's pretraining record
    print("\nrunning the refresh flow (progress below)\n", flush=True)
    return run_refresh(DEMO_RECIPE, None, [], wait=False, backend="refit")


def cmd_ui(args: argparse.Namespace) -> int:
    from refit.flows.artifacts import artifact_key
    from refit.flows.ui import UIError, artifact_url, screenshot, start_server, stop_server

    if args.stop:
        print(stop_server())
        return 0
    try:
        url, started = start_server(args.port)
        if args.screenshot:
            page = artifact_url(url, artifact_key("audit", args.recipe_name))
            if page is None:
                raise UIError(f"no audit report of a recipe named {args.recipe_name!r} is recorded at {url}")
            screenshot(page, args.screenshot)
            print(f"saved {args.screenshot}: {page}")
    except UIError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{'started' if started else 'already running:'} the Prefect UI at {url}")
    print("refit run, demo and sweep record into it while it runs; `refit ui --stop` stops it")
    return 0


def _port(text: str) -> int:
    """A TCP port for `refit ui --port`."""
    if text.strip() == "0":  # the address runs record into must be known before the server starts
        raise argparse.ArgumentTypeError("0 (any free port) is not supported: name a port from 1 to 65535")
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refit", description="Refresh a pretrained LM by continued pretraining.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, recipe: bool = True, workdir: bool = False, wait: bool = False):
        sub = commands.add_parser(name, help=help, description=help)
        if recipe:
            sub.add_argument("recipe", type=Path)
        if workdir:
            sub.add_argument("--workdir", type=Path, help="default: the recipe's workdir")
        if wait:
            sub.add_argument("--wait", action="store_true", help="if another run holds the workdir, wait for it")
        sub.set_defaults(run=run)
        return sub

    backend = dict(
        choices=("refit", "lm-eval"),
        default="refit",
        help="benchmark scorer: Refit's own, or lm-evaluation-harness (pip install 'refit[lm-eval]')",
    )
    init = command("init", cmd_init, "write a complete, commented recipe from a template", recipe=False)
    init.add_argument("--template", required=True, choices=sorted(TEMPLATES), help="recipe template")
    init.add_argument("out", type=Path, metavar="OUT.yaml", help="the recipe file to write")
    init.add_argument("--base", required=True, help="the base checkpoint folder (Hugging Face format)")
    init.add_argument("--legacy", required=True, help="file or glob of the legacy data (like the base's pretraining)")
    init.add_argument("--new", required=True, help="file or glob of the new domain's data")
    init.add_argument("--qa", help="file or glob of QA data for the late phase (optional)")
    init.add_argument("--name", help="run name (default: OUT's file name)")
    init.add_argument(
        "--max-lr", type=float, help="initial LR (default: the base's pretraining minimum, from refit_pretraining.json)"
    )
    init.add_argument("--tokens", help="training tokens, e.g. 2B (default: the template's)")
    init.add_argument("--overwrite", action="store_true", help="replace OUT.yaml if it exists")
    command("validate", cmd_validate, "check a recipe and list every problem")
    run = command("run", cmd_run, "run the refresh flow: every stage, cached when unchanged", workdir=True, wait=True)
    run.add_argument(
        "--force",
        nargs="+",
        default=[],
        choices=NAMES,
        metavar="STAGE",
        help="rerun these stages even if cached, and every stage after them",
    )
    run.add_argument("--backend", **backend)
    stage = commands.add_parser("stage", help="run one stage as a plain function (no Prefect server)")
    stage.add_argument("stage", choices=NAMES)
    stage.add_argument("recipe", type=Path)
    stage.add_argument("--workdir", type=Path, help="default: the recipe's workdir")
    stage.add_argument("--wait", action="store_true", help="if another run holds the workdir, wait for it")
    stage.add_argument(
        "--force", action="store_true", help="rerun even if the output is up to date (curate: start over)"
    )
    stage.add_argument("--backend", **backend)
    stage.set_defaults(run=cmd_stage)
    command(
        "plan",
        cmd_plan,
        "print phases, steps, tokens and epochs per source, and the memory, time and cost of training, without it",
        workdir=True,
        wait=True,
    )
    report = command("report", cmd_report, "print a workdir's audit summary and where the full report is", recipe=False)
    report.add_argument("workdir", type=Path)
    sweep = command(
        "sweep", cmd_sweep, "pilot-sweep the recipe's knobs at a fraction of its budget, with baselines", workdir=True
    )
    sweep.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="a recipe field and its values, e.g. schedule.max_lr=3e-3,1e-3 or mixture.phases.1.lr_below=0.5,0.2",
    )
    sweep.add_argument(
        "--search",
        choices=("tpe",),
        help="instead of a grid, a Bayesian search (Optuna TPE, pruned) over the recipe's sweep.search space",
    )
    sweep.add_argument("--trials", type=int, help="with --search: trials to run (a rerun resumes the study)")
    sweep.add_argument(
        "--budget-fraction",
        type=float,
        help="share of schedule.total_tokens per variant (default: the recipe's sweep.budget_fraction)",
    )
    serve = command("serve", cmd_serve, "serve the nightly refresh and per-stage rerun deployments from this process")
    serve.add_argument("--cron", default="0 2 * * *", help="nightly schedule (default: 02:00)")
    serve.add_argument("--timezone", default="UTC", help="IANA timezone of the schedule, e.g. Europe/Berlin")
    demo = command(
        "demo",
        cmd_demo,
        "build the demo base model if missing and run the refresh flow on the demo recipe",
        recipe=False,
    )
    ui = command(
        "ui",
        cmd_ui,
        "start a Prefect server with its UI in the background (or reuse it); runs record into it",
        recipe=False,
    )
    ui.add_argument("--port", type=_port, default=4200, help="port of a server this starts (default 4200)")
    ui.add_argument("--stop", action="store_true", help="stop the server `refit ui` started")
    ui.add_argument("--screenshot", type=Path, help="save a PNG of the newest audit report's page (needs chromium)")
    ui.add_argument("--recipe-name", default="demo", help="whose audit report --screenshot shows (default: demo)")
    demo.add_argument("--rebuild-base", action="store_true", help="retrain the demo base model even if it exists")
    return parser


STAGE_FAILURES = (
    CurationError,
    InputFileError,
    DiskFull,
    StageNotReady,
    TrainingError,
    FloatingPointError,
    AuditFailed,
    PublishRefused,
    WorkdirBusy,
    RemoteCodeRefused,
)  # a stage's verdict, said in one message: exit code 1 and no traceback


class _VerdictWithoutTraceback(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for a stage's verdict the
    message says it all, so the record keeps its message and loses the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], STAGE_FAILURES):
            record.exc_info, record.exc_text = None, None
        return True


VERDICT_FILTER = _VerdictWithoutTraceback()


class _RunFormatter(logging.Formatter):
    """Names the Prefect task or flow run a record comes from (else the logger)."""

    def format(self, record: logging.LogRecord) -> str:
        record.source = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None) or record.name
        return super().format(record)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_RunFormatter("%(asctime)s %(source)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    # the embedded server's usage telemetry: off unless the user turns it on (it logs an error
    # on every start where the network is closed)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(VERDICT_FILTER)
    # a temporary server's first start creates its database: more than Prefect's 20 s on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # progress is logged as lines (stages/core/progress.py), also into the Prefect UI's run logs;
    # no tqdm bar per checkpoint saved or model loaded, here and in the processes started from here
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "refit")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # `refit stage` runs no flow
    if not args.verbose:
        from loguru import logger

        # datatrove logs every step's statistics at INFO from each worker (inherited by the
        # forked workers); its failures still raise. Refit logs its own progress.
        logger.disable("datatrove")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    if warning := drift_warning():
        print(warning, file=sys.stderr)
    try:
        return args.run(args)
    except (RecipeError, SweepError) as error:
        print(error, file=sys.stderr)
        return 2
    except STAGE_FAILURES as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a full disk outside any stage: the workdir lock, the flow's records
        if (cause := full_disk_cause(error)) is None:
            raise
        print(f"error: {no_space(cause, getattr(cause, 'filename', None))}: free space and rerun", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
