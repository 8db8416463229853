"""Every method side by side on a bundled miniature: the paper's comparison, over seeds.

    python benchmarks/methods.py                          # the default run's task (arith), every method
    python benchmarks/methods.py --task instruct          # the instruct miniature (see data/make_data.py)
    python benchmarks/methods.py --quick                  # seeds 0-1 at the learning rates the full run chose
    python benchmarks/methods.py --task instruct --lr-from nara --arm nara --arm "nara --condition density" \\
        --arm "nara --stage1 0.3" --name ablation     # an ablation table at nara's chosen learning rate

The protocol, fixed before any result was seen, is the same for every arm (an arm is a method plus
any train.py flags) and every task:
  - train.py on the task's base and training file: 300 updates of 16 sequences (max 64 tokens),
    rank 8 on q/k/v/o, dropout 0.05, s = 1, η = 0.1, 20 virtual tokens for the prompt methods,
    validation every 30 updates on the held-out split, the best adapter kept;
  - learning rate: each arm runs at 1e-3, 3e-3, 1e-2 and 3e-2 with seed 0; the one with the lowest
    best validation loss is kept (never the test set); then seeds 1-4 at that rate;
  - the kept (best-validation) adapter of seeds 0-4 is scored on the task's test file by generation
    (greedy, low-confidence remasking, early termination; last-number scoring) and gives the loss per
    masked token at λ = 0.1 ... 1.0 on the test answers (Figure 1; the same masks for every model);
    NaRA arms also give ‖C(λ) − I‖ and ‖ΔW(λ)‖ averaged over layers (Figure 3);
  - the table reports mean ± standard deviation over the 5 seeds and the mean wall time of a run.
Added after the arith results, as reporting only (the same runs): each arm's best validation loss minus the
first arm's at the same seed (a seed fixes the validation split), and, for ablations of one method,
--lr-from ARM (no sweep: the rate the comparison chose for ARM) with --seeds N.
Runs are cached under runs/methods/: finished runs are reused, an interrupted training starts over, a
trained run whose scoring stopped is only scored again. Two worker processes of one thread each share
the machine's 2 cores. Results go to benchmarks/results/.
"""
import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = {
    "arith": dict(model="data/base", data="data/arith/train.json", test="data/arith/test.json", val_size=30,
                  gen=dict(gen_length=16, steps=16, block_length=16)),
    "instruct": dict(model="data/instruct/base", data="data/instruct/train.json", test="data/instruct/test.json",
                     val_size=100, gen=dict(gen_length=32, steps=32, block_length=8)),
}
PROTOCOL = dict(train=["--max-updates", "300", "--batch-size", "16", "--eval-every", "30", "--adapter-rank", "8",
                       "--max-length", "64"],
                lrs=(1e-3, 3e-3, 1e-2, 3e-2), seeds=(0, 1, 2, 3, 4),
                arms=("lora", "nara-c", "multi-lora", "nara", "nara --embedding-width 16 --hyper-hidden 16,16", "dora",
                      "hira", "prompt-tuning", "p-tuning"), test_items=None)
SMOKE = dict(train=["--max-updates", "4", "--batch-size", "4", "--eval-every", "2", "--adapter-rank", "2", "--max-length", "64"],
             lrs=(1e-3, 1e-2), seeds=(0, 1), arms=("lora", "nara"), test_items=8)
LAMS = [round(0.1 * k, 1) for k in range(1, 11)]


def slug(text):
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text.replace(" --", "_")).strip("_")


