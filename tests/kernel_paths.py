"""Run test files under every CPU kernel path this machine can simulate, and print a table.

    python tests/kernel_paths.py                        # the numerics-heavy files, every path, 1 and 2 threads
    python tests/kernel_paths.py --threads 1 --files tests/test_model.py

Floats round differently with torch's vector kernels (ATEN_CPU_CAPABILITY lowers them from what the CPU
has: default, avx2, avx512), with MKL's code path (MKL_CBWR: unset, AVX2, COMPATIBLE) and with the
number of threads (OMP_NUM_THREADS; conftest.py uses one thread unless it is set). A test that holds on
one of these paths only compares two computations more tightly than what they compute allows; every
path must pass. .ci/run runs these files a second time under one other path.
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_model.py", "tests/test_diffusion.py", "tests/test_nara.py", "tests/test_gpu_path.py",
         "tests/test_train.py", "tests/test_ablations.py", "tests/test_eval.py"]
ORDER = ["default", "avx2", "avx512"]


def capabilities():
    """The kernel paths torch can take on this CPU: up to the one it picks by itself."""
    import torch
    best = torch.backends.cpu.get_cpu_capability().lower()
    best = next((c for c in reversed(ORDER) if best.startswith(c)), "default")
    return ORDER[:ORDER.index(best) + 1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="+", default=FILES, help="test files (default: the numerics-heavy ones)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts (default: 1 2)")
    ap.add_argument("--capabilities", nargs="+", default=None, choices=ORDER,
                    help="ATEN_CPU_CAPABILITY values (default: every one this CPU has)")
    ap.add_argument("--mkl", nargs="+", default=["", "AVX2", "COMPATIBLE"],
                    help="MKL_CBWR values, '' for unset (default: '' AVX2 COMPATIBLE)")
    args = ap.parse_args(argv)
    failed = []
    print("| ATEN_CPU_CAPABILITY | MKL_CBWR | threads | passed | failed | s |\n|---|---|---|---|---|---|",
          flush=True)
    for cap, mkl, threads in itertools.product(args.capabilities or capabilities(), args.mkl, args.threads):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": str(threads)}
        env.pop("MKL_CBWR", None)
        if mkl:
            env["MKL_CBWR"] = mkl
        t0 = time.time()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                              *args.files], cwd=ROOT, env=env, capture_output=True, text=True)
        count = lambda what: sum(int(n) for n in re.findall(rf"(\d+) {what}", run.stdout.splitlines()[-1]))  # noqa: E731
        passed, fails = count("passed"), count("failed") + count("error")
        print(f"| {cap} | {mkl or 'unset'} | {threads} | {passed} | {fails} | {time.time() - t0:.0f} |", flush=True)
        failed += [f"{cap} {mkl or 'unset'} {threads}: {m}" for m in
                   re.findall(r"^(?:FAILED|ERROR) (\S+)", run.stdout, re.M)]
        for line in re.findall(r"^(?:FAILED|ERROR) .*$", run.stdout, re.M):
            print(f"    {line}", flush=True)
        if run.returncode not in (0, 1):
            failed.append(f"{cap} {mkl or 'unset'} {threads}: pytest exited {run.returncode}")
    print("\n".join(failed) or "every path passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
