"""engine.hub: Hugging Face / timm models behind the engine's model contract, without any download.

The Hugging Face part builds a tiny random GPT-2 in the test (nothing is fetched) and skips when
transformers is not installed; the timm part skips when timm cannot be imported (PyPI's torchvision does
not import beside the CPU torch wheel), while the errors of the missing extras are tested either way.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from engine.errors import CBSError, CheckpointError, DataNotFoundError, InvalidOptionError
from engine.hub import (
    IGNORE_INDEX,
    CausalLMLogits,
    ExtraNotInstalledError,
    char_dataset,
    is_transposed_linear,
    linear_like_modules,
    load_hf_causal_lm,
    load_timm_model,
    token_accuracy,
    token_cross_entropy,
)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'cbs-prune[hf]')"
)


def _timm_importable() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


VOCAB, BLOCK = 65, 16


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(original model, folder it was saved to): a 2-layer GPT-2, random init with seed 0."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install 'cbs-prune[hf]')")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"  # the implementation load_hf_causal_lm picks by default
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(folder)
    return model, folder


def _tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- HF


@needs_transformers
def test_loaded_logits_equal_the_original_bit_for_bit(gpt2):
    original, folder = gpt2
    wrapped = load_hf_causal_lm(folder)
    assert isinstance(wrapped, CausalLMLogits) and not wrapped.training
    assert all(p.dtype == torch.float32 for p in wrapped.parameters())
    x = _tokens(4, BLOCK)
    with torch.no_grad():
        got = wrapped(x)
        want = original(input_ids=x, use_cache=False).logits
    assert got.shape == (4, BLOCK, VOCAB) and got.dtype == torch.float32
    assert torch.equal(got, want)


@needs_transformers
def test_parameter_names_and_state_dict_round_trip(gpt2):
    original, folder = gpt2
    wrapped = load_hf_causal_lm(folder)
    names = dict(wrapped.named_parameters())
    assert "model.transformer.h.0.attn.c_attn.weight" in names
    assert set(names) == {f"model.{n}" for n, _ in original.named_parameters()}
    state = wrapped.state_dict()
    other = load_hf_causal_lm(folder)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(state, strict=True)
    x = _tokens(2, BLOCK)
    with torch.no_grad():
        assert torch.equal(other(x), wrapped(x))


def test_token_cross_entropy_and_accuracy_match_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 7), generator=gen)
    z = logits.double().numpy().reshape(-1, 11)
    y = targets.numpy().reshape(-1)
    zmax = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    reference = float(np.mean(log_norm - z[np.arange(y.size), y]))
    loss = token_cross_entropy(logits, targets)
    assert loss.ndim == 0
    assert abs(float(loss) - reference) < 1e-6
    acc = token_accuracy(logits, targets)
    assert isinstance(acc, float)
    assert acc == pytest.approx(100.0 * np.mean(z.argmax(axis=1) == y))
    # ignored positions drop out of both
    masked = targets.clone()
    masked[:, :3] = IGNORE_INDEX
    keep = masked.numpy().reshape(-1) != IGNORE_INDEX
    assert abs(float(token_cross_entropy(logits, masked)) - float(np.mean((log_norm - z[np.arange(y.size), y])[keep]))) < 1e-6
    assert token_accuracy(logits, masked) == pytest.approx(100.0 * np.mean((z.argmax(axis=1) == y)[keep]))


def test_loss_and_metric_under_vmap_equal_the_per_row_values():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 6, 9, generator=gen)  # 5 rows of a (2, 6, 9) batch each
    targets = torch.randint(0, 9, (5, 2, 6), generator=gen)
    losses = vmap(token_cross_entropy)(logits, targets)
    accs = vmap(token_accuracy)(logits, targets)
    assert losses.shape == (5,) and accs.shape == (5,)
    for r in range(5):
        assert torch.allclose(losses[r], token_cross_entropy(logits[r], targets[r]), atol=1e-6)
        assert float(accs[r]) == pytest.approx(token_accuracy(logits[r], targets[r]))


@needs_transformers
def test_per_sample_gradients_of_the_wrapped_model_under_vmap(gpt2):
    _, folder = gpt2
    model = load_hf_causal_lm(folder)
    params = {n: p.detach() for n, p in model.named_parameters()}
    name = "model.transformer.h.0.attn.c_attn.weight"
    x, y = _tokens(3, 2, BLOCK, seed=2), _tokens(3, 2, BLOCK, seed=3)  # 3 rows of 2 sequences

    def row_loss(theta, xb, yb):
        return token_cross_entropy(functional_call(model, theta, (xb,)), yb)

    rows = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, x, y)
    assert rows[name].shape == (3, 32, 96)
    for r in range(3):
        model.zero_grad()
        token_cross_entropy(model(x[r]), y[r]).backward()
        assert torch.allclose(rows[name][r], dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


@needs_transformers
def test_conv1d_layers_are_found_and_transposed(gpt2):
    _, folder = gpt2
    model = load_hf_causal_lm(folder)
    found = linear_like_modules(model)
    transposed = {n: m for n, m, t in found if t}
    expected = {f"model.transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(transposed) == expected
    assert all(is_transposed_linear(m) for m in transposed.values())
    width = 32
    for name, module in transposed.items():
        d_in, d_out = {"c_attn": (width, 3 * width), "c_fc": (width, 4 * width)}.get(
            name.rsplit(".", 1)[1], (4 * width, width) if ".mlp." in name else (width, width)
        )
        assert tuple(module.weight.shape) == (d_in, d_out) == (module.weight.shape[0], module.nf)
    # the lm_head is a plain nn.Linear (its weight tied to wte), in module order after the blocks
    assert [(n, t) for n, _, t in found if not t] == [("model.lm_head", False)]
    assert [n for n, _, _ in found] == [n for n, m in model.named_modules() if any(n == f[0] for f in found)]


def test_linear_like_modules_of_a_plain_network_and_the_name_fallback():
    class Conv1D(nn.Module):  # a GPT-2 style layer from elsewhere: found by its name and `nf`
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.zeros(nx, nf))

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.Conv3d(1, 1, 1), Conv1D(5, 6), nn.Linear(4, 2))
    got = [(n, t) for n, _, t in linear_like_modules(net)]
    assert got == [("0", False), ("2", False), ("3", False), ("4", True), ("5", False)]
    assert not is_transposed_linear(nn.Linear(2, 2))


@needs_transformers
def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_hf_causal_lm(tmp_path / "nowhere")
    _assert_one_clear_line(info.value, "nowhere")


@needs_transformers
def test_folder_without_config_is_one_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidOptionError) as info:
        load_hf_causal_lm(tmp_path)
    _assert_one_clear_line(info.value, "config.json")


@needs_transformers
def test_wrong_type_is_one_clear_error():
    with pytest.raises(InvalidOptionError) as info:
        load_hf_causal_lm(42)  # type: ignore[arg-type]
    _assert_one_clear_line(info.value, "int")


@needs_transformers
def test_config_without_weights_is_one_clear_error(gpt2, tmp_path):
    _, folder = gpt2
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError) as info:
        load_hf_causal_lm(tmp_path)
    _assert_one_clear_line(info.value, "transformers cannot load")


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExtraNotInstalledError) as info:
        load_hf_causal_lm(tmp_path)
    assert isinstance(info.value, ImportError)
    _assert_one_clear_line(info.value, "pip install 'cbs-prune[hf]'")
    # and the Conv1D test falls back to the class name
    assert not is_transposed_linear(nn.Linear(2, 2))


def _assert_one_clear_line(error: BaseException, fragment: str) -> None:
    assert isinstance(error, CBSError)
    message = str(error)
    assert "\n" not in message and fragment in message, message
    assert error.__cause__ is None and error.__suppress_context__ is True or error.__context__ is None


# ---------------------------------------------------------------------------------------------- timm


def test_timm_missing_or_broken_names_the_extra_and_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ExtraNotInstalledError) as info:
        load_timm_model("resnet18")
    _assert_one_clear_line(info.value, "pip install 'cbs-prune[timm]'")
    assert "torchvision" in str(info.value)


def test_timm_unknown_name_with_a_stand_in_module(monkeypatch):
    fake = types.ModuleType("timm")
    fake.is_model = lambda name: name == "tiny"
    fake.create_model = lambda name, pretrained: nn.Linear(2, 2).train()
    monkeypatch.setitem(sys.modules, "timm", fake)
    with pytest.raises(InvalidOptionError) as info:
        load_timm_model("no_such_net")
    _assert_one_clear_line(info.value, "no_such_net")
    assert not load_timm_model("tiny").training
    with pytest.raises(InvalidOptionError):
        load_timm_model("tiny", pretrained=True)


@pytest.mark.skipif(not _timm_importable(), reason="timm cannot be imported (it needs torchvision, which PyPI does "
                    "not build for this CPU torch)")
def test_real_timm_model_builds_without_download():
    model = load_timm_model("resnet18", num_classes=10)
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(InvalidOptionError):
        load_timm_model("no_such_net_at_all")


# ---------------------------------------------------------------------------------------------- text


def test_char_dataset_windows_and_shift():
    text = "hello world, hello cbs!"
    data = char_dataset(text, block=5)
    assert len(data) == (len(text) - 1) // 5
    assert data.vocab == {c: i for i, c in enumerate(sorted(set(text)))}
    for i in range(len(data)):
        x, y = data[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (5,)
        assert data.decode(x) == text[5 * i : 5 * i + 5]
        assert data.decode(y) == text[5 * i + 1 : 5 * i + 6]
    assert torch.equal(data[-1][0], data[len(data) - 1][0])
    with pytest.raises(IndexError):
        data[len(data)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == yb.shape == (2, 5)
    assert torch.equal(char_dataset("lo he", 2, vocab=data.vocab)[0][0], torch.tensor([data.vocab["l"], data.vocab["o"]]))


def test_char_dataset_rejections():
    with pytest.raises(InvalidOptionError):
        char_dataset("abc", block=0)
    with pytest.raises(InvalidOptionError):
        char_dataset("abc", block=3)  # needs block + 1 characters
    with pytest.raises(InvalidOptionError):
        char_dataset("abcz", block=2, vocab={"a": 0, "b": 1, "c": 2})
    with pytest.raises(InvalidOptionError):
        char_dataset(b"abcd", block=2)  # type: ignore[arg-type]
