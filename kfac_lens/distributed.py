"""Averages over cases that are spread over the processes of a ``torch.distributed`` group.

The Fisher and every K-FAC statistic are means over cases (docs/math.md §2–§3), so each rank sums over its
own shard, the sums are all-reduced, and every rank divides by the global count N. :class:`CaseShards` is the
one object the curvature functions and the optimizer use for this; with ``distributed=None`` (the default)
all its operations are no-ops and nothing needs ``torch.distributed``.

``distributed`` is ``None``/``False`` (one process), ``True`` (the default process group) or a
``ProcessGroup``. Random streams (sampled targets, the optimizer's subsets) differ between ranks: rank r seeds
its generator with :func:`rank_seed` ``(seed, r)``, so that the shards are sampled independently and the run
is reproducible for a fixed number of ranks.
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A rank failed inside a collective computation; raised on every rank, naming the failed ones."""


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generator: ``seed`` itself on rank 0, a hash of (seed, rank) elsewhere."""
    if rank == 0:
        return int(seed)
    return int.from_bytes(hashlib.sha256(f"kfac_lens:{int(seed)}:{int(rank)}".encode()).digest()[:7], "little")


class CaseShards:
    """The cases of one computation, sharded over the ranks of ``group`` (None: all on this process)."""

    def __init__(self, distributed=None):
        if distributed is None or distributed is False:
            self.group, self._active = None, False
        elif distributed is True or isinstance(distributed, dist.ProcessGroup):
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("distributed=... needs an initialised process group: call "
                                 "torch.distributed.init_process_group(...) first (torchrun sets its "
                                 "environment), or pass distributed=None for one process.")
            self.group = None if distributed is True else distributed
            self._active = True
        else:
            raise ValueError(f"distributed must be None, False, True (the default process group) or a "
                             f"torch.distributed.ProcessGroup, got {distributed!r}.")

    @property
    def active(self) -> bool:
        return self._active

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def seed(self, seed: int | None) -> int | None:
        """This rank's seed for a computation seeded with ``seed`` (:func:`rank_seed`)."""
        return None if seed is None or not self.active else rank_seed(seed, self.rank)

    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) each tensor in place; a no-op on one process."""
        if self.active:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def sum_scalars(self, values: list[float], like: torch.Tensor | None = None) -> list[float]:
        """The sums over ranks of a few Python numbers (one collective)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device(like))
        self.sum_(t)
        return t.tolist()

    def mean_(self, tensors: list[torch.Tensor], n: int) -> int:
        """Turn each tensor, a mean over this rank's ``n`` cases, into the mean over every rank's cases, in
        place and in one collective (packed in float64); returns the global count."""
        if not self.active:
            return int(n)
        like = tensors[0]
        buf = torch.cat([t.reshape(-1).double() * n for t in tensors]
                        + [torch.tensor([float(n)], dtype=torch.float64, device=like.device)])
        self.sum_(buf)
        total = float(buf[-1])
        offset = 0
        for t in tensors:
            t.copy_((buf[offset:offset + t.numel()] / total).view(t.shape))
            offset += t.numel()
        return int(total)

    def global_count(self, n: int, what: str = "X", like: torch.Tensor | None = None) -> int:
        """N over all ranks; an empty shard on any rank is a ``ValueError`` naming it, raised on every rank."""
        if not self.active:
            return int(n)
        counts = torch.zeros(self.world_size, dtype=torch.float64, device=self._device(like))
        counts[self.rank] = n
        self.sum_(counts)
        empty = [r for r, c in enumerate(counts.tolist()) if c == 0]
        if empty:
            raise ValueError(f"{what} is empty on rank(s) {empty} of {self.world_size}: every rank must pass at "
                             "least one case of its shard.")
        return int(counts.sum().item())

    def run(self, compute: Callable[[], T], what: str) -> T:
        """``compute()`` on this rank, then a check that every rank succeeded before any collective that
        follows: a rank that raised makes every rank raise :class:`DistributedError` (with the failed ranks'
        messages) instead of leaving the others waiting in an all-reduce."""
        if not self.active:
            return compute()
        result, failure = None, None
        try:
            result = compute()
        except Exception as exc:  # reported to every rank below, then re-raised here
            failure = exc
        message = None if failure is None else "".join(traceback.format_exception_only(failure)).strip()
        messages: list = [None] * self.world_size
        dist.all_gather_object(messages, message, group=self.group)
        failed = {r: m for r, m in enumerate(messages) if m is not None}
        if failed:
            lines = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
            raise DistributedError(f"{what} failed on rank(s) {sorted(failed)} of {self.world_size}: {lines}") \
                from failure
        return result

    def _device(self, like: torch.Tensor | None) -> torch.device:
        if like is not None:
            return like.device
        backend = dist.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
