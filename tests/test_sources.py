"""Data sources read the real on-disk formats (CIFAR python pickles, the tiny-imagenet-200 JPEG folder,
Hugging Face ``save_to_disk`` copies, the bundled MNIST IDX files) into uint8 [N, C, H, W] tensors with
int64 labels."""

from __future__ import annotations

import gzip
import io
import pickle
from collections import Counter
from importlib import resources

import numpy as np
import pytest
import torch

from fedcoe_bench.data import CIFAR10, CIFAR100, DataError, MNIST10k, Synthetic, TinyImageNet

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


@pytest.mark.parametrize("cls, folder", [(CIFAR10, "cifar-10-batches-py"), (CIFAR100, "cifar-100-python"),
                                        (TinyImageNet, "tiny-imagenet-200")])
def test_missing_data_folder_names_the_path_looked_at(tmp_path, cls, folder):
    root = tmp_path / "nothing_here"
    with pytest.raises(DataError) as info:
        cls(root=str(root), download=False).load()
    msg = str(info.value)
    assert str((root / folder).resolve()) in msg
    assert "--data.source.root" in msg  # and says how to point at the data
    assert "`python -c " in msg  # and the command that fetches it
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


# ---------------------------------------------------------------- Tiny-ImageNet, official folder and HF copy
# The official zip unpacks to tiny-imagenet-200/ with wnids.txt (one wnid a line, not sorted), words.txt,
# train/<wnid>/<wnid>_boxes.txt and train/<wnid>/images/<wnid>_<k>.JPEG, val/images/val_<k>.JPEG with
# val/val_annotations.txt (file, wnid, x0, y0, x1, y1; tab-separated), and test/images/ without labels.
# Every image is a flat colour of its own with a black 16x16 corner at the top left (one JPEG macroblock:
# away from its one-pixel border, where chroma upsampling blends, both survive JPEG within a few levels),
# so each decoded image can be traced to the file it came from and its orientation checked; one is a
# grayscale JPEG (there are such files in the real set).
WNIDS = ["n04067472", "n01443537", "n02124075"]  # in wnids.txt order; sorted: n01443537, n02124075, n04067472


def jpeg(colour: tuple[int, ...]) -> bytes:
    from PIL import Image

    mode, value = ("L", colour[0]) if len(colour) == 1 else ("RGB", colour)
    buf = io.BytesIO()
    im = Image.new(mode, (64, 64), value)
    im.paste(0, (0, 0, 16, 16))
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tiny_images(n: int, first: int, grey: int | None = None) -> list[tuple[int, ...]]:
    """n distinct flat colours (well apart, so JPEG's error cannot confuse them); image ``grey`` is grayscale."""
    return [(20 * (first + k),) if k == grey else (20 * (first + k), 230 - 20 * (first + k), 60 + 10 * k)
            for k in range(n)]


