"""The quick start's headline, measured: `python train.py` at seeds 0-4 on two CPU kernel paths.

    python benchmarks/default_run.py              # 10 runs, two at a time, one thread each (--jobs)
    python benchmarks/default_run.py --seeds 0    # a shorter check

Each run is the README's command as typed (`python train.py --seed S`, the bundled default), on this
machine's own kernel path and on torch's portable kernels with MKL's compatible code path
(ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE): the same seed on another path rounds differently, so
it is another draw of the same run. Writes benchmarks/results/default_run.md (the table and the range
the README quotes) and default_run.json (every run, with the machine it ran on).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PATHS = {"native": {}, "default-compatible": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}}


def run(path, seed, work):
    """One `python train.py --seed S` on one kernel path: its headline, best validation loss and time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **PATHS[path]}
    out = Path(work) / f"{path}-seed{seed}"
    t0 = time.time()
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--out", str(out)],
                         env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"train.py --seed {seed} on {path} failed:\n{res.stderr[-2000:]}")
    head = re.search(r"base ([\d.]+) % -> nara ([\d.]+) %", res.stdout)
    best = re.search(r"best validation loss ([\d.]+)", res.stdout)
    machine = json.loads((out / "run.json").read_text())["machine"]
    return {"path": path, "seed": seed, "base": float(head.group(1)), "accuracy": float(head.group(2)),
            "best_val_loss": float(best.group(1)), "seconds": round(time.time() - t0), "machine": machine}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default: 0-4)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the .md and .json go")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each; more than the machine's "
                    "cores slows every run down (default: 2)")
    args = ap.parse_args(argv)
    jobs = [(p, s) for s in args.seeds for p in PATHS]
    with tempfile.TemporaryDirectory(prefix="default-run-") as work, ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run(*job, work), jobs))
    acc, val, sec = ([r[k] for r in runs] for k in ("accuracy", "best_val_loss", "seconds"))
    m = runs[0]["machine"]
    lines = ["# The quick start's headline over seeds and kernel paths", "",
             f"`python benchmarks/default_run.py`, {time.strftime('%Y-%m-%d')}: `python train.py --seed S` "
             f"as typed, one thread each, {args.jobs} run(s) at a time on {m['cpu']} ({os.cpu_count()} cores), torch "
             f"{m['torch']}. native: torch's {m['cpu_capability']} kernels; default-compatible: "
             "ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE.", "",
             f"**Range over {len(runs)} runs: NaRA {min(acc):.0f}-{max(acc):.0f} % (base "
             f"{min(r['base'] for r in runs):.0f}-{max(r['base'] for r in runs):.0f} %), best validation loss "
             f"{min(val):.4f}-{max(val):.4f}, {min(sec) / 60:.1f}-{max(sec) / 60:.1f} min per run.**", "",
             "| kernel path | seed | base % | NaRA % | best val loss | s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['seed']} | {r['base']:.1f} | {r['accuracy']:.1f} | {r['best_val_loss']:.4f} | "
              f"{r['seconds']} |" for r in runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_run.md").write_text("\n".join(lines) + "\n")
    (out / "default_run.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