# ---------------------------------------------------------------- one run (in a worker process)
def test_set(task, tok, eos, limit=None):
    """The test file's prompts and gold outputs as padded SFT rows (for the noise curve)."""
    import torch
    from diffusion import pad_sft
    from model import sft_pair
    examples = json.loads((ROOT / TASKS[task]["test"]).read_text())[:limit]
    pairs = [sft_pair(tok, e["instruction"], e["output"], eos) for e in examples]
    L = max(len(p) + len(a) for p, a in pairs)
    rows = [pad_sft(p, a, L, eos) for p, a in pairs]
    return examples, torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def score(task, model, tok, limit=None):
    """Test accuracy by generation, the Figure 1 curve and (NaRA) the Figure 3 sizes of one model."""
    import eval as ev
    examples, ids, answer = test_set(task, tok, model.config.eos_token_id, limit)
    acc, _ = ev.accuracy(model.eval(), tok, examples, **TASKS[task]["gen"])
    out = {"accuracy": acc, "curve": {str(k): v for k, v in ev.noise_curve(model, ids, answer, LAMS).items()}}
    if model.noise_nets and all(hasattr(n, "net") for n in model.noise_nets.values()):
        out["sizes"] = {str(k): v for k, v in ev.update_magnitude(model, LAMS).items()}
    return out


