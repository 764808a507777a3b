"""mix: shard indexes + recipe -> `<workdir>/manifest.json`, the only thing training reads.

DuckDB aggregates the per-source shard indexes; the phase boundaries come in closed form
from the schedule: phase k starts at the first optimizer step whose LR is at or below
its `lr_below` x max_lr, so the plan and the trainer agree by construction.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from refit.stages.core.config import Recipe
from refit.stages.core.contract import Stage
from refit.stages.core.markers import (
    DamagedOutput,
    file_sha256,
    is_done,
    staged_output,
    write_marker,
)
from refit.stages.core.schedule import Schedule, schedule_for, tokens_per_step
from refit.stages.mix.manifest import (
    MANIFEST_VERSION,
    Manifest,
    PhasePlan,
    ScheduleSummary,
    SourcePlan,
    load_manifest,
    write_manifest,
)
from refit.stages.tokenize import stage as tokenize

FOLDER = "mix"
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def shard_table(workdir: Path) -> dict[str, dict]:
    """Per source: rows, tokens and shards (path relative to the workdir, rows, sha256)."""
    import duckdb

    indexes = [str(p) for p in tokenize.index_files(workdir)]
    if not indexes:
        return {}
    con = duckdb.connect()
    shards = con.execute(
        """SELECT source, s.file AS file, s.rows AS rows, s.tokens AS tokens, s.sha256 AS sha256
           FROM (SELECT source, unnest(shards) AS s FROM read_json_auto(?, union_by_name = true))
           ORDER BY source, file""",
        [indexes],
    ).fetchall()
    totals = con.execute(
        """SELECT source, max(seq_len)::INTEGER, max(dtype), max(tokenizer_sha256), max(eos_id)
           FROM read_json_auto(?, union_by_name = true) GROUP BY source""",
        [indexes],
    ).fetchall()
    table = {
        source: {
            "seq_len": seq_len,
            "dtype": dtype,
            "tokenizer_sha256": tok,
            "eos_id": int(eos),
            "rows": 0,
            "tokens": 0,
            "shards": [],
        }
        for source, seq_len, dtype, tok, eos in totals
    }
    for source, file, rows, tokens, sha in shards:
        entry = table[source]
        entry["rows"] += rows
        entry["tokens"] += tokens
        entry["shards"].append({"path": tokenize.shard_path(source, file), "rows": rows, "sha256": sha})
    return table


def phase_plan(recipe: Recipe, schedule: Schedule) -> list[PhasePlan]:
    """Start step, steps and tokens of each phase from the schedule."""
    starts = [0 if p.lr_below is None else schedule.first_step_at_or_below(p.lr_below) for p in recipe.phases]
    plan = []
    for i, phase in enumerate(recipe.phases):
        start = starts[i] if starts[i] is not None else schedule.total_steps
        later = [s for s in starts[i + 1 :] if s is not None]
        end = min(later) if later else schedule.total_steps
        steps = max(0, end - start)
        plan.append(
            PhasePlan(
                name=phase.name,
                lr_below=phase.lr_below,
                weights=phase.normalised(),
                start_step=start,
                steps=steps,
                start_fraction=start / schedule.total_steps,
                start_tokens=start * tokens_per_step(recipe),
                tokens=steps * tokens_per_step(recipe),
                start_lr=schedule.lr(start) if start < schedule.total_steps else None,
            )
        )
    return plan


def build_manifest(recipe: Recipe, workdir: Path) -> Manifest:
    schedule = schedule_for(recipe)
    table = shard_table(workdir)
    phases = phase_plan(recipe, schedule)
    warnings = []
    sources = {}
    for source in recipe.sources:
        entry = table.get(source.name, {"rows": 0, "tokens": 0, "shards": []})
        drawn = sum(p.steps * recipe.train.sequences_per_step * p.weights.get(source.name, 0.0) for p in phases)
        epochs = drawn / entry["rows"] if entry["rows"] else (float("inf") if drawn else 0.0)
        sources[source.name] = SourcePlan(
            role=source.role,
            rows=entry["rows"],
            tokens=entry["tokens"],
            shards=entry["shards"],
            drawn_sequences=round(drawn),
            drawn_tokens=round(drawn) * recipe.tokenize.seq_len,
            epochs=epochs,
        )
        if drawn and not entry["rows"]:
            warnings.append(f"source {source.name} has weight but no tokens: nothing can be drawn from it")
        elif epochs > recipe.mixture.max_epochs:
            warnings.append(
                f"source {source.name} is drawn {epochs:.1f} times (more than mixture.max_epochs "
                f"{recipe.mixture.max_epochs:g}): add data, lower its weight or the token budget"
            )
    warnings += [f"phase {phase.name} gets no steps" for phase in phases if phase.steps == 0]
    first = next(iter(table.values()), {})
    return Manifest(
        version=MANIFEST_VERSION,
        tokenizer_sha256=first.get("tokenizer_sha256"),
        dtype=first.get("dtype"),
        eos_id=first.get("eos_id"),
        seq_len=recipe.tokenize.seq_len,
        sequences_per_step=recipe.train.sequences_per_step,
        tokens_per_step=tokens_per_step(recipe),
        total_steps=schedule.total_steps,
        total_tokens=schedule.total_steps * tokens_per_step(recipe),
        seed=recipe.train.seed,
        schedule=ScheduleSummary.of(schedule),
        phases=phases,
        sources=sources,
        warnings=warnings,
    ).sealed()


def run_mix(recipe: Recipe, workdir: Path, force: bool = False) -> Manifest:
    """Write `<workdir>/mix/manifest.json` (done marker beside it); returns the manifest."""
    workdir = Path(workdir)
    final = workdir / FOLDER
    expected = STAGE.input_fingerprint(recipe, workdir)
    if not force and is_done(final, expected):
        return read_manifest(workdir)
    started = time.time()
    manifest = build_manifest(recipe, workdir)
    for warning in manifest.warnings:  # also in the audit report and the run's summary
        log.warning("mix: %s", warning)
    with staged_output(final) as out:
        write_manifest(out / MANIFEST, manifest)
        write_marker(out, "mix", expected, started, STAGE.code_version, {"manifest_sha256": manifest.sha256})
    return manifest


def manifest_path(workdir: Path) -> Path:
    """The manifest of the finished mix stage: the only file training reads."""
    return Path(workdir) / FOLDER / MANIFEST


def read_manifest(workdir: Path) -> Manifest:
    return load_manifest(manifest_path(workdir))


def damaged_shards(manifest: Manifest, workdir: Path) -> dict[Path, str]:
    """Every shard the manifest names that is gone or no longer has the sha256 tokenize wrote:
    path -> what is wrong (the audit's lineage, and training before it starts)."""
    damaged = {}
    for source in manifest.sources.values():
        for shard in source.shards:
            path = Path(workdir) / shard.path
            if not path.is_file():
                damaged[path] = "is missing"
            elif (actual := file_sha256(path)) != shard.sha256:
                damaged[path] = f"has sha256 {actual[:12]}..., {shard.sha256[:12]}... when written"
    return damaged


def verify_shards(workdir: Path) -> int:
    """Check that every shard the manifest names still has the sha256 tokenize wrote; a damaged
    one raises DamagedOutput naming it. Reading the shards once costs little beside training on
    them, and a bit flipped in a shard would otherwise train silently on other tokens. Returns
    the bytes read."""
    manifest = read_manifest(workdir)
    if damaged := damaged_shards(manifest, workdir):
        path, wrong = next(iter(damaged.items()))
        raise DamagedOutput(path.parent, "tokenize", {path.name: wrong})
    return sum((Path(workdir) / s.path).stat().st_size for src in manifest.sources.values() for s in src.shards)


def format_plan(name: str, manifest: Manifest) -> str:
    """The manifest of recipe `name` as tables: phases (steps, tokens, switch) and sources (share, epochs)."""
    total = manifest.total_steps
    lines = [
        f"{name}: {total} steps x {manifest.tokens_per_step:,} tokens = {manifest.total_tokens:,} tokens "
        f"({manifest.schedule.decay}, max_lr {manifest.schedule.max_lr:.2e})",
        "",
        f"{'phase':<12}{'trigger':<16}{'start step':>11}{'% of run':>10}{'steps':>8}{'tokens':>13}  weights",
    ]
    for p in manifest.phases:
        trigger = "step 0" if p.lr_below is None else f"LR <= {p.lr_below:g} max"
        weights = ", ".join(f"{k} {v:.0%}" for k, v in p.weights.items())
        lines.append(
            f"{p.name:<12}{trigger:<16}{p.start_step:>11}{p.start_fraction:>10.1%}{p.steps:>8}{p.tokens:>13,}"
            f"  {weights}"
        )
    lines += ["", f"{'source':<12}{'role':<8}{'available':>13}{'drawn':>13}{'share':>8}{'epochs':>8}"]
    drawn_total = sum(s.drawn_tokens for s in manifest.sources.values()) or 1
    for name, s in manifest.sources.items():
        lines.append(
            f"{name:<12}{s.role:<8}{s.tokens:>13,}{s.drawn_tokens:>13,}{s.drawn_tokens / drawn_total:>8.1%}"
            f"{s.epochs:>8.2f}"
        )
    switches = [p for p in manifest.phases if p.lr_below is not None]
    for p in switches:
        lines.append(f"\nswitch to {p.name} at step {p.start_step} of {total} ({p.start_fraction:.1%} of the run)")
    lines += [f"warning: {w}" for w in manifest.warnings]
    return "\n".join(lines)


STAGE = Stage(
    name="mix",
    reads=(tokenize.STAGE,),
    recipe_reads=(
        *("mixture", "schedule", "tokenize.seq_len", "train.seed", "train.sequences_per_step"),
        "sources.name",
    ),
    folder=FOLDER,
    report=Manifest,
    summarize=Manifest.summary,
    run_function=run_mix,
)
