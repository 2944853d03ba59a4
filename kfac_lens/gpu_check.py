"""``kfac-lens gpu-check``: one command that exercises the CUDA paths on a GPU machine (at most ~5 minutes).

Steps, each a child process with its own time limit, its log kept in ``--out``:

1. ``tests``: the device-parametrised tests (those taking the ``device`` fixture) with ``-k cuda``, so every
   curvature object computed on the GPU is checked against the float64 oracle evaluated on the CPU;
2. ``agreement``: the exact Fisher, F̃ and both inverses of a tanh network on CUDA against the CPU;
3. ``bench-fisher``: ``kfac-lens bench fisher --device cuda``;
4. ``bench-optimizer``: ``kfac-lens bench optimizer --quick --device cuda``;
5. ``figures``: ``kfac-lens figures --device cuda`` on the example network (from the zoo cache where
   ``$KFAC_LENS_DATA`` holds one, else trained there on digits);
6. ``distributed``: the distributed tests over NCCL, when 2 or more GPUs are present and those tests exist.

Without a CUDA device it says so and checks nothing (exit status 0, since there is nothing to fail).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_FIXTURE = re.compile(r"def test_\w+\([^)]*\bdevice\b", re.S)


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict[str, str] | None = None


def device_test_files(tests: Path) -> list[str]:
    """The test files that hold at least one test taking the ``device`` fixture."""
    return sorted(str(p) for p in tests.glob("test_*.py") if DEVICE_FIXTURE.search(p.read_text()))


def agreement_table(device: str = "cuda"):
    """Exact F, F̃ and both inverses of a 256-20-20-10 tanh network on ``device`` against the CPU (float64)."""
    import pandas as pd
    import torch
    from torch import nn

    from . import block_diagonal_inverse, block_tridiagonal_inverse, exact_fisher, kronecker_factors

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                        nn.Linear(20, 10)).double()
    X = torch.randn(2000, 256, dtype=torch.float64)
    results = {}
    for where in ("cpu", device):
        model, x = net.to(where), X.to(where)
        t0 = time.perf_counter()
        F = exact_fisher(model, x, "categorical")
        f = kronecker_factors(model, x, "categorical")
        mats = {"exact F": F, "F̃": f.dense(), "F̆⁻¹ (γ=0.01)": block_diagonal_inverse(f, 0.01).dense(),
                "F̂⁻¹ (γ=0.01)": block_tridiagonal_inverse(f, 0.01).dense()}
        if where != "cpu":
            torch.cuda.synchronize()
        results[where] = ({k: v.cpu() for k, v in mats.items()}, time.perf_counter() - t0)
    rows = []
    for name, ref in results["cpu"][0].items():
        got = results[device][0][name]
        rows.append({"object": name, "P": ref.shape[0],
                     "rel. difference (cuda vs cpu)": float((got - ref).norm() / ref.norm())})
    table = pd.DataFrame(rows)
    table.attrs["seconds"] = {where: r[1] for where, r in results.items()}
    return table


def steps(out: Path, python: str, quick: bool) -> list[Step]:
    tests = device_test_files(ROOT / "tests")
    cli = [python, "-m", "kfac_lens.cli"]
    plan = [
        Step("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", *tests], 120),
        Step("agreement", [python, "-m", "kfac_lens.gpu_check", "--agreement-only"], 45),
        Step("bench-fisher", [*cli, "bench", "fisher", "--device", "cuda",
                              *(["--quick"] if quick else [])], 60),
        Step("bench-optimizer", [*cli, "bench", "optimizer", "--quick", "--device", "cuda"], 60),
        Step("figures", [*cli, "figures", "--device", "cuda", "--quiet", "--out", str(out / "figures"),
                         "--fig", "5", "6", "exact", "inverse", "cumulants",
                         *([] if _has_zoo_cache() else ["--data", "digits"])], 120),
    ]
    distributed = sorted(str(p) for p in (ROOT / "tests").glob("test_distributed*.py"))
    import torch
    if distributed and torch.cuda.device_count() >= 2:
        plan.append(Step("distributed", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *distributed],
                         120, env={"KFAC_LENS_TEST_BACKEND": "nccl"}))
    return plan


def _has_zoo_cache() -> bool:
    from .zoo import default_zoo_dir
    return any(default_zoo_dir().glob("example-mnist-quick-*.pt"))


def describe_cuda() -> str:
    import torch
    if not torch.cuda.is_available():
        return (f"no CUDA device: torch {torch.__version__} (built with CUDA {torch.version.cuda}) sees no GPU, "
                "so nothing was checked. Run this on a machine with an NVIDIA GPU and a CUDA build of torch.")
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30
    return (f"{torch.cuda.device_count()} CUDA device(s): {names} ({mem:.0f} GiB); torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def run(out: Path, quick: bool = False, only: list[str] | None = None) -> int:
    """Run every step; print one summary line per step and write ``gpu_check.csv`` to ``out``."""
    import pandas as pd
    import torch

    print(f"kfac-lens gpu-check: {describe_cuda()}", flush=True)
    if not torch.cuda.is_available():
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "KFAC_LENS_QUIET": "1", "PYTHONUNBUFFERED": "1"}
    for step in steps(out, sys.executable, quick):
        if only and step.name not in only:
            continue
        print(f"\n=== {step.name}: {' '.join(step.argv[1:])}", flush=True)
        t0 = time.perf_counter()
        log = out / f"{step.name}.log"
        try:
            proc = subprocess.run(step.argv, cwd=ROOT, env={**env, **(step.env or {})}, timeout=step.timeout_s,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            text, status = proc.stdout, "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired as exc:
            text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            status = f"timed out after {step.timeout_s:.0f} s"
        log.write_text(text)
        print(text[-6000:], flush=True)
        rows.append({"step": step.name, "status": status, "seconds": round(time.perf_counter() - t0, 1)})
    table = pd.DataFrame(rows)
    table.to_csv(out / "gpu_check.csv", index=False)
    print("\nkfac-lens gpu-check summary\n" + table.to_string(index=False), flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def main(argv=None, prog: str = "kfac-lens gpu-check") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check", help="folder for the logs and gpu_check.csv "
                                                      "(default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small benchmark sizes")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (names as in the summary)")
    p.add_argument("--agreement-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.agreement_only:
        table = agreement_table()
        print(table.to_string(index=False))
        print("seconds (exact F, F̃ and both inverses): "
              + ", ".join(f"{k} {v:.2f}" for k, v in table.attrs["seconds"].items()))
        worst = table["rel. difference (cuda vs cpu)"].max()
        return 0 if worst < 1e-9 else 1
    return run(Path(args.out), quick=args.quick, only=args.only)


if __name__ == "__main__":
    sys.exit(main())
