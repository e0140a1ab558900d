"""Block problems as files: ``.npz`` with ``X`` (N×n float64), ``w`` (n), ``lam`` (scalar), ``k`` (int),
optionally ``g`` (n) and ``label`` — the format of ``cbs solve`` and ``cbs export-blocks``."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from formulations.problem import BlockProblem

from .blocks import make_blocks
from .errors import DataNotFoundError, InvalidProblemError, invalid_option
from .records import atomic_write_bytes, write_json_atomic

__all__ = ["load_problem", "save_problem", "export_blocks"]


def load_problem(path: str | Path) -> BlockProblem:
    """Read a problem file; a missing key or a bad value is an InvalidProblemError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"The problem file {path} does not exist.")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InvalidProblemError(f"The problem file {path} is not a readable .npz archive: {exc}") from None
    missing = [key for key in ("X", "w", "lam", "k") if key not in data.files]
    if missing:
        raise InvalidProblemError(
            f"The problem file {path} must hold X, w, lam and k (g optional). Missing: {', '.join(missing)}."
        )
    k = data["k"]
    if k.shape != () or not np.issubdtype(k.dtype, np.integer):
        raise InvalidProblemError(f"The 'k' entry of {path} must be an integer scalar. Got {k!r}.")
    label = str(data["label"]) if "label" in data.files else path.stem
    return BlockProblem(
        weights=data["w"], n_keep=int(k), damping=float(data["lam"]), factor=np.asarray(data["X"], dtype=np.float64),
        gradient=data["g"] if "g" in data.files else None, label=label,
    )


def save_problem(path: str | Path, problem: BlockProblem) -> None:
    """Write a problem file atomically (the factor in float64)."""
    arrays = {
        "X": np.asarray(problem.factor_matrix(), dtype=np.float64), "w": problem.weights,
        "lam": np.float64(problem.damping), "k": np.int64(problem.n_keep), "label": np.str_(problem.label),
    }
    if problem.gradient is not None:
        arrays["g"] = problem.gradient
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def export_blocks(
    model_name: str, out: str | Path, checkpoint: str | Path | None = None, data_dir: str | Path | None = None,
    params: list[str] | None = None, block_mode: str = "row", block_size: int | None = None, sparsity: float = 0.5,
    fisher_samples: int = 1000, damping: float = 1e-3, max_blocks: int | None = None, seed: int = 0,
) -> list[Path]:
    """Compute the Fisher rows of a zoo model and write its blocks as problem files plus an ``index.json``."""
    from .data import dataset_for_model
    from .fisher import per_sample_gradients
    from .models import load_model, prunable_parameters

    if not 0 <= sparsity < 1:
        raise invalid_option("sparsity", "export_blocks()", "in [0, 1)", sparsity)
    model = load_model(model_name, checkpoint)
    names = [n for n, _ in prunable_parameters(model, params if params else "default")]
    x, y = dataset_for_model(model_name, data_dir, "train")
    if fisher_samples > x.shape[0]:
        raise invalid_option("fisher_samples", "export_blocks()", f"at most {x.shape[0]}", fisher_samples)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:fisher_samples]
    grads = per_sample_gradients(model, names, x[idx], y[idx])
    values = {n: p.detach() for n, p in model.named_parameters() if n in names}
    blocks = make_blocks(grads.names, grads.shapes, block_mode, block_size)[: max_blocks or None]
    out = Path(out)
    paths, index = [], []
    for b in blocks:
        X = b.gather_columns(grads.rows).double().numpy() / math.sqrt(grads.n_rows)
        w = b.gather_values(values).double().numpy()
        k = int(round((1 - sparsity) * b.n))
        problem = BlockProblem(w, k, damping, factor=X, label=b.label)
        safe = b.label.replace("[", "_").replace("]", "").replace("#", "_c").replace(".", "_")
        path = out / f"{safe}.npz"
        save_problem(path, problem)
        paths.append(path)
        index.append({"file": path.name, "label": b.label, "n": b.n, "k": k, "N": grads.n_rows, "lam": damping})
    write_json_atomic(out / "index.json", {"model": model_name, "seed": seed, "sparsity": sparsity, "blocks": index})
    return paths
