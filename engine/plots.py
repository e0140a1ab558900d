"""Plots (matplotlib, headless), written atomically as PNG.

matplotlib is optional (the ``plots`` extra: ``pip install 'cbs-prune[plots]'``) and imported only when a
plot is drawn; without it :func:`accuracy_plot` raises :class:`~engine.errors.SolverUnavailableError`
(an ``ImportError``) naming the extra.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Iterable

from .errors import SolverUnavailableError
from .records import atomic_write_bytes

__all__ = ["accuracy_plot", "gap_distribution_plot", "plots_available"]


def plots_available() -> bool:
    """True when matplotlib (the ``plots`` extra) is importable."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    """matplotlib.pyplot on the headless Agg backend, or an error naming the extra to install."""
    try:
        import matplotlib  # noqa: PLC0415 - optional (the ``plots`` extra)
    except ImportError as exc:
        raise SolverUnavailableError(
            "matplotlib is not installed: pip install 'cbs-prune[plots]' (needed to draw plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def accuracy_plot(
    rows: Iterable[dict],
    path: str | Path,
    title: str,
    references: dict[str, dict[float, float]] | None = None,
    dense: float | None = None,
    suffix: str = "",
) -> None:
    """Test accuracy against sparsity, one line per ``row["label"]`` (rows carry ``sparsity``, ``accuracy``);
    ``references`` are black curves with their own line style and marker (e.g. published numbers), ``dense`` a grey horizontal line."""
    plt = _pyplot()
    rows = list(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    # tab10 repeats from the eleventh curve: a second marker keeps two curves of one colour apart
    for i, label in enumerate(labels):
        pts = sorted((r["sparsity"], r["accuracy"]) for r in rows if r["label"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os"[i // 10 % 2], color=f"C{i % 10}",
                label=f"{label}{suffix}")
    styles = [("--", "x"), (":", "s"), ("-.", "^"), ((0, (5, 1)), "v"), ((0, (1, 1)), "d")]
    for i, (name, curve) in enumerate((references or {}).items()):
        line, marker = styles[i % len(styles)]
        pts = sorted(curve.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=line, marker=marker, color="black",
                markerfacecolor="none", linewidth=1, label=name)
    if dense is not None:
        ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label=f"dense {dense:.2f} %")
    ax.set_xlabel("sparsity (fraction of weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def gap_distribution_plot(excess: dict[str, list[float]], path: str | Path, title: str, floor: float = 1e-4) -> None:
    """One box per method of its rows' excess (E − E*)/E* over the best known support (log scale; a row at
    the optimum is drawn at ``floor``, and the share of such rows is written under the method's name)."""
    plt = _pyplot()
    names = list(excess)
    fig, ax = plt.subplots(figsize=(1.1 * max(len(names), 4) + 1.5, 4.0))
    data = [[max(v, floor) for v in excess[m]] or [floor] for m in names]
    ax.boxplot(data, showfliers=True, whis=(5, 95))
    for i, vals in enumerate(data, start=1):
        ax.scatter([i] * len(vals), vals, s=6, alpha=0.35, color="black")
    ax.set_yscale("log")
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([f"{m}\n{100 * sum(v <= 1e-9 for v in excess[m]) / max(len(excess[m]), 1):.0f} % at E*"
                        for m in names], fontsize=8)
    ax.set_ylabel("(E − E*) / E*  (rows at E* drawn at %g)" % floor)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
