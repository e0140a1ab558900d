"""Ghost parts of the ToST recipe: temporary skip branches and soft neurons, removable without trace.

"Training Your Sparse Neural Network Better with Any Mask" (Jaiswal et al., ICML 2022) helps a sparse
network early in training with two *ghost* devices that are gone by epoch T, so that the trained network
is exactly the original architecture:

* **Ghost skip connections** (:class:`GhostSkip`). For each ResNet ``BasicBlock`` two branches, each a
  1×1 conv + BN whose BN scale starts at 1e-4:

      a: block input x  ->  added to bn1(conv1(x))            (1×1 conv with the block's stride)
      b: middle activation m = act(bn1(conv1(x)))  ->  added to bn2(conv2(m))

  For an MLP (``fc1, fc2, ...``): for each pair of consecutive linear layers, the input h of ``fc_i``
  is added to the output of ``fc_{i+1}`` (skipping one hidden layer) through the identity when the widths
  match, else a dense projection ``Linear(in, out, bias=False)`` with weights N(0, 1e-4²).
  Every branch output is multiplied by a scale s(p) = 1 − p, p = step / (T · steps per epoch) ∈ [0, 1],
  so it decays linearly to exactly 0 at epoch T, when the branches are removed.

* **Ghost soft neurons** (:class:`SoftActivation`, :class:`SoftNeurons`). Every ``nn.ReLU`` module of the
  model is replaced by f_β(x) = φ(βx)/β with φ one of SiLU (default: f_β(x) = x·sigmoid(βx)), Mish
  (x·tanh(softplus(βx))), Softplus (softplus(βx)/β) or ELU (elu(βx)/β). Each tends to ReLU as β → ∞.
  β rises geometrically, β(p) = β₀ (β₁/β₀)^p (β₀ = 1, β₁ = 100 by default), and at p = 1 the original
  ``nn.ReLU`` modules are put back.

Both are installed *around* the existing models without editing them: skip branches are forward hooks
(the ghost parameters live in the controller, not in the model), soft neurons replace ReLU attributes and
restore the very same ReLU objects. After :meth:`remove` the model's module tree, state-dict keys and
parameter count are exactly the original ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import invalid_option
from .models import MLP, BasicBlock

__all__ = ["SOFT_ACTIVATIONS", "SoftActivation", "SoftNeurons", "GhostSkip", "anneal_progress"]

#: Smooth activations accepted for the ghost soft neurons.
SOFT_ACTIVATIONS: tuple[str, ...] = ("silu", "mish", "softplus", "elu")

#: Initial scale of a ghost branch's last factor (BN weight, or projection weight std).
GHOST_INIT = 1e-4


def anneal_progress(step: int, ghost_steps: int) -> float:
    """p = min(1, step / ghost_steps) ∈ [0, 1]: how far the ghost phase is (1 = over)."""
    if ghost_steps <= 0:
        return 1.0
    return min(1.0, step / ghost_steps)


class SoftActivation(nn.Module):
    """f_β(x) = φ(βx)/β, a smooth stand-in for ReLU that tends to it as β → ∞ (shape-preserving).

    Args:
        kind: "silu" (φ(u) = u·sigmoid(u), so f_β(x) = x·sigmoid(βx)), "mish" (u·tanh(softplus(u))),
            "softplus" (log(1 + eᵘ)) or "elu" (u for u > 0, eᵘ − 1 otherwise).
        beta: the sharpness β > 0 (a plain attribute, changed by :class:`SoftNeurons` each step).
    """

    def __init__(self, kind: str = "silu", beta: float = 1.0) -> None:
        super().__init__()
        if kind not in SOFT_ACTIVATIONS:
            raise invalid_option("soft_activation", "SoftActivation()", f"one of {', '.join(SOFT_ACTIVATIONS)}", repr(kind))
        self.kind = kind
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.beta * x
        if self.kind == "silu":
            y = F.silu(u)
        elif self.kind == "mish":
            y = F.mish(u)
        elif self.kind == "softplus":
            y = F.softplus(u)
        else:
            y = F.elu(u)
        return y / self.beta

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, beta={self.beta:.4g}"


class SoftNeurons:
    """Replace every ``nn.ReLU`` module of ``model`` by a :class:`SoftActivation`; anneal; put them back.

    β(p) = beta_start · (beta_end / beta_start)^p for annealing progress p ∈ [0, 1) (see
    :func:`anneal_progress`); :meth:`remove` restores the original ReLU objects (same module tree).
    """

    def __init__(self, model: nn.Module, kind: str = "silu", beta_start: float = 1.0, beta_end: float = 100.0) -> None:
        if not (math.isfinite(beta_start) and math.isfinite(beta_end) and 0 < beta_start <= beta_end):
            raise invalid_option("beta_end", "SoftNeurons()", f"a finite number >= beta_start ({beta_start}) > 0", beta_end)
        self.kind, self.beta_start, self.beta_end = kind, float(beta_start), float(beta_end)
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.ReLU:
                    soft = SoftActivation(kind, beta_start)
                    setattr(module, child_name, soft)
                    self._replaced.append((module, child_name, child))
        if not self._replaced:
            raise invalid_option("model", "SoftNeurons()", "a model with nn.ReLU modules", type(model).__name__)
        self.active = True

    def set_progress(self, p: float) -> float:
        """Set β for progress p ∈ [0, 1]; returns β."""
        beta = self.beta_start * (self.beta_end / self.beta_start) ** float(p)
        for parent, child_name, _ in self._replaced:
            getattr(parent, child_name).beta = beta
        return beta

    def remove(self) -> None:
        """Put the original ReLU modules back (idempotent)."""
        if not self.active:
            return
        for parent, child_name, relu in self._replaced:
            setattr(parent, child_name, relu)
        self.active = False


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x


class GhostSkip(nn.Module):
    """Ghost skip branches around a :class:`~engine.models.ResNet20`-style or :class:`~engine.models.MLP` model.

    The controller is an ``nn.Module`` holding only the ghost parameters (``branches``); the model is
    touched only through forward hooks. ``scale`` (a float, set by :meth:`set_progress`) multiplies every
    branch output. Train/eval mode of the branches follows the model's (set in the hooks).

    Raises:
        InvalidOptionError: the model has neither BasicBlocks nor is an MLP.
    """

    def __init__(self, model: nn.Module, init: float = GHOST_INIT) -> None:
        super().__init__()
        self.branches = nn.ModuleDict()
        self.scale = 1.0
        self._handles: list[Any] = []
        self._saved: dict[int, torch.Tensor] = {}
        blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, BasicBlock)]
        if blocks:
            for name, block in blocks:
                self._wrap_block(name.replace(".", "_"), block, init)
        elif isinstance(model, MLP):
            self._wrap_mlp(model, init)
        else:
            raise invalid_option("model", "GhostSkip()", "a model with BasicBlocks or an engine.models.MLP",
                                 type(model).__name__)
        self.active = True

    # -- construction
    @staticmethod
    def _conv_bn(cin: int, cout: int, stride: int, init: float) -> nn.Sequential:
        branch = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        nn.init.constant_(branch[1].weight, init)  # near-zero start: the branch begins as a no-op
        nn.init.zeros_(branch[1].bias)
        return branch

    def _wrap_block(self, key: str, block: BasicBlock, init: float) -> None:
        a = self._conv_bn(block.conv1.in_channels, block.conv1.out_channels, block.conv1.stride[0], init)
        b = self._conv_bn(block.conv2.in_channels, block.conv2.out_channels, 1, init)
        self.branches[f"{key}_in"], self.branches[f"{key}_mid"] = a, b
        slot_in, slot_mid = id(a), id(b)

        def save(slot: int):
            def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                self._saved[slot] = inputs[0]
            return hook

        def add(slot: int, branch: nn.Module):
            def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
                branch.train(module.training)
                return output + self.scale * branch(self._saved.pop(slot))
            return hook

        # conv1's input is the block input; conv2's input is the middle activation.
        self._handles += [
            block.conv1.register_forward_pre_hook(save(slot_in)),
            block.bn1.register_forward_hook(add(slot_in, a)),
            block.conv2.register_forward_pre_hook(save(slot_mid)),
            block.bn2.register_forward_hook(add(slot_mid, b)),
        ]

    def _wrap_mlp(self, model: MLP, init: float) -> None:
        layers = [getattr(model, f"fc{i + 1}") for i in range(model.n_layers)]
        if len(layers) < 2:
            raise invalid_option("model", "GhostSkip()", "an MLP with at least 2 linear layers", model.n_layers)
        for i in range(len(layers) - 1):
            src, dst = layers[i], layers[i + 1]
            if src.in_features == dst.out_features:
                branch: nn.Module = _Identity()
            else:
                branch = nn.Linear(src.in_features, dst.out_features, bias=False)
                nn.init.normal_(branch.weight, std=init)
            self.branches[f"fc{i + 1}_to_fc{i + 2}"] = branch
            slot = id(branch)

            def save(_module: nn.Module, inputs: tuple[torch.Tensor, ...], slot: int = slot) -> None:
                self._saved[slot] = inputs[0]

            def add(_module: nn.Module, _inputs: Any, output: torch.Tensor, slot: int = slot,
                    branch: nn.Module = branch) -> torch.Tensor:
                return output + self.scale * branch(self._saved.pop(slot))

            self._handles += [src.register_forward_pre_hook(save), dst.register_forward_hook(add)]

    # -- schedule
    def set_progress(self, p: float) -> float:
        """scale = 1 − p for progress p ∈ [0, 1]; returns the scale."""
        self.scale = max(0.0, 1.0 - float(p))
        return self.scale

    def remove(self) -> None:
        """Detach every hook (idempotent); the model is then exactly the original network."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._saved.clear()
        self.active = False

    def n_ghost_parameters(self) -> int:
        """Number of scalar ghost parameters (all removed with the branches)."""
        return sum(p.numel() for p in self.parameters())
