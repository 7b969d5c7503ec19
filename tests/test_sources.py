"""Data sources read the real on-disk formats (CIFAR python pickles, Hugging Face ``save_to_disk``
copies, the bundled MNIST IDX files) into uint8 [N, C, H, W] tensors with int64 labels."""

from __future__ import annotations

import gzip
import pickle
from collections import Counter
from importlib import resources

import numpy as np
import pytest
import torch

from fedcoe_bench.data import CIFAR10, CIFAR100, DataError, MNIST10k, Synthetic

# ---------------------------------------------------------------- CIFAR, torchvision / python-pickle format
# The real files are Python-2 pickles of dicts with keys 'batch_label', 'labels' (CIFAR-100: 'fine_labels',
# 'coarse_labels'), 'data' (uint8 [N, 3072]: 1024 red, then 1024 green, then 1024 blue values, each plane
# row-major) and 'filenames'; loaded with encoding='latin1' the keys are str.


def write_batch(path, data: np.ndarray, labels: list[int], label_key: str, extra: dict | None = None) -> None:
    entry = {"batch_label": "testing batch", label_key: labels, "data": data,
             "filenames": [f"img_{i}.png" for i in range(len(labels))], **(extra or {})}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def fake_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    rows[:, 0] = 11  # red, pixel (0, 0)
    rows[:, 1024] = 22  # green, pixel (0, 0)
    rows[:, 2048] = 33  # blue, pixel (0, 0)
    rows[:, 1 * 32 + 2] = 200  # red, pixel (row 1, col 2)
    return rows


def channel_major(rows: np.ndarray) -> np.ndarray:
    """What the pixels must look like as [N, 3, 32, 32], written plane by plane."""
    out = np.empty((len(rows), 3, 32, 32), dtype=np.uint8)
    for ch in range(3):
        out[:, ch] = rows[:, ch * 1024 : (ch + 1) * 1024].reshape(-1, 32, 32)
    return out


def assert_images(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, labels: list[int]) -> None:
    assert x.shape == (len(rows), 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == labels
    assert (x[:, 0, 0, 0] == 11).all() and (x[:, 1, 0, 0] == 22).all() and (x[:, 2, 0, 0] == 33).all()
    assert (x[:, 0, 1, 2] == 200).all()
    assert torch.equal(x, torch.from_numpy(channel_major(rows)))


def test_cifar10_reads_the_five_train_batches_and_the_test_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows, labels = fake_rows(3, seed=i), [(3 * i + j) % 10 for j in range(3)]
        write_batch(folder / f"data_batch_{i}", rows, labels, "labels")
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = fake_rows(4, seed=9), [9, 0, 1, 2]
    write_batch(folder / "test_batch", test_rows, test_labels, "labels")

    images = CIFAR10(root=str(tmp_path), download=False).load()
    assert_images(images.train_x, images.train_y, np.concatenate(train_rows), train_labels)
    assert_images(images.test_x, images.test_y, test_rows, test_labels)
    assert images.augment and len(images.mean) == len(images.std) == 3


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_rows, train_fine = fake_rows(5, seed=1), [99, 0, 57, 13, 42]
    test_rows, test_fine = fake_rows(2, seed=2), [7, 98]
    write_batch(folder / "train", train_rows, train_fine, "fine_labels", {"coarse_labels": [1, 2, 3, 4, 5]})
    write_batch(folder / "test", test_rows, test_fine, "fine_labels", {"coarse_labels": [6, 7]})

    images = CIFAR100(root=str(tmp_path), download=False).load()
    assert_images(images.train_x, images.train_y, train_rows, train_fine)
    assert_images(images.test_x, images.test_y, test_rows, test_fine)
    assert CIFAR100.num_classes == 100


@pytest.mark.parametrize("cls, folder", [(CIFAR10, "cifar-10-batches-py"), (CIFAR100, "cifar-100-python")])
def test_missing_cifar_folder_names_the_path_looked_at(tmp_path, cls, folder):
    root = tmp_path / "nothing_here"
    with pytest.raises(DataError) as info:
        cls(root=str(root), download=False).load()
    msg = str(info.value)
    assert str((root / folder).resolve()) in msg
    assert "--data.source.root" in msg  # and says how to point at the data
    assert "\n" not in msg


# ---------------------------------------------------------------- CIFAR, Hugging Face `datasets` copy
def hf_split(n: int, seed: int, label_col: str, feature: str, extra_cols: dict | None = None):
    import datasets

    imgs = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # HWC, as PIL gives
    labels = [(seed + 3 * i) % 10 for i in range(n)]
    img_feature = datasets.Image() if feature == "image" else datasets.Array3D(shape=(32, 32, 3), dtype="uint8")
    features = {"img": img_feature, label_col: datasets.Value("int64")}
    columns = {"img": list(imgs), label_col: labels}
    for name, values in (extra_cols or {}).items():
        features[name], columns[name] = datasets.Value("int64"), values
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return ds, torch.from_numpy(imgs).permute(0, 3, 1, 2), labels


@pytest.mark.parametrize("feature", ["image", "array"])
def test_cifar10_reads_a_hugging_face_copy(tmp_path, feature):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    train, train_x, train_y = hf_split(6, seed=1, label_col="label", feature=feature)
    test, test_x, test_y = hf_split(3, seed=2, label_col="label", feature=feature)
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "cifar10"))

    images = CIFAR10(root=str(tmp_path), download=False).load()  # no torchvision folder: the HF copy is used
    for x, y, want_x, want_y in ((images.train_x, images.train_y, train_x, train_y),
                                 (images.test_x, images.test_y, test_x, test_y)):
        assert x.shape == (len(want_y), 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(x, want_x), "pixels must round-trip (HWC on disk -> CHW)"
        assert y.dtype == torch.int64 and y.tolist() == want_y


def test_cifar100_reads_a_hugging_face_copy_with_its_real_column_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    train, train_x, train_y = hf_split(4, seed=1, label_col="fine_label", feature="image",
                                       extra_cols={"coarse_label": [0, 1, 2, 3]})
    test, test_x, test_y = hf_split(2, seed=2, label_col="fine_label", feature="image",
                                    extra_cols={"coarse_label": [4, 5]})
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "cifar100"))

    images = CIFAR100(root=str(tmp_path), download=False).load()
    assert torch.equal(images.train_x, train_x) and images.train_y.tolist() == train_y
    assert torch.equal(images.test_x, test_x) and images.test_y.tolist() == test_y


