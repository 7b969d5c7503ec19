"""Any user's images as a data source: one folder per class and split, as torchvision's ImageFolder reads them.

::

    root/train/<class>/<file>    the pool, dealt out to clients
    root/test/<class>/<file>     the global test split

``fedbench fit --data.source imagefolder --data.source.root DIR`` reads such a folder; the CIFAR-10 source
reads one through this class too (``root/train/airplane/...``, as the JPEG copy on the project's machines).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fedcoe_bench.data.base import DataSource, Images, cached_tensors
from fedcoe_bench.errors import DataError

SPLITS = ("train", "test")
# Pillow modes without colour: such images keep one channel unless another image of the folder has colour
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def readable_extensions() -> tuple[str, ...]:
    """File extensions of the formats this Pillow can open (``.jpg``, ``.png``, ``.bmp``, ``.webp``, ...)."""
    from PIL import Image

    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


class ImageFolder(DataSource):
    """Images in class folders under ``root/train`` and ``root/test`` (torchvision's ``ImageFolder``
    conventions, by its own ``find_classes`` and ``make_dataset``): class ``i`` is the ``i``-th folder name
    in sorted order, in both splits; files are taken in sorted order, nested folders walked, and any file
    whose extension Pillow can open is an image (others, such as a README, are left alone). Both splits
    must have the same class folders, each with at least one image.

    Images are made alike, so that they stack into one uint8 tensor:

    - channels: ``in_channels`` when given (1 or 3), else 3 if any image of either split has colour
      (Pillow's modes other than 1, L, LA, I, F), else 1; Pillow converts each image (a palette is
      expanded, an alpha channel dropped);
    - size: ``image_size`` when given, else the shorter side of the most common size among the train
      images (the larger on a tie); an image of any other size, or not square, has its shorter side
      resized to it (bilinear, antialiased) and its centre cropped square (``PIL.ImageOps.fit``, what
      torchvision's ``Resize`` + ``CenterCrop`` do).

    Decoding runs once: the tensors are kept in ``cache_dir`` (a file per folder and setting, never next
    to the images, which may be read-only) with a digest of every file's relative path, size and
    modification time, and decoded afresh when any of them changes. Normalisation uses ``mean`` and
    ``std`` when given, else the train split's per-channel statistics (kept in the cache too).
    ``augment`` turns on random crop + horizontal flip during local training, right for natural images
    (CIFAR's usual augmentation), wrong for digits or text.

    The data set is named after its folder (``root``'s last part) in run summaries and tables.

    Args:
        root: the folder that holds ``train/`` and ``test/``.
        image_size: side of the square every image is made (default: the shorter side of the train split's most
            common size).
        in_channels: 1 (grayscale) or 3 (RGB) (default: 3 if any image has colour, else 1).
        mean: per-channel normalisation mean in [0, 1] (default: the train split's).
        std: per-channel normalisation std (default: the train split's).
        augment: random crop (pad 4) + horizontal flip during local training.
        cache_dir: where the decoded images are kept.
    """

    def __init__(self, root: str, image_size: int | None = None, in_channels: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, augment: bool = True,
                 cache_dir: str = os.path.join("~", ".cache", "fedcoe_bench", "images")):
        if in_channels not in (None, 1, 3):
            raise DataError(f"data.source.in_channels must be 1 or 3 (got {in_channels}), or left out to infer it")
        if image_size is not None and image_size < 1:
            raise DataError(f"data.source.image_size must be >= 1 (got {image_size}), or left out to infer it")
        for key, value in (("mean", mean), ("std", std)):
            if value is not None and in_channels is not None and len(value) != in_channels:
                raise DataError(f"data.source.{key} has {len(value)} values for {in_channels} channels; "
                                f"give one per channel")
        if std is not None and min(std) <= 0:
            raise DataError(f"data.source.std must be > 0 (got {list(std)})")
        self.root, self.augment, self.cache_dir = root, augment, cache_dir
        self.given_size, self.given_channels = image_size, in_channels
        self.given_mean, self.given_std = mean, std
        self._shape: tuple[int, int] | None = None  # (channels, side) of the last load
        self.classes()  # a missing split or mismatched classes fail when the config is read, as other bad values

    # ------------------------------------------------------------------ what the model is sized by
    @property
    def name(self) -> str:
        return Path(self.root).expanduser().resolve().name or "imagefolder"

    @property
    def num_classes(self) -> int:
        return len(self.classes())

    @property
    def in_channels(self) -> int:
        return self.given_channels or self._inferred_shape()[0]

    @property
    def image_size(self) -> int:
        return self.given_size or self._inferred_shape()[1]

    def _inferred_shape(self) -> tuple[int, int]:
        if self._shape is None:
            self.load()  # decodes (or reads the cache) once; load() records the shape
        return self._shape

    # ------------------------------------------------------------------ the files
    def classes(self) -> list[str]:
        """The class folder names, sorted: the same in both splits, or a :class:`DataError`."""
        from torchvision.datasets.folder import find_classes

        root = Path(self.root).expanduser()
        found = {}
        for split in SPLITS:
            folder = root / split
            if not folder.is_dir():
                raise DataError(f"{self.name}: no folder {folder.resolve()}; an image folder holds train/<class>/* "
                                f"and test/<class>/* (set --data.source.root to the folder that holds both)")
            try:
                found[split] = find_classes(str(folder))[0]
            except FileNotFoundError:
                raise DataError(f"{self.name}: {folder.resolve()} has no class folders; put each class's images "
                                f"in {split}/<class>/") from None
        if found["train"] != found["test"]:
            train, test = set(found["train"]), set(found["test"])
            only = [f"only in {s}: {', '.join(sorted(a - b))}"
                    for s, a, b in (("train", train, test), ("test", test, train)) if a - b]
            raise DataError(f"{self.name}: train and test of {root.resolve()} must have the same class folders "
                            f"({'; '.join(only)}); add or remove folders so that they match")
        return found["train"]

    def files(self) -> dict[str, list[tuple[str, int]]]:
        """``{split: [(path, class index), ...]}`` in torchvision's order (classes, then files, sorted)."""
        from torchvision.datasets.folder import make_dataset

        classes = self.classes()
        index = {c: i for i, c in enumerate(classes)}
        out = {}
        for split in SPLITS:
            folder = Path(self.root).expanduser() / split
            try:
                out[split] = make_dataset(str(folder), index, extensions=readable_extensions())
            except FileNotFoundError:
                empty = [c for c in classes if not _has_image(folder / c)]
                raise DataError(f"{self.name}: no image in {folder.resolve() / empty[0]}"
                                + (f" (nor in {len(empty) - 1} more class folders)" if len(empty) > 1 else "")
                                + "; every class needs images in both splits, in a format Pillow opens "
                                "(.jpg, .png, .bmp, ...)") from None
        return out

    def formats(self) -> set[str]:
        """Pillow's names of the files' formats, by extension (e.g. ``{"JPEG"}``); no file is opened."""
        from PIL import Image

        ext = Image.registered_extensions()
        return {ext[os.path.splitext(p)[1].lower()] for items in self.files().values() for p, _ in items}

    def fingerprint(self) -> dict:
        # a partition depends on the labels in pool order, which the relative paths fix; not on where
        # the folder lies or on its pixels
        files = _digest(self.files(), Path(self.root).expanduser(), stat=False)
        return {"source": f"{type(self).__module__}.{type(self).__qualname__}", "files": files}

    # ------------------------------------------------------------------ decoding
    def load(self) -> Images:
        files = self.files()
        root = Path(self.root).expanduser()
        # a cache file per folder and setting; its stamp notices a changed file
        where = root.resolve()
        key = hashlib.sha256(f"{where}|{self.given_size}|{self.given_channels}".encode()).hexdigest()[:16]
        path = Path(self.cache_dir).expanduser() / f"{where.name}-{key}.uint8.pt"
        train_x, train_y, test_x, test_y, mean, std = cached_tensors(path, _digest(files, root, stat=True),
                                                                     lambda: self._decode(files))
        self._shape = (train_x.shape[1], train_x.shape[2])
        mean = tuple(self.given_mean) if self.given_mean is not None else tuple(mean.tolist())
        std = tuple(self.given_std) if self.given_std is not None else tuple(std.tolist())
        if len(mean) != train_x.shape[1] or len(std) != train_x.shape[1]:
            raise DataError(f"{self.name}: data.source.mean and std need one value per channel "
                            f"({train_x.shape[1]}), got {len(mean)} and {len(std)}")
        return Images(train_x, train_y, test_x, test_y, mean, std, augment=self.augment)

    def _decode(self, files: dict[str, list[tuple[str, int]]]) -> tuple[torch.Tensor, ...]:
        channels, side = self.given_channels, self.given_size
        if channels is None or side is None:
            channels, side = self._common_shape(files, channels, side)
        out = []
        for split in SPLITS:
            # filled in place: a list of decoded images would double the peak memory
            x = torch.empty((len(files[split]), channels, side, side), dtype=torch.uint8)
            for k, (path, _) in enumerate(files[split]):
                x[k] = self._read(path, "L" if channels == 1 else "RGB", side)
            out += [x, torch.tensor([label for _, label in files[split]], dtype=torch.int64)]
        return (*out, *_channel_stats(out[0]))

    def _common_shape(self, files, channels: int | None, side: int | None) -> tuple[int, int]:
        """The rule of the class docstring, from the files' headers (Pillow opens lazily: no pixel is decoded)."""
        from PIL import Image

        sizes, colour = Counter(), False
        for split in SPLITS:
            for path, _ in files[split]:
                try:
                    with Image.open(path) as im:
                        if split == "train":
                            sizes[im.size] += 1
                        colour = colour or im.mode not in GREY_MODES
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                    raise _unreadable(path, err) from None
        if side is None:
            (w, h), _ = max(sizes.items(), key=lambda item: (item[1], min(item[0])))
            side = min(w, h)
        return channels or (3 if colour else 1), side

    def _read(self, path: str, mode: str, side: int) -> torch.Tensor:
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != (side, side):
                    im = ImageOps.fit(im, (side, side), Image.Resampling.BILINEAR)
                pixels = np.array(im)  # a writable copy: torch warns about read-only numpy memory
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise _unreadable(path, err) from None
        return torch.from_numpy(pixels.reshape(side, side, -1)).permute(2, 0, 1)


def _unreadable(path: str, err: Exception) -> DataError:
    why = " ".join(str(err).split()) or type(err).__name__
    return DataError(f"cannot decode image {Path(path).resolve()} ({why}); replace or delete the file")


def _has_image(folder: Path) -> bool:
    ext = readable_extensions()
    return any(f.lower().endswith(ext) for _, _, names in os.walk(folder, followlinks=True) for f in names)


def _digest(files: dict[str, list[tuple[str, int]]], root: Path, stat: bool) -> str:
    """sha256 of every file's path relative to ``root`` (which fixes its split and class), with its size
    and modification time when ``stat``."""
    h = hashlib.sha256()
    for split in SPLITS:
        for path, _ in files[split]:
            line = os.path.relpath(path, root)
            if stat:
                st = os.stat(path)
                line += f"\t{st.st_size}\t{st.st_mtime_ns}"
            h.update(line.encode() + b"\n")
    return h.hexdigest()


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 ``x`` scaled to [0, 1] (float64 sums over chunks: no float copy of ``x``)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    square = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].double().div_(255)
        total += part.sum(dim=(0, 2, 3))
        square += part.square().sum(dim=(0, 2, 3))
    n = x.numel() / x.shape[1]
    mean = total / n
    return mean, (square / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
