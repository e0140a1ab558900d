"""Block problems as files: ``.npz`` with ``X`` (N×n float64), ``w`` (n), ``lam`` (scalar), ``k`` (int),
optionally ``g`` (n), ``label`` and ``pattern`` ((N, M) of an N:M pattern): the format of ``cbs solve`` and
``cbs export-blocks``."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from formulations.problem import BlockProblem

from .blocks import make_blocks
from .errors import DataNotFoundError, InvalidProblemError, first_line, invalid_option
from .records import atomic_write_bytes, write_json_atomic

__all__ = ["load_problem", "save_problem", "export_blocks"]


def _real_array(data, key: str, path: Path) -> np.ndarray:
    """Entry ``key`` of the archive as a real float64 array; strings, objects, booleans and complex numbers are
    an InvalidProblemError naming the entry (a complex X would otherwise lose its imaginary part silently)."""
    try:
        value = data[key]
    except ValueError as exc:  # an object array: allow_pickle=False refuses it, and must
        raise InvalidProblemError(f"The '{key}' entry of {path} must be an array of real numbers. Got an array of "
                                  f"Python objects ({first_line(exc)}).") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidProblemError(f"The '{key}' entry of {path} cannot be read: {first_line(exc)}") from None
    if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
        raise InvalidProblemError(f"The '{key}' entry of {path} must be an array of real numbers. Got dtype "
                                  f"{value.dtype} ({_KINDS.get(value.dtype.kind, 'not a real number')}).")
    return np.asarray(value, dtype=np.float64)


#: numpy dtype kinds that are not real numbers, for messages
_KINDS = {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex numbers", "b": "booleans",
          "V": "raw records", "M": "dates", "m": "time spans"}


def load_problem(path: str | Path) -> BlockProblem:
    """Read a problem file; a missing key or a bad value is an InvalidProblemError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"The problem file {path} does not exist.")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if not head:
        raise InvalidProblemError(f"The problem file {path} is empty; expected a .npz archive (np.savez) holding "
                                  "X, w, lam and k.")
    if not head.startswith(b"PK"):  # np.load would try to unpickle it and say 'pickled data': misleading
        raise InvalidProblemError(f"The problem file {path} is not a .npz archive (a zip file written by np.savez; "
                                  f"this one starts with {head!r}).")
    try:
        data = np.load(path, allow_pickle=False)
        files = data.files
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidProblemError(f"The problem file {path} is not a readable .npz archive: {first_line(exc)}") \
            from None
    missing = [key for key in ("X", "w", "lam", "k") if key not in files]
    if missing:
        raise InvalidProblemError(
            f"The problem file {path} must hold X, w, lam and k (g optional). Missing: {', '.join(missing)}."
        )
    k = data["k"]
    if k.shape != () or not np.issubdtype(k.dtype, np.integer):
        raise InvalidProblemError(f"The 'k' entry of {path} must be an integer scalar. Got {k!r}.")
    lam = _real_array(data, "lam", path)
    if lam.shape != ():
        raise InvalidProblemError(f"The 'lam' entry of {path} must be a scalar (the damping λ). Got an array of "
                                  f"shape {lam.shape}.")
    label = str(data["label"]) if "label" in files else path.stem
    pattern = None
    if "pattern" in files:
        pat = data["pattern"]
        if pat.shape != (2,) or not np.issubdtype(pat.dtype, np.integer):
            raise InvalidProblemError(f"The 'pattern' entry of {path} must be two integers (N, M). Got {pat!r}.")
        pattern = (int(pat[0]), int(pat[1]))
    return BlockProblem(
        weights=_real_array(data, "w", path), n_keep=int(k), damping=float(lam), factor=_real_array(data, "X", path),
        gradient=_real_array(data, "g", path) if "g" in files else None, label=label, pattern=pattern,
    )


def save_problem(path: str | Path, problem: BlockProblem) -> None:
    """Write a problem file atomically (the factor in float64)."""
    arrays = {
        "X": np.asarray(problem.factor_matrix(), dtype=np.float64), "w": problem.weights,
        "lam": np.float64(problem.damping), "k": np.int64(problem.n_keep), "label": np.str_(problem.label),
    }
    if problem.gradient is not None:
        arrays["g"] = problem.gradient
    if problem.pattern is not None:
        arrays["pattern"] = np.array(problem.pattern, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def export_blocks(
    model_name: str, out: str | Path, checkpoint: str | Path | None = None, data_dir: str | Path | None = None,
    params: list[str] | None = None, block_mode: str = "row", block_size: int | None = None, sparsity: float = 0.5,
    fisher_samples: int = 1000, damping: float = 1e-3, max_blocks: int | None = None, seed: int = 0,
    overwrite: bool = False, where: str = "export_blocks()",
) -> list[Path]:
    """Compute the Fisher rows of a zoo model and write its blocks as problem files plus an ``index.json``.

    ``out`` must be new or empty (or ``overwrite``); it is written as a whole at the end (a temporary folder
    beside it is renamed into place), so an interrupted export leaves it as it was."""
    from .outdir import check_out, locked
    from .records import staged_folder

    if not 0 <= sparsity < 1:
        raise invalid_option("sparsity", "export_blocks()", "in [0, 1)", sparsity)
    final = check_out(out, where, overwrite=overwrite)
    with locked(final, where), staged_folder(final) as stage:
        paths = _export(model_name, stage, checkpoint, data_dir, params, block_mode, block_size, sparsity,
                        fisher_samples, damping, max_blocks, seed)
    return [final / p.name for p in paths]


def _export(model_name, out, checkpoint, data_dir, params, block_mode, block_size, sparsity, fisher_samples,
            damping, max_blocks, seed) -> list[Path]:
    from .data import dataset_for_model
    from .fisher import per_sample_gradients
    from .models import load_model, prunable_parameters

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
