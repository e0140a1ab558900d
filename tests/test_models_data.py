"""Models, checkpoint loaders, data loaders and evaluation.

The accuracy tests reproduce the published numbers of the shared checkpoints (DESIGN.md §5):
MLPNet 93.97 % on the MNIST test set, ResNet20 91.43 % on the CIFAR-10 test set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import data, models
from engine.errors import CBSError, CheckpointError, DataNotFoundError, InvalidOptionError
from engine.evaluate import evaluate, reestimate_batchnorm

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MLP_CKPT = "weights/woodfisher_mlpnet_mnist_25_epoch_93.97.ckpt"
MLP_NPZ = "weights/woodfisher_mlpnet_mnist.npz"
RESNET_CKPT = "weights/woodfisher_resnet20_cifar10.pth.tar"


def _file(shared_data: Path, relative: str) -> Path:
    path = shared_data / relative
    if not path.is_file():
        pytest.skip(f"../shared/data is incomplete: '{path}' not found")
    return path


@pytest.fixture(scope="module")
def mnist_test(shared_data: Path) -> data.LabelledData:
    _file(shared_data, "mnist/t10k-images-idx3-ubyte.gz")
    return data.load_mnist(shared_data, "test")


@pytest.fixture(scope="module")
def cifar_test(shared_data: Path) -> data.LabelledData:
    _file(shared_data, "cifar10/cifar10_test.npz")
    return data.load_cifar10(shared_data, "test")


@pytest.fixture(scope="module")
def resnet20(shared_data: Path) -> models.ResNet20:
    return models.load_resnet20(_file(shared_data, RESNET_CKPT))


# ----------------------------------------------------------------------------- accuracy


def test_mlpnet_dense_accuracy(shared_data: Path, mnist_test: data.LabelledData) -> None:
    model = models.load_mlpnet(_file(shared_data, MLP_CKPT))
    accuracy, loss = evaluate(model, *mnist_test)
    assert accuracy == pytest.approx(93.97, abs=0.005)
    assert 0.0 < loss < 0.5


def test_mlpnet_checkpoint_formats_agree(shared_data: Path, mnist_test: data.LabelledData) -> None:
    from_ckpt = models.load_mlpnet(_file(shared_data, MLP_CKPT))
    from_npz = models.load_mlpnet(_file(shared_data, MLP_NPZ))
    for (name, a), (_, b) in zip(from_ckpt.state_dict().items(), from_npz.state_dict().items()):
        assert torch.equal(a, b), name
    assert evaluate(from_npz, *mnist_test)[0] == pytest.approx(93.97, abs=0.005)


def test_resnet20_dense_accuracy(resnet20: models.ResNet20, cifar_test: data.LabelledData) -> None:
    accuracy, loss = evaluate(resnet20, *cifar_test)
    assert accuracy == pytest.approx(91.43, abs=0.005)
    assert 0.0 < loss < 1.0


def test_resnet20_keys_match_checkpoint_exactly(shared_data: Path) -> None:
    raw = torch.load(_file(shared_data, RESNET_CKPT), map_location="cpu", weights_only=True)["state_dict"]
    stripped = [k.removeprefix("module.") for k in raw]
    assert list(models.build_model("resnet20").state_dict()) == stripped


def test_load_model_default_checkpoint(shared_data: Path) -> None:
    _file(shared_data, MLP_CKPT)
    model = models.load_model("mlpnet")
    assert isinstance(model, models.MLPNet) and not model.training


def test_mnist_loader(shared_data: Path, mnist_test: data.LabelledData) -> None:
    images, labels = mnist_test
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    # (0/255 - 0.1307)/0.3081 is the background value
    assert float(images.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    _file(shared_data, "mnist/train-labels-idx1-ubyte.gz")
    train = data.load_mnist(shared_data, "train")
    assert train.images.shape == (60000, 1, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_cifar_loader_and_dataset_for_model(shared_data: Path, cifar_test: data.LabelledData) -> None:
    images, labels = cifar_test
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [1000] * 10
    assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0
    via_name = data.dataset_for_model("resnet20", shared_data, "test")
    assert torch.equal(via_name.labels, labels)
    with pytest.raises(InvalidOptionError, match="model_name"):
        data.dataset_for_model("vgg", shared_data)


def test_cifar_train_is_the_full_50k_and_train_10k_its_subset(shared_data: Path) -> None:
    """"train" is the whole training set (5,000 images a class), what the papers draw gradients from; the quick
    "train-10k" split is a bit-exact subset of it (1,000 a class)."""
    _file(shared_data, "cifar10/cifar10_train.npz")
    full = data.load_cifar10(shared_data, "train")
    small = data.load_cifar10(shared_data, "train-10k")
    assert full.images.shape == (50000, 3, 32, 32) and torch.bincount(full.labels).tolist() == [5000] * 10
    assert small.images.shape == (10000, 3, 32, 32) and torch.bincount(small.labels).tolist() == [1000] * 10
    flat = full.images.reshape(50000, -1)
    for i in (0, 4321, 9999):  # rows of the subset are rows of the full set, label and pixels
        hit = torch.nonzero((flat == small.images[i].reshape(1, -1)).all(dim=1)).flatten()
        assert hit.numel() == 1 and full.labels[hit[0]] == small.labels[i]
    assert data.dataset_for_model("resnet20", shared_data, "train-10k").labels.shape == (10000,)
    with pytest.raises(InvalidOptionError, match=r"'split'.*'train', 'train-10k' or 'test'.*'valid'"):
        data.load_cifar10(shared_data, "valid")
    with pytest.raises(InvalidOptionError, match=r"'split'.*'train' or 'test'.*'train-10k'"):
        data.load_mnist(shared_data, "train-10k")


def test_bn_reestimation_on_augmented_data_keeps_dense_accuracy(
    shared_data: Path, cifar_test: data.LabelledData
) -> None:
    """On augmented training images (as in training) BN re-estimation keeps the dense accuracy."""
    _file(shared_data, "cifar10/cifar10_train_10k.npz")
    model = models.load_resnet20(_file(shared_data, RESNET_CKPT))
    train = data.load_cifar10(shared_data, "train-10k")
    rows = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:2000]
    test_images, test_labels = cifar_test.images[rows], cifar_test.labels[rows]
    dense_accuracy, _ = evaluate(model, test_images, test_labels)
    augmented = data.augment_cifar10(train.images[rows], copies=2, seed=1)
    assert reestimate_batchnorm(model, augmented, batch_size=500) == 21
    assert not model.training and model.bn1.momentum == 0.1
    assert evaluate(model, test_images, test_labels)[0] == pytest.approx(dense_accuracy, abs=1.0)


# ----------------------------------------------------------------------------- prunable sets


def test_prunable_counts_without_data() -> None:
    def count(model: nn.Module, preset: object) -> int:
        return sum(p.numel() for _, p in models.prunable_parameters(model, preset))  # type: ignore[arg-type]

    mlp = models.build_model("mlpnet")
    assert count(mlp, "default") == 32360
    assert [n for n, _ in models.prunable_parameters(mlp)] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    resnet = models.build_model("resnet20")
    cbs = models.prunable_parameters(resnet, "cbs")
    chita = models.prunable_parameters(resnet, "chita")
    assert len(cbs) == 18 and count(resnet, "cbs") == 267264
    assert all(n.startswith("layer") and n.split(".")[2] in ("conv1", "conv2") for n, _ in cbs)
    assert len(chita) == 20 and count(resnet, "chita") == 268336
    assert chita[0][0] == "conv1.weight" and chita[-1][0] == "fc.weight"
    assert count(resnet, "default") == 268336 + 32 * 16 + 64 * 32  # plus the two downsample convs
    assert count(models.small_mlp(), "default") == 64 * 32 + 32 * 16 + 16 * 10
    chosen = models.prunable_parameters(resnet, ["fc.weight", "conv1.weight"])
    assert [n for n, _ in chosen] == ["fc.weight", "conv1.weight"]
    assert chosen[0][1] is resnet.fc.weight


def test_prunable_rejects_unknown_preset_and_names() -> None:
    resnet = models.build_model("resnet20")
    with pytest.raises(InvalidOptionError) as excinfo:
        models.prunable_parameters(resnet, "everything")
    message = str(excinfo.value)
    assert "'preset'" in message and "'chita'" in message and "'everything'" in message
    with pytest.raises(InvalidOptionError, match="nope.weight"):
        models.prunable_parameters(resnet, ["conv1.weight", "nope.weight"])
    with pytest.raises(InvalidOptionError, match="distinct"):
        models.prunable_parameters(resnet, ["conv1.weight", "conv1.weight"])


# ----------------------------------------------------------------------------- bad input


def test_wrong_checkpoint_raises_checkpoint_error(shared_data: Path, tmp_path: Path) -> None:
    mlp_ckpt, mlp_npz = _file(shared_data, MLP_CKPT), _file(shared_data, MLP_NPZ)
    resnet_ckpt = _file(shared_data, RESNET_CKPT)
    for loader, path in ((models.load_resnet20, mlp_ckpt), (models.load_resnet20, mlp_npz),
                         (models.load_mlpnet, resnet_ckpt)):
        with pytest.raises(CheckpointError) as excinfo:
            loader(path)
        assert str(path) in str(excinfo.value) and "missing key" in str(excinfo.value)

    state = {k: v.clone() for k, v in models.build_model("mlpnet").state_dict().items()}
    state["fc2.weight"] = torch.zeros(20, 41)
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save({"state_dict": state}, wrong_shape)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc2\.weight"):
        models.load_mlpnet(wrong_shape)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        models.load_mlpnet(garbage)
    with pytest.raises(CheckpointError, match="not a file"):
        models.load_mlpnet(tmp_path)


def test_plain_state_dict_roundtrip(tmp_path: Path) -> None:
    original = models.build_model("resnet20", seed=3)
    path = tmp_path / "resnet.pt"
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, path)
    loaded = models.load_resnet20(path)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))
    other = models.build_model("resnet20", seed=4)
    assert not torch.equal(original.conv1.weight, other.conv1.weight)


def test_missing_files_raise_data_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    for loader in (data.load_mnist, data.load_cifar10):
        with pytest.raises(DataNotFoundError) as excinfo:
            loader(missing, "test")
        assert str(missing) in str(excinfo.value) and "--data-dir" in str(excinfo.value)
        assert isinstance(excinfo.value, FileNotFoundError)
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataNotFoundError, match="t10k-images"):
        data.load_mnist(tmp_path, "test")
    with pytest.raises(DataNotFoundError, match="nothing.ckpt"):
        models.load_mlpnet(tmp_path / "nothing.ckpt")
    with pytest.raises(InvalidOptionError, match="'split'"):
        data.load_mnist(tmp_path, "validation")
    with pytest.raises(InvalidOptionError, match="'name'"):
        models.build_model("vgg16")


def test_corrupt_mnist_file(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "mnist").mkdir()
    with gzip.open(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00\x08\x01" + bytes(20))  # a label-file magic number in an image file
    with gzip.open(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + bytes(2))
    with pytest.raises(CBSError, match="magic"):
        data.load_mnist(tmp_path, "test")


def test_default_data_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)  # ./../shared/data of the working directory, never of the install location
    assert data.default_data_dir() == tmp_path / "shared" / "data"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.default_data_dir() == tmp_path


# ----------------------------------------------------------------------------- digits (embedded)


def test_digits_are_embedded_and_split_deterministically() -> None:
    train, test = data.load_digits("train"), data.load_digits("test")
    assert train.images.shape == (1397, 64) and test.images.shape == (400, 64)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    assert set(train.labels.tolist()) == set(range(10))
    again = data.load_digits("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    other = data.load_digits("test", seed=1)
    assert not torch.equal(other.labels, test.labels)
    # train and test are disjoint and together hold the whole file
    rows = {tuple(r) for r in torch.cat([train.images, test.images]).mul(16).round().int().tolist()}
    assert len(rows) == 1797  # the 1797 images are distinct
    logits = models.small_mlp()(test.images)
    assert logits.shape == (400, 10)
    with pytest.raises(InvalidOptionError, match="n_test"):
        data.load_digits(n_test=0)


def test_digits_load_without_shared_data(tmp_path: Path) -> None:
    """The embedded demo data needs neither ../shared nor scikit-learn: run in a bare subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env[data.DATA_DIR_ENV] = str(tmp_path / "does_not_exist")
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from engine.data import load_digits\n"
        "x, y = load_digits('train'); print(tuple(x.shape), int(y.sum()))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("(1397, 64)")


