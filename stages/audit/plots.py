"""The audit's plots (PNG beside report.md): the training curves and bar charts of paired scores."""

from __future__ import annotations

from pathlib import Path

from refit.stages.mix.manifest import Manifest


def plot_training(out: Path, metrics: list[dict], manifest: Manifest) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, loss_axis = plt.subplots(figsize=(8, 4))
    loss_axis.plot(steps, [m["loss"] for m in metrics], color="tab:blue", label="training loss")
    if scored := [m for m in metrics if "val_loss" in m]:
        loss_axis.plot(
            [m["step"] for m in scored],
            [m["val_loss"] for m in scored],
            "o-",
            color="tab:green",
            label="validation loss (checkpoints)",
        )
        loss_axis.legend(loc="lower left", fontsize=8)
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss", color="tab:blue")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [m["lr"] for m in metrics], color="tab:orange", label="learning rate")
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    for phase in manifest.phases[1:]:
        loss_axis.axvline(phase.start_step, color="gray", linestyle="--")
        loss_axis.annotate(
            f"switch to {phase.name}\n(LR <= {phase.lr_below:g} max)",
            (phase.start_step, 1),
            xycoords=("data", "axes fraction"),
            va="top",
            ha="left",
            fontsize=8,
        )
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    return "training.png"


def plot_bars(
    out: Path,
    name: str,
    labels: list[str],
    base: list[float],
    candidate: list[float],
    errors: tuple[list, list] | None,
    ylabel: str,
    reference: float | None = None,
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(max(4, 1.6 * len(labels)), 3.6))
    x = range(len(labels))
    width = 0.38
    axis.bar(
        [i - width / 2 for i in x], base, width, yerr=errors[0] if errors else None, label="base", color="tab:gray"
    )
    axis.bar(
        [i + width / 2 for i in x],
        candidate,
        width,
        yerr=errors[1] if errors else None,
        label="candidate",
        color="tab:green",
    )
    if reference is not None:
        axis.axhline(reference, color="black", linewidth=0.8, linestyle=":")
    axis.set_xticks(list(x), labels, rotation=20, ha="right")  # long benchmark names must not overlap
    axis.set_ylabel(ylabel)
    axis.legend()
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
