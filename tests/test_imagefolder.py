"""Image folders (``root/train/<class>/*``, ``root/test/<class>/*``) as a data source, alone and as a
layout of CIFAR-10: formats, class order, sizes, the decode cache, and one-line errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedcoe_bench.data import CIFAR10, DataError, FederatedData, ImageFolder
from fedcoe_bench.data.imagefolder import readable_extensions

RED, GREEN, BLUE = (220, 20, 20), (20, 220, 20), (20, 20, 220)


def save(path: Path, im: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def flat(colour, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noise(seed: int, size=(8, 8)) -> Image.Image:
    """Random pixels: a lossless format must give them back exactly."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


def test_reads_pillow_formats_with_classes_in_sorted_folder_order(tmp_path, cache):
    root = tmp_path / "pets"
    # created out of order: the label is the folder's rank in sorted order, not creation or listing order
    save(root / "train" / "zebra" / "b.png", noise(1))
    save(root / "train" / "zebra" / "a.bmp", noise(2))
    save(root / "train" / "ant" / "x.jpg", flat(RED), "JPEG")
    save(root / "train" / "moth" / "sub" / "y.webp", noise(3), "WEBP")  # nested folders are walked
    (root / "train" / "moth" / "README.txt").write_text("not an image: left alone")
    save(root / "test" / "moth" / "t.png", noise(4))
    save(root / "test" / "zebra" / "t.tiff", noise(5))
    save(root / "test" / "ant" / "t.gif", flat(BLUE).convert("P"))  # palette image, expanded to RGB

    source = ImageFolder(str(root), cache_dir=cache)
    images = source.load()
    assert source.classes() == ["ant", "moth", "zebra"] and source.num_classes == 3
    assert (source.in_channels, source.image_size) == (3, 8) and source.name == "pets"
    assert images.train_x.dtype == torch.uint8 and images.train_x.shape == (4, 3, 8, 8)
    # classes in sorted order, files in sorted order within a class
    assert images.train_y.tolist() == [0, 1, 2, 2] and images.test_y.tolist() == [0, 1, 2]
    assert torch.equal(images.train_x[2], chw(noise(2))) and torch.equal(images.train_x[3], chw(noise(1)))
    assert torch.equal(images.test_x[1], chw(noise(4))) and torch.equal(images.test_x[2], chw(noise(5)))
    assert (images.train_x[0].float().mean(dim=(1, 2)) - torch.tensor(RED)).abs().max() < 4  # JPEG: lossy
    assert (images.test_x[0].float().mean(dim=(1, 2)) - torch.tensor(BLUE)).abs().max() < 4
    assert images.augment and len(images.mean) == len(images.std) == 3
    # mean and std are the train split's own
    want = images.train_x.double().div(255)
    assert np.allclose(images.mean, want.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(images.std, want.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False).numpy(), atol=1e-6)


def test_images_of_other_sizes_are_resized_and_centre_cropped_to_the_most_common_size(tmp_path, cache):
    root = tmp_path / "mixed"
    for k in range(3):
        save(root / "train" / "a" / f"{k}.png", noise(k, (8, 8)))
    # 32x16, left quarter red, middle half green, right quarter blue: its centre square is all green
    wide = flat(GREEN, (32, 16))
    wide.paste(RED, (0, 0, 8, 16))
    wide.paste(BLUE, (24, 0, 32, 16))
    save(root / "train" / "b" / "wide.png", wide)
    save(root / "train" / "b" / "big.png", flat(RED, (20, 20)))
    save(root / "test" / "a" / "t.png", flat(BLUE, (12, 12)))
    save(root / "test" / "b" / "t.png", noise(9, (8, 8)))

    images = ImageFolder(str(root), cache_dir=cache).load()
    assert images.train_x.shape == (5, 3, 8, 8) and images.test_x.shape == (2, 3, 8, 8)
    assert torch.equal(images.train_x[0], chw(noise(0)))  # already 8x8: untouched
    assert (images.train_x[3].float() - torch.tensor(RED)[:, None, None]).abs().max() <= 1  # big.png, then wide.png
    wide = images.train_x[4].float() - torch.tensor(GREEN)[:, None, None]
    # the centre half, shrunk by 2: green, but for the antialiasing filter's reach into the sides at its edges
    assert wide[:, :, 1:-1].abs().max() <= 1 and wide.abs().max() <= 30, "centre crop"

    given = ImageFolder(str(root), image_size=4, cache_dir=cache).load()  # a given size wins
    assert given.train_x.shape == (5, 3, 4, 4)