# ----------------------------------------------------------------------------- evaluate helpers


def test_evaluate_restores_mode_and_validates() -> None:
    model = models.small_mlp()
    model.train()
    model.fc2.eval()  # a deliberately mixed state must survive
    images, labels = torch.randn(50, 64), torch.randint(0, 10, (50,))
    accuracy, loss = evaluate(model, images, labels, batch_size=7)
    assert 0.0 <= accuracy <= 100.0 and loss > 0.0
    assert model.training and not model.fc2.training
    logits = model(images)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels).detach()), rel=1e-5)
    with pytest.raises(InvalidOptionError, match="batch_size"):
        evaluate(model, images, labels, batch_size=0)
    with pytest.raises(InvalidOptionError, match="labels"):
        evaluate(model, images, labels[:10])


def test_reestimate_batchnorm_computes_population_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.eval()
    images = torch.randn(256, 4) * 3 + 1
    assert reestimate_batchnorm(model, images, batch_size=64) == 1
    features = model[0](images).detach()
    bn = model[1]
    # momentum None: cumulative average of the 4 batch means = the population mean
    assert torch.allclose(bn.running_mean, features.mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and not model.training and not bn.training
    assert int(bn.num_batches_tracked) == 4
    with pytest.raises(InvalidOptionError, match="passes"):
        reestimate_batchnorm(model, images, passes=0)
    assert reestimate_batchnorm(models.small_mlp(), torch.randn(8, 64)) == 0


def test_reestimate_batchnorm_restores_statistics_on_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[1].running_mean.fill_(5.0)
    with pytest.raises(RuntimeError):
        reestimate_batchnorm(model, torch.randn(16, 5))  # wrong width: the forward fails
    assert torch.all(model[1].running_mean == 5.0) and model[1].momentum == 0.1


def test_fast_layout_keeps_values_and_gives_the_same_logits() -> None:
    """Channels-last is a stride change only: equal values, and a conv net's logits agree with the NCHW
    ones to float32 round-off (checked against a float64 forward)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    fast = data.fast_layout(x)
    assert fast.is_contiguous(memory_format=torch.channels_last) and torch.equal(fast, x)
    flat = torch.randn(5, 7)
    assert data.fast_layout(flat) is flat
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 3)).eval()
    with torch.no_grad():
        reference = net.double()(x.double())
        net.float()
        torch.testing.assert_close(net(fast).double(), reference, rtol=1e-5, atol=1e-5)


def test_eval_mode_restores_flags_and_batchnorm_statistics_even_on_error() -> None:
    from engine.evaluate import eval_mode

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    net[2].eval()  # a deliberately mixed state comes back as it was
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(net, batch_stats=True):
            assert net[1].training and not net.training and not net[2].training
            net(torch.randn(5, 3, 6, 6))  # updates the running statistics in training mode
            raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [True, True, True, False]
    for key, value in before.items():
        assert torch.equal(net[1].state_dict()[key], value), key
