"""The networks of the CBS / WoodFisher / CHITA experiments and loaders of their published checkpoints.

* :class:`MLPNet`: 784-40-20-10 ReLU MLP without biases (MNIST), 32,360 weights.
* :class:`ResNet20`: Distiller's ``resnet20_cifar`` (CIFAR-10), module names chosen so that the
  published WoodFisher checkpoint loads with ``strict=True`` once the ``module.`` prefix is removed.
* :func:`small_mlp`: a small bias-free MLP for the embedded 8x8 digits demo.

Every model returns logits of shape (batch, classes), dtype float32 (no log_softmax), so the loss
is ``torch.nn.functional.cross_entropy(logits, labels)``.

:func:`prunable_parameters` names the weights a pruner may touch: all conv/linear weights, or the
sets used in the literature for ResNet20 (CBS: the 18 block convs; CHITA: those plus the stem conv
and the classifier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .checkpoints import PathLike, _load_into, load_checkpoint, load_state_dict_file
from .errors import invalid_option

__all__ = [
    "MLP",
    "MLPNet",
    "BasicBlock",
    "ResNet20",
    "MODEL_NAMES",
    "PRUNABLE_PRESETS",
    "DEFAULT_CHECKPOINTS",
    "small_mlp",
    "build_model",
    "load_model",
    "load_mlpnet",
    "load_resnet20",
    "load_state_dict_file",
    "load_checkpoint",
    "prunable_parameters",
    "forward_chain",
]

#: Names accepted by :func:`build_model` and :func:`load_model`.
MODEL_NAMES: tuple[str, ...] = ("mlpnet", "resnet20")

#: Presets accepted by :func:`prunable_parameters` (besides an explicit list of parameter names).
PRUNABLE_PRESETS: tuple[str, ...] = ("default", "cbs", "chita")

#: Checkpoint of each model, relative to the shared data directory (see ``engine.data.default_data_dir``).
DEFAULT_CHECKPOINTS: dict[str, str] = {
    "mlpnet": "weights/woodfisher_mlpnet_mnist_25_epoch_93.97.ckpt",
    "resnet20": "weights/woodfisher_resnet20_cifar10.pth.tar",
}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _linear_part(fc: nn.Linear, relu: nn.Module | None, flatten: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def part(x: torch.Tensor) -> torch.Tensor:
        x = fc(torch.flatten(x, 1) if flatten else x)
        return relu(x) if relu is not None else x
    return part


def forward_chain(model: nn.Module) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], frozenset[int]]] | None:
    """``model.forward`` as a chain of parts, or None when the model does not declare one.

    A model declares its chain with a method ``forward_parts()`` returning ``[(f_1, modules_1), …]`` such
    that ``model(x) == f_m(… f_2(f_1(x)))`` and part i reads only the parameters of ``modules_i``. Returned
    here with each part's parameter ids, so a caller that changes only the parameters of parts ≥ i can
    keep the activations entering part i and run the suffix alone (the per-block losses of ``cbs``)."""
    parts = getattr(model, "forward_parts", None)
    if parts is None:
        return None
    return [(fn, frozenset(id(p) for m in modules for p in m.parameters())) for fn, modules in parts()]


class MLP(nn.Module):
    """Bias-free ReLU multi-layer perceptron: flatten -> fc1 -> ReLU -> fc2 -> ... -> fcL.

    No biases, so every parameter is a prunable weight matrix. Linear layers are named ``fc1``,
    ``fc2``, ... (the WoodFisher naming); ReLUs are ``relu1``, ``relu2``, ... (no parameters).

    Args:
        in_features: input size after flattening (784 for MNIST, 64 for 8x8 digits).
        hidden: widths of the hidden layers.
        classes: number of output logits.

    Input: float32 tensor (batch, *) whose trailing dimensions multiply to ``in_features``.
    Output: float32 logits (batch, classes).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], classes: int) -> None:
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden), int(classes)]
        if any(w <= 0 for w in widths):
            raise invalid_option("hidden", "MLP()", "a sequence of positive layer widths", tuple(hidden))
        self.in_features = widths[0]
        self.classes = widths[-1]
        self.n_layers = len(widths) - 1
        for i in range(self.n_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1], bias=False))
            if i < self.n_layers - 1:
                self.add_module(f"relu{i + 1}", nn.ReLU())

    def forward_parts(self) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], tuple[nn.Module, ...]]]:
        """The forward pass as a chain of parts, ``forward(x) == f_m(… f_1(x))``, each part with the
        modules whose parameters it reads (see :func:`forward_chain`): one part per layer (flatten, fc1,
        ReLU), (fc2, ReLU), …, (fcL)."""
        parts = []
        for i in range(self.n_layers):
            fc = getattr(self, f"fc{i + 1}")
            relu = getattr(self, f"relu{i + 1}", None) if i < self.n_layers - 1 else None
            parts.append((_linear_part(fc, relu, flatten=i == 0), (fc,)))
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for i in range(self.n_layers):
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.n_layers - 1:
                x = getattr(self, f"relu{i + 1}")(x)
        return x