@pytest.mark.parametrize("colour_image, channels", [(False, 1), (True, 3)])
def test_channels_are_one_for_an_all_grey_folder_and_three_if_any_image_has_colour(tmp_path, cache, colour_image, channels):
    root = tmp_path / "digits"
    save(root / "train" / "0" / "a.png", flat(40, mode="L"))
    save(root / "train" / "1" / "a.png", flat(200, mode="L"))
    save(root / "test" / "0" / "a.pgm", flat(50, mode="L"))
    save(root / "test" / "1" / "a.png", flat(GREEN) if colour_image else flat(210, mode="L"))
    source = ImageFolder(str(root), augment=False, cache_dir=cache)
    images = source.load()
    assert source.in_channels == channels and images.train_x.shape[1] == channels
    assert images.train_x[:, :, 0, 0].tolist() == [[40] * channels, [200] * channels]
    assert not images.augment
    assert ImageFolder(str(root), in_channels=3, cache_dir=cache).load().train_x.shape[1] == 3


def small_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for c, colour in (("cat", RED), ("dog", BLUE)):
            save(root / split / c / "0.png", flat(colour))
            save(root / split / c / "1.png", noise(len(split) + len(c)))
    return root


@pytest.mark.parametrize("damage", ["not_an_image", "truncated_jpeg"])
def test_a_corrupt_file_is_one_line_naming_it(tmp_path, cache, damage):
    root = small_folder(tmp_path / "data")
    bad = root / "train" / "dog" / "bad.jpg"
    if damage == "not_an_image":
        bad.write_bytes(b"this is not an image")
    else:
        save(bad, noise(7, (64, 64)), "JPEG")
        bad.write_bytes(bad.read_bytes()[:300])
    for source in (ImageFolder(str(root), cache_dir=cache),  # the header scan that infers the shape
                   ImageFolder(str(root), image_size=8, in_channels=3, cache_dir=cache)):  # the decode
        with pytest.raises(DataError) as info:
            source.load()
        msg = str(info.value)
        assert str(bad.resolve()) in msg and "\n" not in msg


def test_a_missing_split_is_one_line_naming_the_missing_path(tmp_path, cache):
    root = tmp_path / "data"
    save(root / "train" / "cat" / "0.png", flat(RED))
    with pytest.raises(DataError) as info:
        ImageFolder(str(root), cache_dir=cache)  # found when the config is read, before any decoding
    msg = str(info.value)
    assert str((root / "test").resolve()) in msg and "train/<class>" in msg and "\n" not in msg


def test_splits_with_different_classes_name_the_difference(tmp_path, cache):
    root = small_folder(tmp_path / "data")
    save(root / "test" / "eel" / "0.png", flat(GREEN))
    (root / "train" / "cat" / "0.png").rename(root / "train" / "dog" / "2.png")
    (root / "train" / "cat" / "1.png").unlink()
    (root / "train" / "cat").rmdir()
    with pytest.raises(DataError) as info:
        ImageFolder(str(root), cache_dir=cache)
    msg = str(info.value)
    assert "only in test: cat, eel" in msg and "only in train" not in msg and "\n" not in msg


def test_a_class_folder_without_images_is_named(tmp_path, cache):
    root = small_folder(tmp_path / "data")
    (root / "test" / "dog" / "0.png").unlink()
    (root / "test" / "dog" / "1.png").rename(root / "test" / "dog" / "notes.txt")
    with pytest.raises(DataError) as info:
        ImageFolder(str(root), cache_dir=cache).load()
    assert str((root / "test" / "dog").resolve()) in str(info.value)


def test_decodes_once_and_again_when_a_file_changes(tmp_path, cache, monkeypatch):
    root = small_folder(tmp_path / "data")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = ImageFolder(str(root), cache_dir=cache).load()
    assert len(list(Path(cache).glob("*.pt"))) == 1
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "nothing is written next to the images"

    decoded = []
    real_read = ImageFolder._read
    monkeypatch.setattr(ImageFolder, "_read", lambda self, *a: decoded.append(a[0]) or real_read(self, *a))
    again = ImageFolder(str(root), cache_dir=cache).load()  # another instance: the cache is on disk
    assert decoded == [] and torch.equal(again.train_x, first.train_x) and again.mean == first.mean

    changed = root / "train" / "dog" / "0.png"
    save(changed, flat(GREEN))
    os.utime(changed, ns=(1, 1))  # a modification time apart from the first, whatever the clock's resolution
    fresh = ImageFolder(str(root), cache_dir=cache).load()
    assert len(decoded) == 8, "a changed file decodes the folder afresh"
    assert (fresh.train_x[2].float() - torch.tensor(GREEN)[:, None, None]).abs().max() <= 1
    assert not torch.equal(fresh.train_x, first.train_x)


def test_the_partition_key_follows_the_files_not_where_they_lie(tmp_path, cache):
    a = small_folder(tmp_path / "a")
    b = small_folder(tmp_path / "b")
    key = lambda root: FederatedData(ImageFolder(str(root), cache_dir=cache), num_clients=2).key(seed=0)
    assert key(a) == key(b)
    save(b / "train" / "cat" / "2.png", flat(GREEN))  # another pool: another partition
    assert key(a) != key(b)


def test_readable_extensions_are_what_pillow_opens():
    ext = readable_extensions()
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".webp"} <= set(ext)
    assert ".pdf" not in ext  # Pillow writes PDFs but cannot read them


