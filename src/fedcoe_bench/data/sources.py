"""Data sources: where images come from before they are split over clients.

A source is any class with a ``load()`` method that returns a :class:`Images` bundle: uint8 image
tensors ``[N, C, H, W]`` and int64 labels for a train pool and a global test split, plus the
normalisation statistics. Built-in sources and user sources use the same interface, so a user's
data plugs in with ``--data.source my_module.MySource``::

    >>> import torch
    >>> from fedcoe_bench.data import DataSource, Images
    >>> class Noise(DataSource):
    ...     num_classes, in_channels, image_size = 3, 1, 8
    ...     def load(self):
    ...         g = torch.Generator().manual_seed(0)
    ...         x = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=g)
    ...         y = torch.arange(60) % 3
    ...         return Images(x[:50], y[:50], x[50:], y[50:])
    >>> Noise().load().train_x.shape
    torch.Size([50, 1, 8, 8])
"""

from __future__ import annotations

import gzip
import pickle
import urllib.error
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fedcoe_bench.data.base import DataSource, Images, cached_tensors
from fedcoe_bench.data.imagefolder import ImageFolder
from fedcoe_bench.errors import DataError


def stratified_split(labels: np.ndarray, first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into a first part of ``first`` samples and the rest, keeping class proportions."""
    rng = np.random.default_rng(seed)
    frac = first / len(labels)
    head, tail = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(frac * len(idx))
        head.append(idx[:k])
        tail.append(idx[k:])
    head, tail = np.concatenate(head), np.concatenate(tail)
    # rounding per class can be off by a few samples: move them so that the sizes are exact
    if len(head) > first:
        head, tail = head[:first], np.concatenate([tail, head[first:]])
    elif len(head) < first:
        head, tail = np.concatenate([head, tail[: first - len(head)]]), tail[first - len(head) :]
    return np.sort(head), np.sort(tail)


def _cached(data: Path, index_files: list[Path], decode) -> list[torch.Tensor]:
    """The tensors ``decode()`` returns, kept in ``<data>.uint8.pt`` next to ``data`` and reused while
    ``index_files`` keep their size and modification time; a damaged or read-only cache only costs
    decoding again."""
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in index_files]
    return cached_tensors(data.with_name(data.name + ".uint8.pt"), stamp, decode)


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file, the MNIST on-disk format: magic, dims (big-endian int32), uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class MNIST10k(DataSource):
    """The real MNIST test set (10,000 digits, LeCun, Cortes & Burges), bundled with the package.

    A fixed stratified split (independent of the run seed) gives a 2,000-image global test set
    and an 8,000-image pool that is partitioned over clients. Data: CC BY-SA 3.0.
    """

    num_classes, in_channels, image_size = 10, 1, 28
    test_size = 2000

    def load(self) -> Images:
        folder = resources.files("fedcoe_bench.data") / "mnist10k"
        with resources.as_file(folder) as root:
            x = _read_idx(root / "t10k-images-idx3-ubyte.gz")
            y = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        test, pool = stratified_split(y, self.test_size, seed=0)
        x = torch.from_numpy(x.copy()).unsqueeze(1)
        y = torch.from_numpy(y)
        return Images(x[pool], y[pool], x[test], y[test], mean=(0.1325,), std=(0.3105,))


class FileSource(DataSource):
    """A data set read from files under ``root``: its own ``folder`` in its original format, or a
    Hugging Face ``datasets`` copy saved with ``save_to_disk`` in ``root/<name>`` (used when both lie
    there), or, for a source whose :meth:`_image_folder` gives one, an image folder ``root/train/<class>/``
    and ``root/test/<class>/`` (used when neither lies there).

    The folder is downloaded from ``url`` when none of them is found and ``download`` is true.
    Subclasses set ``folder``, ``url``, ``mean``, ``std`` and ``label_key`` and implement
    ``_read_folder`` and ``_fetch_command``.
    """

    folder: str
    url: str
    label_key = "label"
    reads_image_folders = False  # whether root/train/<class>/, root/test/<class>/ is a layout of this data set
    test_splits = ("test",)  # the Hugging Face split that serves as the global test split, first found
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, root: str = "data", download: bool = True):
        self.root = root
        self.download = download

    def fingerprint(self) -> dict:
        images = self._image_folder()
        if images is not None:  # its own pool order: a partition of the original's does not fit it
            return {"source": type(self).__name__, "image_folder": images.fingerprint()["files"]}
        return {"source": type(self).__name__}  # the data, not where it lies, defines a partition

    @property
    def _hf_copy(self) -> Path:
        return Path(self.root) / type(self).__name__.lower()

    def _image_folder(self):
        """The :class:`~fedcoe_bench.data.imagefolder.ImageFolder` to read when ``root`` holds neither the
        original folder nor a Hugging Face copy; None: this source reads no image folder, or there is none."""
        return None

    def _read_folder(self, folder: Path) -> Images:
        raise NotImplementedError

    def _fetch_command(self) -> str:
        """A shell command that puts the data under ``root`` on a machine with network."""
        raise NotImplementedError

    def _from_hf(self, path: Path) -> Images:
        import datasets

        ds = datasets.load_from_disk(str(path))
        names = ds["train"].column_names
        img_key = "img" if "img" in names else "image"
        # torchvision's key, then the Hugging Face names (cifar100 uses fine_label, cifar10 label)
        lbl_key = next(k for k in (self.label_key, self.label_key.rstrip("s"), "label") if k in names)
        if isinstance(ds["train"].features[img_key], datasets.Image):
            # some sets mix grayscale with colour images; decoding to RGB gives every image 3 channels
            ds = ds.cast_column(img_key, datasets.Image(mode="RGB"))
        ds = ds.with_format("numpy")
        test = next((s for s in self.test_splits if s in ds), None)
        if test is None:
            raise DataError(f"{self.name}: the Hugging Face copy at {path.resolve()} has no split named "
                            f"{' or '.join(self.test_splits)} (it has {', '.join(ds)}); save it with one")

        def arrays(split):
            x = np.stack(ds[split][img_key]).astype(np.uint8, copy=False)  # numpy formatting widens ints
            x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
            return x, torch.from_numpy(np.asarray(ds[split][lbl_key], dtype=np.int64))

        return Images(*arrays("train"), *arrays(test), self.mean, self.std, augment=True)

    def load(self) -> Images:
        root = Path(self.root)
        if (self._hf_copy / "dataset_dict.json").exists():
            return self._from_hf(self._hf_copy)
        images = self._image_folder()
        if images is not None:
            return images.load()
        if not (root / self.folder).is_dir() and self.download:
            from torchvision.datasets.utils import download_and_extract_archive

            try:
                download_and_extract_archive(self.url, str(root))
            except (urllib.error.URLError, OSError) as err:
                raise DataError(self._missing(f"download failed: {err}")) from None
        if not (root / self.folder).is_dir():
            raise DataError(self._missing("not found"))
        return self._read_folder(root / self.folder)

    def _missing(self, why: str) -> str:
        where = (Path(self.root) / self.folder).resolve()
        return (
            f"{self.name}: {why} at {where} (nor a Hugging Face copy at {self._hf_copy.resolve()}"
            + (f", nor an image folder {Path(self.root).resolve() / 'train'}/<class>/ with test/<class>/"
               if self.reads_image_folders else "") + "); "
            f"on a machine with network run `{self._fetch_command()}` and copy the folder here, "
            f"or set --data.source.root to where it lies"
        )


class CIFAR10(FileSource):
    """CIFAR-10 (Krizhevsky, 2009): 50,000 train / 10,000 test 32x32 colour images.

    Looks in ``root`` for the torchvision folder ``cifar-10-batches-py`` (the python pickle
    batches), a Hugging Face ``datasets`` copy saved with ``save_to_disk`` in ``root/cifar10``, or
    an image folder ``root/train/<class>/*``, ``root/test/<class>/*`` whose class folders are the
    data set's class names (sorted, they are its label order), read by
    :class:`~fedcoe_bench.data.imagefolder.ImageFolder` at 32x32 RGB with the original's
    normalisation and kept decoded in its cache; downloads the torchvision archive when none is
    there, ``download`` is true and the machine is online.

    Read from an image folder, the data set is named ``cifar10-jpeg`` when its files are JPEGs (a
    lossy re-encoding: its accuracies are not the original's) and ``cifar10-images`` otherwise, in
    run summaries and tables; its pool is in class order, so its partitions are its own.
    """

    num_classes, in_channels, image_size = 10, 3, 32
    reads_image_folders = True
    # label order (torchvision's CIFAR10.classes); sorted, as an image folder's classes are taken
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    folder = "cifar-10-batches-py"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def _read_batches(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            with open(Path(self.root) / self.folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[self.label_key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    def _read_folder(self, folder: Path) -> Images:
        return Images(
            *self._read_batches(self.train_files), *self._read_batches(self.test_files),
            self.mean, self.std, augment=True,
        )

    @property
    def name(self) -> str:
        images = self._image_folder()
        if images is None:
            return super().name
        return f"{super().name}-{'jpeg' if 'JPEG' in images.formats() else 'images'}"

    def _image_folder(self):
        root = Path(self.root)
        original = (root / self.folder).is_dir() or (self._hf_copy / "dataset_dict.json").exists()
        if original or not (root / "train").is_dir():
            return None

        images = ImageFolder(str(root), image_size=self.image_size, in_channels=self.in_channels,
                             mean=list(self.mean), std=list(self.std), augment=True)
        found = images.classes()
        if self.classes is not None and found != sorted(self.classes):
            shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
            raise DataError(f"{super().name}: the class folders of {root.resolve() / 'train'} ({shown}) are not "
                            f"{type(self).__name__}'s classes ({', '.join(self.classes)}); point --data.source.root "
                            f"at a copy of it, or read your own classes with --data.source imagefolder")
        if self.classes is None and len(found) != self.num_classes:
            raise DataError(f"{super().name}: {root.resolve() / 'train'} has {len(found)} class folders, "
                            f"{type(self).__name__} has {self.num_classes}; point --data.source.root at a copy of it")
        return images

    def _fetch_command(self) -> str:
        return (f"python -c \"import torchvision; torchvision.datasets."
                f"{type(self).__name__}('{self.root}', download=True)\"")


class CIFAR100(CIFAR10):
    """CIFAR-100 (Krizhevsky, 2009), fine labels; same folder conventions as :class:`CIFAR10`."""

    num_classes = 100
    classes = None  # its 100 fine-label folders, sorted, are its label order; only their number is checked
    folder = "cifar-100-python"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


class TinyImageNet(FileSource):
    """Tiny-ImageNet (Le & Yang, 2015; CS231n): 200 ImageNet classes, 500 train and 50 validation
    64x64 colour images each.

    Looks in ``root`` for the official folder ``tiny-imagenet-200`` (``wnids.txt``,
    ``train/<wnid>/images/<wnid>_<k>.JPEG``, ``val/images/val_<k>.JPEG`` labelled by the
    tab-separated ``val/val_annotations.txt``: file, wnid, box) or a Hugging Face ``datasets`` copy
    saved with ``save_to_disk`` in ``root/tinyimagenet`` (as ``zh-plus/tiny-imagenet``: splits
    ``train`` and ``valid``, columns ``image`` and ``label``); downloads the official zip when
    ``download`` is true and the machine is online. The validation split is the global test split
    (the official test split has no labels). Class ``i`` is the ``i``-th wnid in sorted order, in
    both formats (a copy's ``ClassLabel`` names are mapped to it). Grayscale images are decoded to
    3 channels. Decoding 110,000 JPEGs takes a while, so the tensors are kept next to the data in
    ``<folder>.uint8.pt`` and reused while the data's index files are unchanged.
    """

    num_classes, in_channels, image_size = 200, 3, 64
    folder = "tiny-imagenet-200"
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    test_splits = ("valid", "validation")
    mean = (0.4802, 0.4481, 0.3975)  # the values commonly used for its train split
    std = (0.2770, 0.2691, 0.2821)

    def _read_folder(self, folder: Path) -> Images:
        index_files = [folder / "wnids.txt", folder / "val" / "val_annotations.txt"]
        tensors = _cached(folder, index_files, lambda: self._decode_folder(folder))
        return Images(*tensors, self.mean, self.std, augment=True)

    def _decode_folder(self, folder: Path) -> tuple[torch.Tensor, ...]:
        import PIL.Image

        wnids = sorted((folder / "wnids.txt").read_text().split())
        index = {w: i for i, w in enumerate(wnids)}
        train = [(f, i) for i, w in enumerate(wnids)
                 for f in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
        val = []
        for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
            name, wnid = line.split("\t")[:2]
            if wnid not in index:
                raise DataError(f"{self.name}: {folder / 'val' / 'val_annotations.txt'} labels {name} with "
                                f"{wnid}, which is not in wnids.txt; unpack the official zip again")
            val.append((folder / "val" / "images" / name, index[wnid]))

        def arrays(files):
            # filled in place: the train split alone is 1.2 GB, a list of decoded images would double it
            x = torch.empty((len(files), 3, self.image_size, self.image_size), dtype=torch.uint8)
            for k, (path, _) in enumerate(files):
                # PIL, not torchvision.io, whose decoders are deprecated since torchvision 0.29
                with PIL.Image.open(path) as im:
                    x[k] = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            return x, torch.tensor([i for _, i in files], dtype=torch.int64)

        return (*arrays(train), *arrays(val))

    def _from_hf(self, path: Path) -> Images:
        tensors = _cached(path, [path / "dataset_dict.json"], lambda: self._decode_hf(path))
        return Images(*tensors, self.mean, self.std, augment=True)

    def _decode_hf(self, path: Path) -> tuple[torch.Tensor, ...]:
        import datasets

        images = super()._from_hf(path)
        label = datasets.load_from_disk(str(path))["train"].features["label"]
        if isinstance(label, datasets.ClassLabel):
            rank = {w: i for i, w in enumerate(sorted(label.names))}
            to_sorted = torch.tensor([rank[w] for w in label.names])
            images.train_y, images.test_y = to_sorted[images.train_y], to_sorted[images.test_y]
        return images.train_x, images.train_y, images.test_x, images.test_y

    def _fetch_command(self) -> str:
        return (f"python -c \"import datasets; datasets.load_dataset('zh-plus/tiny-imagenet')"
                f".save_to_disk('{Path(self.root) / self.name}')\"")


class Synthetic(DataSource):
    """Generated class-conditional images for fast tests: a fixed random prototype per class + noise.

    Generated in chunks straight into uint8, so pools of millions of small images (e.g. 8x8) take
    seconds and little more memory than the images themselves.
    """

    # images per chunk: a multiple of 16, so the noise is the one-shot stream's; small enough (4 MiB of
    # float noise for 16x16 images) that freed chunks do not stay in the process as heap
    chunk = 1 << 12

    def __init__(self, num_classes: int = 10, samples: int = 2000, test_samples: int = 400,
                 image_size: int = 12, in_channels: int = 1, noise: float = 60.0, seed: int = 0):
        self.num_classes, self.samples, self.test_samples = num_classes, samples, test_samples
        self.image_size, self.in_channels, self.noise, self.seed = image_size, in_channels, noise, seed

    def load(self) -> Images:
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.in_channels, self.image_size, self.image_size)
        protos = torch.rand((self.num_classes, *shape), generator=g) * 255
        n = self.samples + self.test_samples
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        x = torch.empty((n, *shape), dtype=torch.uint8)
        for i in range(0, n, self.chunk):
            part = y[i : i + self.chunk]
            noise = torch.randn((len(part), *shape), generator=g).mul_(self.noise)
            x[i : i + self.chunk] = noise.add_(protos[part]).clamp_(0, 255)
        s = self.samples
        return Images(x[:s], y[:s], x[s:], y[s:])


SOURCES = {"mnist10k": MNIST10k, "cifar10": CIFAR10, "cifar100": CIFAR100, "synthetic": Synthetic,
           "tinyimagenet": TinyImageNet}