class MLPNet(MLP):
    """The WoodFisher/CBS/CHITA MNIST network: Linear(784,40) -> ReLU -> Linear(40,20) -> ReLU -> Linear(20,10).

    All layers bias-free, 784*40 + 40*20 + 20*10 = 32,360 weights. Input (batch, 1, 28, 28) or
    (batch, 784) float32, normalised as (x/255 - 0.1307)/0.3081; output logits (batch, 10). The
    original ends in log_softmax; returning logits gives the same argmax and the same
    cross-entropy loss.
    """

    def __init__(self) -> None:
        super().__init__(784, (40, 20), 10)


def small_mlp(in_features: int = 64, hidden: Sequence[int] = (32, 16), classes: int = 10) -> MLP:
    """A small bias-free ReLU MLP (default 64-32-16-10, 2,720 weights) for the embedded digits demo.

    Input (batch, in_features) float32, output logits (batch, classes). Parameters are initialised
    from torch's global generator; seed it (or use :func:`torch.random.fork_rng`) for reproducibility.
    """
    return MLP(in_features, hidden, classes)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (the BN that follows has the shift)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Distiller's CIFAR BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    ``downsample`` (when given) is the option-B shortcut ``Sequential(conv1x1 stride s, BN)``;
    otherwise the shortcut is the identity. Input (batch, in_planes, H, W) float32, output
    (batch, planes, H/stride, W/stride).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        # Separate, non-inplace ReLUs (as in Distiller): inplace ops break torch.func per-sample
        # gradients and hooks on activations.
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + residual)