# ---------------------------------------------------------------- the bundled MNIST test set
# Published class counts of the MNIST test set (also in data/mnist10k/README.md).
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def raw_mnist() -> np.ndarray:
    folder = resources.files("fedcoe_bench.data") / "mnist10k"
    with resources.as_file(folder) as root, gzip.open(root / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(10000, 784)


def test_mnist10k_is_a_fixed_stratified_8000_2000_split():
    a = MNIST10k().load()
    assert a.train_x.shape == (8000, 1, 28, 28) and a.test_x.shape == (2000, 1, 28, 28)
    assert a.train_x.dtype == a.test_x.dtype == torch.uint8
    assert a.train_y.dtype == a.test_y.dtype == torch.int64
    overall = np.array(MNIST_TEST_COUNTS) / 10000
    assert (torch.bincount(a.train_y, minlength=10) + torch.bincount(a.test_y, minlength=10)).tolist() == MNIST_TEST_COUNTS
    for y in (a.train_y, a.test_y):
        share = torch.bincount(y, minlength=10).numpy() / len(y)
        assert np.abs(share - overall).max() <= 0.01, "split is not stratified"
    # pool and test split are the 10,000 images, each exactly once
    ours = Counter(r.tobytes() for r in torch.cat([a.train_x, a.test_x]).reshape(10000, 784).numpy())
    assert ours == Counter(r.tobytes() for r in raw_mnist())

    b = MNIST10k().load()  # the global test set (and pool) do not depend on anything but the files
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)


# ---------------------------------------------------------------- synthetic pools
def test_synthetic_generates_a_million_small_class_conditional_images():
    images = Synthetic(samples=1_000_000, test_samples=1000, image_size=8, noise=60.0).load()
    assert images.train_x.shape == (1_000_000, 1, 8, 8) and images.train_x.dtype == torch.uint8
    assert images.train_y.shape == (1_000_000,) and set(images.train_y[:1000].tolist()) == set(range(10))
    # class-conditional: the nearest class mean (from the pool) labels the global test split
    x = images.train_x[:100_000].flatten(1).float()
    means = torch.stack([x[images.train_y[:100_000] == c].mean(0) for c in range(10)])
    guess = torch.cdist(images.test_x.flatten(1).float(), means).argmin(1)
    assert (guess == images.test_y).float().mean() > 0.9


def test_synthetic_images_do_not_depend_on_the_chunk_size(monkeypatch):
    whole = Synthetic(samples=300, test_samples=50, image_size=5, in_channels=3).load()
    monkeypatch.setattr(Synthetic, "chunk", 16)
    chunked = Synthetic(samples=300, test_samples=50, image_size=5, in_channels=3).load()
    for a, b in ((whole.train_x, chunked.train_x), (whole.test_x, chunked.test_x), (whole.train_y, chunked.train_y)):
        assert torch.equal(a, b)
