"""Run a function on several ``torch.distributed`` ranks (gloo on 127.0.0.1) and collect what each returns.

``KFAC_LENS_TEST_BACKEND=nccl`` (set by ``kfac-lens gpu-check`` on machines with 2+ GPUs) runs the ranks over
NCCL, rank r on ``cuda:r``. A rank that does not finish within the time limit fails the test (no hang).
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKEND = os.environ.get("KFAC_LENS_TEST_BACKEND", "gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world_size: int, port: int, folder: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if BACKEND == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(BACKEND, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world_size, device, *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    except BaseException as exc:  # the parent reads it and reports it
        (Path(folder) / f"rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 120.0) -> list:
    """``fn(rank, world_size, device, *args)`` on each rank; returns each rank's result or its exception
    text (a string starting with the exception's class name)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, folder, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"rank(s) {hung} did not finish within {timeout} s")
        out = []
        for r in range(world_size):
            err = Path(folder) / f"rank{r}.err"
            out.append(err.read_text() if err.exists() else torch.load(Path(folder) / f"rank{r}.pt",
                                                                        weights_only=False))
        return out