# ---------------------------------------------------------------- CIFAR-10 read from an image folder
def cifar_folder(root: Path, fmt: str = "PNG") -> dict[str, list[torch.Tensor]]:
    """Class folders named as CIFAR-10's, created in reverse order; two 32x32 images per class and split."""
    written = {"train": [], "test": []}
    for c in reversed(CIFAR10.classes):
        for split in ("train", "test"):
            for k in range(2):
                im = noise(100 * CIFAR10.classes.index(c) + 10 * len(split) + k, (32, 32))
                save(root / split / c / f"{k:04d}.{fmt.lower()}", im, fmt)
                written[split].insert(k, chw(im))
    return written


def test_cifar10_reads_an_image_folder_in_its_label_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # its decode cache lives in the user cache directory
    root = tmp_path / "cifar"
    written = cifar_folder(root)
    assert list(CIFAR10.classes) == sorted(CIFAR10.classes), "sorted folders must give CIFAR-10's label order"
    source = CIFAR10(root=str(root), download=False)
    images = source.load()
    assert images.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    assert images.train_x.shape == (20, 3, 32, 32) and torch.equal(images.test_x[19], written["test"][19])
    assert images.mean == CIFAR10.mean and images.std == CIFAR10.std and images.augment
    assert source.name == "cifar10-images"  # lossless files: not a JPEG copy, nor the original's order
    assert list((tmp_path / "home" / ".cache" / "fedcoe_bench" / "images").glob("*.pt"))
    torchvision_key = FederatedData(CIFAR10(root=str(tmp_path / "elsewhere")), num_clients=2).key(0)
    assert FederatedData(source, num_clients=2).key(0) != torchvision_key, "its pool order is its own"


def test_cifar10_names_a_jpeg_folder_and_prefers_torchvision_files(tmp_path, monkeypatch):
    from test_sources import fake_rows, write_batch

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "cifar"
    cifar_folder(root, "JPEG")
    assert CIFAR10(root=str(root), download=False).name == "cifar10-jpeg"
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_batch(folder / name, fake_rows(1, seed=0), [7], "labels")
    source = CIFAR10(root=str(root), download=False)
    assert source.name == "cifar10" and source.load().train_y.tolist() == [7] * 5


def test_cifar10_refuses_an_image_folder_of_other_classes(tmp_path):
    root = small_folder(tmp_path / "pets")
    with pytest.raises(DataError) as info:
        CIFAR10(root=str(root), download=False).load()
    msg = str(info.value)
    assert "cat, dog" in msg and "airplane, automobile" in msg and "\n" not in msg


def test_cifar10_not_found_names_both_layouts(tmp_path):
    root = tmp_path / "nothing_here"
    with pytest.raises(DataError) as info:
        CIFAR10(root=str(root), download=False).load()
    msg = str(info.value)
    assert str((root / "cifar-10-batches-py").resolve()) in msg and str((root / "train").resolve()) + "/<class>/" in msg
    assert "torchvision.datasets.CIFAR10(" in msg and "\n" not in msg


# ---------------------------------------------------------------- the shared JPEG copy, where there is one
SHARED = next((p for p in (Path("/work/shared/data/cifar10-jpeg"),
                           Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg") if p.is_dir()), None)
# `find train test -type f -name '*.jpg' | LC_ALL=C sort | head -n 100 | xargs cat | sha256sum` in the copy: the
# README's checksum procedure over its first 100 files (test/airplane/0000.jpg to 0099.jpg)
FIRST_100_SHA256 = "5b4c99d77c29cb713b7e8f83d612d0419ccc0609b1a72c4d7b61841071ef1913"


@pytest.mark.skipif(SHARED is None, reason="no CIFAR-10 JPEG copy at /work/shared/data/cifar10-jpeg or "
                    "../shared/data/cifar10-jpeg (it exists only on the project's machines)")
def test_the_shared_cifar10_jpeg_copy_lists_as_cifar10():
    # listed, not decoded (60,000 images take about a minute): counts, order and the first files' bytes
    source = ImageFolder(str(SHARED))
    files = source.files()
    assert source.classes() == list(CIFAR10.classes)
    for split, per_class in (("train", 5000), ("test", 1000)):
        labels = np.array([label for _, label in files[split]])
        assert len(labels) == 10 * per_class and np.bincount(labels).tolist() == [per_class] * 10
        assert (np.diff(labels) >= 0).all(), "classes in label order"
    assert CIFAR10(root=str(SHARED), download=False).name == "cifar10-jpeg"  # its files are JPEGs
    every = sorted((os.path.relpath(p, SHARED) for items in files.values() for p, _ in items), key=os.fsencode)
    assert every[0] == "test/airplane/0000.jpg"
    first = every[:100]
    assert hashlib.sha256(b"".join((SHARED / p).read_bytes() for p in first)).hexdigest() == FIRST_100_SHA256
    images = [source._read(str(SHARED / p), "RGB", 32) for p in first[:5]]
    assert all(x.shape == (3, 32, 32) and x.float().std() > 10 for x in images)