def run_job(job):
    """Train (unless finished) and, if asked, score one run; returns its result record."""
    import torch
    torch.set_num_threads(1)
    import nara
    import train
    from checkpoint import atomic_write
    from model import LLaDA, load_tokenizer
    d, task = Path(job["dir"]), job["task"]
    result = d / "result.json"
    record = json.loads(result.read_text()) if result.exists() else None
    done = record is not None and (not job["score"] or "accuracy" in record)
    if done:
        return record                                   # a finished run is reused as it is
    if record is None:
        shutil.rmtree(d, ignore_errors=True)            # an interrupted run starts over
        d.mkdir(parents=True)
        spec = TASKS[task]
        argv = ["--model", str(ROOT / spec["model"]), "--data", str(ROOT / spec["data"]), "--val-size", str(spec["val_size"]),
                *job["train"], "--seed", str(job["seed"]), "--lr", str(job["lr"]), "--out", str(d / "run"), "--method",
                *shlex.split(job["arm"])]
        t0 = time.time()
        with open(d / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            model = train.main(argv)
        val = [json.loads(l).get("val_loss") for l in (d / "run" / "metrics.jsonl").read_text().splitlines()]
        record = {**{k: job[k] for k in ("task", "arm", "lr", "seed")}, "train_s": time.time() - t0,
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "best_val_loss": min(v for v in val if v is not None)}
        atomic_write(result, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))   # kept if scoring fails
    if job["score"]:
        t0 = time.time()
        model_dir = ROOT / TASKS[task]["model"]
        with open(d / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            model = nara.load_adapter(LLaDA.from_pretrained(model_dir), d / "run" / "best")
            record.update(score(task, model, load_tokenizer(model_dir), job["test_items"]), score_s=time.time() - t0)
    atomic_write(result, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def base_job(job):
    """The base model's accuracy and curve, once per task."""
    import torch
    torch.set_num_threads(1)
    from checkpoint import atomic_write
    from model import LLaDA, load_tokenizer
    result = Path(job["dir"]) / "base.json"
    if not result.exists():
        model_dir = ROOT / TASKS[job["task"]]["model"]
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            record = score(job["task"], LLaDA.from_pretrained(model_dir), load_tokenizer(model_dir), job["test_items"])
        result.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(result, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return json.loads(result.read_text())


# ---------------------------------------------------------------- the protocol
def run_all(pool, jobs, fn, desc):
    from tqdm import tqdm
    futures = {pool.submit(fn, j): j for j in jobs}
    out = []
    for f in tqdm(as_completed(futures), total=len(futures), desc=desc):   # also into a log file
        out.append(f.result())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", choices=sorted(TASKS), help="bundled base and task")
    ap.add_argument("--arm", action="append", help="a method and train.py flags, e.g. \"nara --condition density\" "
                    "(repeatable; default: every method)")
    ap.add_argument("--name", default=None, help="name of the result files (default: the task)")
    ap.add_argument("--quick", action="store_true", help="seeds 0-1 at the learning rates chosen by the full run")
    ap.add_argument("--lr-from", default=None, metavar="ARM", help="no sweep: every arm runs at the learning rate "
                    "the task's full comparison chose for ARM (for ablations of one method)")
    ap.add_argument("--seeds", type=int, default=None, help="run only the first N seeds of the protocol")
    ap.add_argument("--smoke", action="store_true", help="a 4-update protocol that only checks the script runs")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs, one thread each")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "methods"), help="where runs are cached")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where tables and figures go")
    args = ap.parse_args()
    protocol = SMOKE if args.smoke else PROTOCOL
    arms, name = args.arm or list(protocol["arms"]), args.name or args.task
    runs, results = Path(args.runs) / args.task, Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    chosen_file = results / f"{name}.json"
    seeds = protocol["seeds"][:2 if args.quick else args.seeds]
    if args.seeds is not None and not 1 <= args.seeds <= len(protocol["seeds"]):
        sys.exit(f"error: --seeds {args.seeds}: the protocol has seeds {protocol['seeds']}")
    job = lambda arm, lr, seed, scored: dict(task=args.task, arm=arm, lr=lr, seed=seed, score=scored,  # noqa: E731
                                             train=protocol["train"], test_items=protocol["test_items"],
                                             dir=str(runs / slug(arm) / f"lr{lr:g}" / f"seed{seed}"))
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        base = pool.submit(base_job, dict(task=args.task, dir=str(runs), test_items=protocol["test_items"]))
        if args.quick:
            if not chosen_file.exists():
                sys.exit(f"error: {chosen_file} not found: --quick uses the learning rates of a full run")
            lr_of = json.loads(chosen_file.read_text())["lr"]
            if set(arms) - set(lr_of):
                sys.exit(f"error: {chosen_file} has no learning rate for {sorted(set(arms) - set(lr_of))}")
        elif args.lr_from:
            comparison = results / f"{args.task}.json"
            lr = json.loads(comparison.read_text())["lr"].get(args.lr_from) if comparison.exists() else None
            if lr is None:
                sys.exit(f"error: --lr-from {args.lr_from}: {comparison} has no learning rate for it (run the comparison)")
            lr_of, sweep = {a: lr for a in arms}, []
        else:
            sweep = run_all(pool, [job(a, lr, 0, False) for a in arms for lr in protocol["lrs"]], run_job,
                            "learning-rate sweep (seed 0)")
            lr_of = {a: min((r for r in sweep if r["arm"] == a), key=lambda r: r["best_val_loss"])["lr"] for a in arms}
        records = run_all(pool, [job(a, lr_of[a], s, True) for a in arms for s in seeds], run_job, "seeds")
        base = base.result()
    if not (args.quick or args.lr_from):
        body = {"lr": lr_of, "sweep": {a: {str(r["lr"]): r["best_val_loss"] for r in sorted(sweep, key=lambda r: r["lr"]) if r["arm"] == a}
                                        for a in arms}}
        chosen_file.write_text(json.dumps(body, indent=1))
    runs = {(r["arm"], r["lr"], r["seed"]): r for r in ([] if args.quick else sweep) + records}   # each run once
    spent = sum(r["train_s"] + r.get("score_s", 0) for r in runs.values())
    argv = [a for i, a in enumerate(sys.argv[1:]) if not {a, sys.argv[i]} & {"--runs", "--results"}]  # without paths
    report(name + ("-quick" if args.quick else ""), shlex.join(["python", "benchmarks/methods.py", *argv]), args.task,
           arms, lr_of, records, base, results, spent / 60)


# ---------------------------------------------------------------- tables and figures
def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(name, command, task, arms, lr_of, records, base, results, run_minutes):
    by_arm = {a: sorted((r for r in records if r["arm"] == a), key=lambda r: r["seed"]) for a in arms}
    n = len(next(iter(by_arm.values())))
    lines = [f"# Methods side by side: `{task}` ({n} seeds; `{command}`)", "",
             f"Base model: accuracy {100 * base['accuracy']:.1f} %. {time.strftime('%Y-%m-%d')}. The runs took "
             f"{run_minutes:.0f} minutes of wall time in all (the sum over runs; two run at a time, one thread each).", "",
             f"A seed fixes the validation split, the data order and the masks, so each arm's best validation loss "
             f"is also given minus {arms[0]}'s at the same seed (paired difference; negative is better).", "",
             f"| method | trainable | lr | test accuracy % | best val loss | − {arms[0]}'s, paired | s per run |",
             "|---|---|---|---|---|---|---|"]
    first = {r["seed"]: r["best_val_loss"] for r in by_arm[arms[0]]}
    for a, rs in by_arm.items():
        acc, val = mean_std([100 * r["accuracy"] for r in rs]), mean_std([r["best_val_loss"] for r in rs])
        diff = mean_std([r["best_val_loss"] - first[r["seed"]] for r in rs])
        wall = statistics.mean(r["train_s"] + r.get("score_s", 0) for r in rs)
        lines.append(f"| {a} | {rs[0]['trainable']:,} | {lr_of[a]:g} | {acc[0]:.1f} ± {acc[1]:.1f} | "
                     f"{val[0]:.4f} ± {val[1]:.4f} | {diff[0]:+.4f} ± {diff[1]:.4f} | {wall:.0f} |")
    curve = ["lambda"] + [f"{a} {k}" for a in arms for k in ("mean", "std")]
    rows = [[lam] + [v for a in arms for v in mean_std([base["curve"][str(lam)] - r["curve"][str(lam)] for r in by_arm[a]])]
            for lam in LAMS]
    lines += ["", "Figure 1: loss reduction over the base per masked token (mean over seeds), by noise level λ", "",
              "| λ | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    lines += [f"| {row[0]} | " + " | ".join(f"{row[1 + 2 * i]:.3f}" for i in range(len(arms))) + " |" for row in rows]
    write_csv(results / f"{name}_figure1.csv", curve, rows)
    sized = [a for a in arms if "sizes" in by_arm[a][0]]
    rows3 = [[lam] + [statistics.mean(r["sizes"][str(lam)][i] for r in by_arm[a]) for a in sized for i in (0, 1)] for lam in LAMS]
    if sized:
        write_csv(results / f"{name}_figure3.csv", ["lambda"] + [f"{a} {k}" for a in sized for k in ("|C-I|", "|dW|")], rows3)
        lines += ["", "Figure 3: NaRA's update size by λ (mean over seeds): ‖C(λ) − I‖_F / ‖ΔW(λ)‖_F averaged over layers", "",
                  "| λ | " + " | ".join(sized) + " |", "|---" * (len(sized) + 1) + "|"]
        lines += [f"| {row[0]} | " + " | ".join(f"{row[1 + 2 * i]:.3f} / {row[2 + 2 * i]:.3f}" for i in range(len(sized))) + " |"
                  for row in rows3]
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(results / f"{name}_figure1.png", arms, rows, f"{task}: loss reduction over the base (Figure 1)",
         "CE reduction per masked token")
    if sized:
        plot(results / f"{name}_figure3.png", [f"{a}: ‖{k}‖" for a in sized for k in ("C(λ) − I", "ΔW(λ)")],
             [[r[0]] + [v for x in r[1:] for v in (x, 0.0)] for r in rows3], f"{task}: NaRA's update size (Figure 3)",
             "Frobenius norm, mean over layers and seeds")
    print("\n".join(lines))


def write_csv(path, header, rows):
    import csv
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + [[f"{v:.6g}" for v in row] for row in rows])


def plot(path, arms, rows, title, ylabel):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print(f"(pip install matplotlib to draw {path.name})")
    fig, ax = plt.subplots(figsize=(8, 4))
    lams = [row[0] for row in rows]
    for i, a in enumerate(arms):
        mean = [row[1 + 2 * i] for row in rows]
        std = [row[2 + 2 * i] for row in rows]
        ax.plot(lams, mean, marker="o", ms=3, label=a)
        ax.fill_between(lams, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.set_xlabel("noise level λ (masked fraction of the answer)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
