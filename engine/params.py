"""Which parameters to prune: by glob on names, by module type, or every Conv/Linear weight.

``select_parameters(model, spec)`` returns the names (model order, each parameter once even when tied) and the
set of those stored transposed, (in_features, out_features), as GPT-2's ``Conv1D`` (their output rows are
columns; :func:`engine.blocks.make_blocks` needs to know).

spec : None or "default": the weight of every Linear, Conv1d/2d/3d and Conv1D module, except a weight tied to
    an embedding (a language model's output layer that shares the input embedding);
    "cbs" / "chita": the parameter sets those papers prune in the zoo models (an error for other models);
    otherwise comma-separated patterns, each a module type (a class name such as ``Linear`` or ``Conv2d``;
    ``Linear`` also matches ``Conv1D``: the weight of every such module) or a glob on parameter names
    (``fc*.weight``, ``layer3.*``). A pattern that matches nothing is an error.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from .errors import invalid_option

__all__ = ["select_parameters"]


def _linear_like(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    from .hub import linear_like_modules

    return linear_like_modules(model)


def select_parameters(model: nn.Module, spec: str | None = None) -> tuple[list[str], frozenset[str]]:
    """(names, transposed names) of the parameters ``spec`` selects (see the module docstring)."""
    name_of: dict[int, str] = {}
    for n, p in model.named_parameters():
        name_of.setdefault(id(p), n)  # a tied parameter keeps its first name
    modules = _linear_like(model)
    transposed = frozenset(name_of[id(m.weight)] for _, m, t in modules
                           if t and getattr(m, "weight", None) is not None and id(m.weight) in name_of)
    if spec is None or spec == "default":
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        names = [name_of[id(m.weight)] for _, m, _ in modules
                 if getattr(m, "weight", None) is not None and id(m.weight) in name_of and id(m.weight) not in embedded]
        if not names:
            raise invalid_option("params", "cbs prune", "patterns naming parameters of the model (it has no "
                                 "Linear or Conv weight to prune by default)", repr(spec))
        return list(dict.fromkeys(names)), transposed
    if not isinstance(spec, str):
        raise invalid_option("params", "select_parameters()", "None, a preset or comma-separated patterns", repr(spec))
    if spec in ("cbs", "chita"):
        from .models import prunable_parameters

        return [n for n, _ in prunable_parameters(model, spec)], transposed
    names: list[str] = []
    all_names = list(dict.fromkeys(name_of.values()))
    for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
        by_type = [name_of[id(m.weight)] for _, m, t in modules
                   if (type(m).__name__ == pattern or (pattern == "Linear" and t)) and id(m.weight) in name_of]
        by_type += [name_of[id(m.weight)] for m in model.modules()
                    if type(m).__name__ == pattern and isinstance(getattr(m, "weight", None), nn.Parameter)
                    and id(m.weight) in name_of]
        hits = by_type or [n for n in all_names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            example = ", ".join(all_names[:3])
            raise invalid_option("params", "cbs prune", f"patterns that match parameter names (e.g. {example}) or "
                                 "module types (Linear, Conv2d, ...)", repr(pattern))
        names += hits
    order = {n: i for i, n in enumerate(all_names)}
    return sorted(set(names), key=order.__getitem__), transposed