def assert_traced(x: torch.Tensor, y: torch.Tensor, colours: list[tuple[int, ...]], labels: list[int]) -> None:
    """Each decoded image is one of the written ones, each written one appears once, with its label."""
    assert x.shape == (len(colours), 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    written = torch.tensor([c * 3 if len(c) == 1 else c for c in colours], dtype=torch.float)  # grey -> 3 equal
    assert x[:, :, :15, :15].max() <= 4, "the black corner must stay at the top left"
    body = x[:, :, 17:].float()
    got = body.mean(dim=(2, 3))
    assert (body - got[:, :, None, None]).abs().max() <= 4, "images must be flat below the corner, as written"
    dist = (got[:, None, :] - written[None, :, :]).abs().amax(dim=2)
    source = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() <= 4 and sorted(source.tolist()) == list(range(len(colours)))
    assert y.tolist() == [labels[i] for i in source.tolist()]


def write_tiny_imagenet(root, val_wnids: list[str]):
    """A tiny-imagenet-200 folder with 2 train images per wnid and one val image per entry of ``val_wnids``;
    returns (train colours, train labels, val colours, val labels), labels as sorted-wnid positions."""
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "test" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (folder / "words.txt").write_text("".join(f"{w}\tsome words\n" for w in WNIDS))
    (folder / "test" / "images" / "test_0.JPEG").write_bytes(jpeg((1, 2, 3)))  # unlabelled: never read
    rank = {w: i for i, w in enumerate(sorted(WNIDS))}
    colours, train_labels = tiny_images(2 * len(WNIDS), first=0, grey=3), []
    for j, w in enumerate(WNIDS):
        (folder / "train" / w / "images").mkdir(parents=True)
        (folder / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t63\t63\n")
        for k in range(2):
            (folder / "train" / w / "images" / f"{w}_{k}.JPEG").write_bytes(jpeg(colours[2 * j + k]))
            train_labels.append(rank[w])
    val_colours = tiny_images(len(val_wnids), first=6)
    lines = []
    for k, w in enumerate(val_wnids):
        (folder / "val" / "images" / f"val_{k}.JPEG").write_bytes(jpeg(val_colours[k]))
        lines.append(f"val_{k}.JPEG\t{w}\t{k}\t{k + 1}\t{60 - k}\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return colours, train_labels, val_colours, [rank[w] for w in val_wnids]


def test_tiny_imagenet_reads_the_official_folder_with_sorted_wnid_labels(tmp_path):
    train_c, train_y, val_c, val_y = write_tiny_imagenet(tmp_path, ["n02124075", "n04067472", "n01443537"])
    images = TinyImageNet(root=str(tmp_path), download=False).load()
    assert_traced(images.train_x, images.train_y, train_c, train_y)
    assert_traced(images.test_x, images.test_y, val_c, val_y)
    grey = images.train_x[images.train_x.float().std(dim=1).amax(dim=(1, 2)) == 0]  # equal channels
    assert len(grey) == 1, "the grayscale JPEG is decoded to 3 equal channels"
    assert images.augment and len(images.mean) == len(images.std) == 3
    assert (TinyImageNet.num_classes, TinyImageNet.in_channels, TinyImageNet.image_size) == (200, 3, 64)


def test_tiny_imagenet_keeps_the_decoded_tensors_until_its_index_files_change(tmp_path):
    write_tiny_imagenet(tmp_path, ["n02124075", "n04067472", "n01443537"])
    source = TinyImageNet(root=str(tmp_path), download=False)
    first = source.load()
    assert (tmp_path / "tiny-imagenet-200.uint8.pt").exists()
    # a changed JPEG alone is not looked at: the second load is the cache's, not a decode
    changed = tmp_path / "tiny-imagenet-200" / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG"
    changed.write_bytes(jpeg((250, 250, 250)))
    again = source.load()
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    # new annotations (another size, so the stamp differs on any file system) are decoded afresh
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text("".join(f"val_{k}.JPEG\tn01443537\t1\t2\t3\t4\n" for k in range(3)))
    fresh = source.load()
    assert fresh.test_y.tolist() == [0, 0, 0]
    assert (fresh.train_x[:, :, 17:].float().mean(dim=(1, 2, 3)) > 245).sum() == 1, "the changed JPEG is read now"


def test_tiny_imagenet_reads_a_hugging_face_copy_and_maps_class_names_to_sorted_wnids(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    # as zh-plus/tiny-imagenet: image (JPEG bytes) and label (ClassLabel of wnids), splits train and valid;
    # here the ClassLabel order is wnids.txt's, so the copy's label ints are not the sorted positions
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=WNIDS)})
    rank = {w: i for i, w in enumerate(sorted(WNIDS))}

    def split(colours, label_ids):
        rows = {"image": [{"bytes": jpeg(c), "path": None} for c in colours], "label": label_ids}
        return datasets.Dataset.from_dict(rows, features=features), [rank[WNIDS[i]] for i in label_ids]

    train_c, val_c = tiny_images(6, first=0, grey=2), tiny_images(3, first=6)
    train, train_y = split(train_c, [0, 0, 1, 1, 2, 2])
    valid, val_y = split(val_c, [2, 0, 1])
    datasets.DatasetDict(train=train, valid=valid).save_to_disk(str(tmp_path / "tinyimagenet"))

    images = TinyImageNet(root=str(tmp_path), download=False).load()  # no official folder: the copy is used
    assert_traced(images.train_x, images.train_y, train_c, train_y)
    assert_traced(images.test_x, images.test_y, val_c, val_y)
    assert images.train_y.tolist() != [0, 0, 1, 1, 2, 2], "labels must be sorted-wnid positions"


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