class ResNet20(nn.Module):
    """Distiller ``resnet20_cifar``: the ResNet20 of the WoodFisher and CHITA CIFAR-10 experiments.

    conv1 (3->16, 3x3) -> bn1 -> ReLU -> layer1 (3 blocks, 16 ch) -> layer2 (3 blocks, 32 ch, stride 2)
    -> layer3 (3 blocks, 64 ch, stride 2) -> global average pool -> fc (64 -> classes, with bias).
    The first block of layer2/layer3 has ``downsample = Sequential(conv1x1 stride 2 no bias, BN)``.
    State-dict keys match the published checkpoint exactly (after removing ``module.``).

    Input (batch, 3, 32, 32) float32 normalised as (x/255 - 0.5)/0.5 per channel (the checkpoint was
    trained that way; the usual CIFAR mean/std gives ~53 %). Output logits (batch, classes).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, blocks=3, stride=1)
        self.layer2 = self._make_layer(32, blocks=3, stride=2)
        self.layer3 = self._make_layer(64, blocks=3, stride=2)
        # Adaptive pooling equals Distiller's AvgPool2d(8) on 32x32 inputs and also accepts other sizes.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * BasicBlock.expansion, classes)
        # Distiller's initialisation (only matters for untrained models).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_parts(self) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], tuple[nn.Module, ...]]]:
        """The forward pass as a chain of parts, ``forward(x) == f_m(… f_1(x))``, each part with the
        modules whose parameters it reads (see :func:`forward_chain`): the stem (conv1, bn1, ReLU), the
        nine BasicBlocks, the head (pooling, fc)."""
        def stem(x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn1(self.conv1(x)))

        def head(x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.avgpool(x), 1))

        blocks = [(block, (block,)) for layer in (self.layer1, self.layer2, self.layer3) for block in layer]
        return [(stem, (self.conv1, self.bn1)), *blocks, (head, (self.fc,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


_BUILDERS: dict[str, type[nn.Module]] = {"mlpnet": MLPNet, "resnet20": ResNet20}


def _check_model_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in _BUILDERS:
        raise invalid_option("name", where, f"one of {', '.join(map(repr, MODEL_NAMES))}", repr(name))
    return name.lower()


def build_model(name: str, *, seed: int | None = None) -> nn.Module:
    """A freshly initialised model by name ("mlpnet" or "resnet20"), in eval mode, float32, on CPU.

    ``seed`` makes the initialisation reproducible without touching torch's global generator.
    """
    key = _check_model_name(name, "build_model()")
    if seed is None:
        model = _BUILDERS[key]()
    else:
        # fork_rng restores the global RNG afterwards: no hidden global state change.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _BUILDERS[key]()
    return model.eval()


def load_model(name: str, checkpoint: PathLike | None = None) -> nn.Module:
    """Build model ``name`` and load a checkpoint into it (strictly), returned in eval mode.

    ``checkpoint=None`` uses the published checkpoint in the shared data directory
    (``DEFAULT_CHECKPOINTS[name]`` under ``engine.data.default_data_dir()``).

    Raises:
        InvalidOptionError: unknown ``name``.
        DataNotFoundError: the checkpoint file does not exist.
        CheckpointError: the file is not a checkpoint of this model.
    """
    key = _check_model_name(name, "load_model()")
    if checkpoint is None:
        from .data import default_data_dir  # local import: data.py must not depend on models.py

        checkpoint = default_data_dir() / DEFAULT_CHECKPOINTS[key]
    model = _BUILDERS[key]()
    _load_into(model, checkpoint, key)
    return model.eval()


def load_mlpnet(path: PathLike) -> MLPNet:
    """Load the WoodFisher MLPNet checkpoint: the torch ``.ckpt`` or the ``.npz`` of plain arrays.

    The ``.ckpt`` stores ``module.fcN._layer.weight`` and ``module.fcN._weight_mask``; the mask
    is multiplied into the weight (it is all ones in the published dense checkpoint). The ``.npz``
    holds ``fc1.weight`` (40, 784), ``fc2.weight`` (20, 40), ``fc3.weight`` (10, 20), float32.
    Returns the model in eval mode.
    """
    return load_model("mlpnet", path)  # type: ignore[return-value]


def load_resnet20(path: PathLike) -> ResNet20:
    """Load the Distiller/WoodFisher ResNet20 checkpoint (a dict with ``state_dict``, keys ``module.*``).

    Returns the model in eval mode.
    """
    return load_model("resnet20", path)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Prunable parameters
# --------------------------------------------------------------------------------------------


def prunable_parameters(model: nn.Module, preset: str | Sequence[str] = "default") -> list[tuple[str, nn.Parameter]]:
    """The weights a pruner may touch, as an ordered list of ``(name, parameter)`` (module order).

    Presets:
      * ``"default"``: the weight of every ``nn.Conv*d`` and ``nn.Linear`` (no biases, no BN).
        MLPNet: 32,360 weights; ResNet20: 270,896 (downsample convs included).
      * ``"cbs"``: for ResNet20 the 18 block convs ``layerX.Y.conv1/conv2.weight`` (267,264 weights,
        the set pruned in the CBS paper); for other models (MLPNet: every layer is pruned in the
        papers) the same as ``"default"``.
      * ``"chita"``: for ResNet20 ``conv1.weight`` + the 18 block convs + ``fc.weight`` (268,336
        weights, the CHITA set); for other models the same as ``"default"``.
      * a sequence of parameter names, e.g. ``["fc1.weight", "fc2.weight"]``: exactly those, in
        the order given.

    Raises:
        InvalidOptionError: unknown preset, or a name that is not a parameter of ``model``
            (or is repeated).
    """
    params = dict(model.named_parameters())
    if isinstance(preset, str):
        if preset not in PRUNABLE_PRESETS:
            raise invalid_option(
                "preset", "prunable_parameters()", f"one of {', '.join(map(repr, PRUNABLE_PRESETS))} "
                "or a list of parameter names", repr(preset)
            )
        names = _preset_names(model, preset)
    else:
        names = [n for n in preset]
        unknown = [n for n in names if not isinstance(n, str) or n not in params]
        if unknown:
            raise invalid_option(
                "preset", "prunable_parameters()", f"a preset or a list of parameter names of the model "
                f"(e.g. {', '.join(list(params)[:3])})", unknown if len(unknown) > 1 else unknown[0]
            )
        if len(set(names)) != len(names):
            raise invalid_option("preset", "prunable_parameters()", "a list of distinct parameter names", names)
        if not names:
            raise invalid_option("preset", "prunable_parameters()", "a non-empty list of parameter names", names)
    return [(n, params[n]) for n in names]


def _preset_names(model: nn.Module, preset: str) -> list[str]:
    default = [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.weight is not None
    ]
    if preset == "default":
        return default
    if type(model) not in (MLPNet, ResNet20):
        raise invalid_option("preset", "prunable_parameters()", "'default' or a list of parameter names for a model "
                             f"outside the zoo (the '{preset}' preset describes the parameters the {preset.upper()} "
                             "paper prunes in MLPNet and ResNet20)", repr(preset))
    if not isinstance(model, ResNet20):
        return default  # the papers prune every layer of MLPNet
    block_convs = [
        n for n in default if n.startswith("layer") and (n.endswith(".conv1.weight") or n.endswith(".conv2.weight"))
    ]
    if preset == "cbs":
        return block_convs
    return ["conv1.weight", *block_convs, "fc.weight"]  # "chita"
