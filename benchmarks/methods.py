"""Every method side by side on a bundled miniature: the paper's comparison, trained to the plateau.

    python benchmarks/methods.py --task arith        # the default run's task: the central comparison
    python benchmarks/methods.py --task instruct     # budget, sweep, seeds and tables: eight methods
    python benchmarks/methods.py --task instruct --name instruct-ablations --lr-from nara   # the ablations
    python benchmarks/methods.py --task instruct --quick                   # seeds 0-1 at the chosen rates

The protocol (fixed before any run of it; an arm is a method plus train.py flags):
  1. Every item is trained on and scored. --max-length covers the longest training and test item of
     the task (arith 48, instruct 72 tokens) and --gen-length the longest answer; the script refuses
     to run otherwise, and refuses any run whose train.py reports a skipped item.
  2. One update budget for every arm, fixed from LoRA's validation curve alone: LoRA (lr 3e-3, seed 0)
     runs at T = 600, 1200, 2400, ... updates (each a full schedule: 5 % warm-up, linear decay to 0);
     the budget is the first T whose best validation loss is within 1 % of the 2T run's (doubling
     the training no longer helps). The curves that fixed it are in the report.
  3. Learning rate: each arm runs at 1e-3, 3e-3, 1e-2 and 3e-2 with seed 0 at that budget; the rate
     with the lowest best validation loss is kept (never the test set). When it is the grid's lowest
     or highest, the grid is widened by the next factor of about 3 on that side until it is not.
  4. Seeds 0-4 of the paper's central comparison (LoRA, NaRA, NaRA-C, Multi-LoRA) on arith and
     instruct; DoRA, HiRA, Prompt Tuning and P-Tuning with seeds 0-2 on instruct; the ablation arms at
     the rate chosen for NaRA (no sweep) with seeds 0-4 on instruct.
  5. Every run: 16 sequences per update, r = 8 on q/k/v/o, dropout 0.05, s = 1, η = 0.1, 20 virtual
     tokens for the prompt methods, validation every T/20 updates on the held-out split (the seed fixes
     it), the best adapter kept. That adapter is scored on the whole test file by generation (greedy,
     low-confidence remasking, early termination, last-number scoring) and gives the loss per masked
     test-answer token at λ = 0.1 ... 1.0 (Figure 1, the same masks for every model); NaRA arms also
     give ‖C(λ) − I‖ and ‖ΔW(λ)‖ averaged over layers (Figure 3).
  6. Reported: accuracy and best validation loss (mean ± std over seeds), the validation loss minus the
     first arm's at the same seed (paired), Figure 1 as the gain over the base per masked token and as
     that gain relative to the base's loss at λ, Figure 3, and the run-minutes spent.

Each finished run leaves a small record, benchmarks/results/runs/<task>/<arm>/lr<lr>-u<T>-seed<s>.json,
holding its settings and results; it is reused only when its settings equal the protocol's, so the
experiment can be completed in parts, on several machines (commit the records). Training folders go
to runs/methods/ (not kept). Two worker processes of one thread each share a 2-core machine.
--smoke runs a 4-update protocol in a temporary folder and never touches benchmarks/results/.
"""
import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tables  # noqa: E402  (this folder's tables and figures of a comparison)

TASKS = {
    "arith": dict(model="data/base", data="data/arith/train.json", test="data/arith/test.json", val_size=30,
                  max_length=48, gen=dict(gen_length=16, steps=16, block_length=16)),
    "instruct": dict(model="data/instruct/base", data="data/instruct/train.json",
                     test="data/instruct/test.json", val_size=100, max_length=72,
                     gen=dict(gen_length=32, steps=32, block_length=8)),
}
CENTRAL = ("lora", "nara", "nara-c", "multi-lora")
OTHERS = ("dora", "hira", "prompt-tuning", "p-tuning")
ABLATIONS = ("nara", "nara-c", "nara --condition density", "nara --condition both", "nara --embedding mlp",
             "nara --embedding raw", "nara --hyper-init kaiming", "nara --stage1 0.3",
             "nara --embedding-width 16 --hyper-hidden 16,16")
PROTOCOL = dict(batch_size=16, rank=8, budget_lr=3e-3, budgets=(600, 1200, 2400, 4800, 9600, 19200),
                plateau=0.01, lrs=(1e-3, 3e-3, 1e-2, 3e-2), wider=(3e-4, 1e-4, 1e-1, 3e-1), seeds=5,
                other_seeds=3, test_items=None)
SMOKE = dict(batch_size=4, rank=2, budget_lr=1e-2, budgets=(4, 8, 16), plateau=1.0, lrs=(1e-3, 1e-2),
             wider=(), seeds=2, other_seeds=1, test_items=8)
SMOKE_ARMS = ("lora", "nara")


def slug(text):
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text.replace(" --", "_")).strip("_")


def check_lengths(task):
    """Refuse a protocol under which any item would be skipped or truncated."""
    from tasks import load_tokenizer, sft_pair
    spec = TASKS[task]
    tok = load_tokenizer(ROOT / spec["model"])
    for split in ("data", "test"):
        examples = json.loads((ROOT / spec[split]).read_text())
        pairs = [sft_pair(tok, e["instruction"], e["output"], 0) for e in examples]
        longest, answer = max(len(p) + len(a) for p, a in pairs), max(len(a) for _, a in pairs)
        if longest > spec["max_length"] or answer > spec["gen"]["gen_length"]:
            sys.exit(f"error: {spec[split]}: an item of {longest} tokens (answer {answer}) does not fit "
                     f"--max-length {spec['max_length']} / --gen-length {spec['gen']['gen_length']}: no item "
                     "may be skipped")


# ---------------------------------------------------------------- one run (in a worker process)
def score(task, model, tok, limit=None):
    """Test accuracy by generation, the Figure 1 curve and (NaRA) the Figure 3 sizes of one model."""
    import torch
    import figures
    from tasks import accuracy, pad_sft, sft_pair
    examples = json.loads((ROOT / TASKS[task]["test"]).read_text())[:limit]
    pairs = [sft_pair(tok, e["instruction"], e["output"], model.config.eos_token_id) for e in examples]
    L = max(len(p) + len(a) for p, a in pairs)                        # padded to the longest, no further
    rows = [pad_sft(p, a, L, model.config.eos_token_id) for p, a in pairs]
    ids, answer = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])   # the gold outputs
    acc, _ = accuracy(model.eval(), tok, examples, **TASKS[task]["gen"])
    out = {"accuracy": acc, "items": len(examples),
           "curve": {str(k): v for k, v in figures.noise_curve(model, ids, answer, tables.LAMS).items()}}
    if model.noise_nets and all(hasattr(n, "net") for n in model.noise_nets.values()):
        out["sizes"] = {str(k): v for k, v in figures.update_magnitude(model, tables.LAMS).items()}
    return out


def run_job(job):
    """Train and score one run, or return its record when one with the same settings exists."""
    import torch
    torch.set_num_threads(1)
    import interop
    from checkpoint import atomic_write
    from model import LLaDA
    from tasks import load_tokenizer
    record_file, work, s = Path(job["record"]), Path(job["work"]), job["settings"]
    if record_file.exists():
        record = json.loads(record_file.read_text())
        if record["settings"] == s:
            return record                               # a finished run is reused as it is
    shutil.rmtree(work, ignore_errors=True)             # anything else starts over
    work.mkdir(parents=True)
    spec = TASKS[s["task"]]
    argv = ["--model", str(ROOT / spec["model"]), "--data", str(ROOT / spec["data"]),
            "--out", str(work / "run"), *s["train"], "--method", *shlex.split(s["arm"])]
    t0 = time.time()
    with open(work / "log.txt", "w") as log:                           # train.py as users run it, one thread
        subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], stdout=log, stderr=log, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = (work / "log.txt").read_text()
    if ", 0 skipped" not in log:
        raise RuntimeError(f"{work / 'log.txt'}: train.py skipped items; the protocol trains on all of them")
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [[m["step"], m["val_loss"]] for m in steps if "val_loss" in m]
    trainable = int(re.search(r"trainable ([\d,]+) of", log).group(1).replace(",", ""))
    record = {"settings": s, "trainable": trainable, "best_val_loss": min(v for _, v in curve),
              "val_curve": curve, "train_s": time.time() - t0}
    t0 = time.time()
    model_dir = ROOT / spec["model"]
    with open(work / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        model = interop.load_adapter(LLaDA.from_pretrained(model_dir), work / "run" / "best")
        record.update(score(s["task"], model, load_tokenizer(model_dir), s["test_items"]),
                      score_s=time.time() - t0, torch=torch.__version__,
                      finished=time.strftime("%Y-%m-%d %H:%M"))
    record_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    shutil.rmtree(work, ignore_errors=True)
    return record


def base_job(job):
    """The base model's accuracy and curve, once per task."""
    import torch
    torch.set_num_threads(1)
    from checkpoint import atomic_write
    from model import LLaDA
    from tasks import load_tokenizer
    record_file, s = Path(job["record"]), job["settings"]
    if record_file.exists() and json.loads(record_file.read_text())["settings"] == s:
        return json.loads(record_file.read_text())
    model_dir = ROOT / TASKS[s["task"]]["model"]
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        model = LLaDA.from_pretrained(model_dir)
        record = {"settings": s, **score(s["task"], model, load_tokenizer(model_dir), s["test_items"])}
    record_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


# ---------------------------------------------------------------- the protocol
class Runner:
    """Makes the jobs of the protocol and runs them, two at a time, with a progress bar."""
    def __init__(self, pool, task, protocol, records, work):
        self.pool, self.task, self.p = pool, task, protocol
        self.records, self.work = Path(records), Path(work)

    def job(self, arm, lr, seed, updates):
        spec, p = TASKS[self.task], self.p
        train = ["--max-updates", str(updates), "--eval-every", str(max(1, updates // 20)),
                 "--batch-size", str(p["batch_size"]), "--adapter-rank", str(p["rank"]),
                 "--max-length", str(spec["max_length"]), "--val-size", str(spec["val_size"]),
                 "--lr", f"{lr:g}", "--seed", str(seed)]
        settings = dict(task=self.task, arm=arm, lr=lr, seed=seed, updates=updates, train=train,
                        test_items=p["test_items"], gen=spec["gen"])
        name = f"{slug(arm)}/lr{lr:g}-u{updates}-seed{seed}"
        return dict(settings=settings, record=str(self.records / self.task / f"{name}.json"),
                    work=str(self.work / self.task / name))

    def run(self, jobs, desc):
        from tqdm import tqdm
        futures = [self.pool.submit(run_job, j) for j in jobs]
        with tqdm(total=len(futures), desc=f"{self.task}: {desc}") as bar:
            for f in futures:
                f.result()
                bar.update(1)
        return [f.result() for f in futures]

    def budget(self):
        """The first T of the ladder whose best validation loss is within `plateau` of the 2T run's (the
        ladder runs in order, one run at a time, and stops as soon as that holds)."""
        done = {}
        for T in self.p["budgets"]:
            job = self.job("lora", self.p["budget_lr"], 0, T)
            done[T] = self.run([job], f"budget (lora, {T} updates)")[0]
            half, loss = done.get(T // 2), done[T]["best_val_loss"]
            if half and half["best_val_loss"] - loss < self.p["plateau"] * half["best_val_loss"]:
                return T // 2, list(done.values())
        sys.exit(f"error: {self.task}: LoRA still improves by over {self.p['plateau']:.0%} at {T} updates")

    def sweep(self, arms, T):
        """{arm: chosen rate} at budget T, seed 0; an arm's grid widens while its best rate is on an edge."""
        grids, done = {a: list(self.p["lrs"]) for a in arms}, {}
        todo = [(a, lr) for a in arms for lr in self.p["lrs"]]
        best = lambda a: min(grids[a], key=lambda lr: done[a, lr]["best_val_loss"])  # noqa: E731
        while todo:
            for r in self.run([self.job(a, lr, 0, T) for a, lr in todo], "learning-rate sweep (seed 0)"):
                done[r["settings"]["arm"], r["settings"]["lr"]] = r
            todo = []
            for a in arms:
                low, high = best(a) == min(grids[a]), best(a) == max(grids[a])
                side = [w for w in self.p["wider"] if (low and w < best(a)) or (high and w > best(a))]
                if side:
                    todo.append((a, max(side) if low else min(side)))
                    grids[a].append(todo[-1][1])
        return {a: best(a) for a in arms}, [done[a, lr] for a in arms for lr in sorted(grids[a])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", choices=sorted(TASKS), help="bundled base and task")
    ap.add_argument("--arm", action="append", help="a method and train.py flags, e.g. \"nara --condition "
                    "density\" (repeatable; default: the task's arms, or with --lr-from the ablations)")
    ap.add_argument("--name", default=None, help="name of the result files (default: the task)")
    ap.add_argument("--quick", action="store_true", help="seeds 0-1 at the learning rates the full run chose")
    ap.add_argument("--lr-from", default=None, metavar="ARM", help="no sweep: every arm at the learning rate "
                    "the task's full comparison chose for ARM (ablations of one method)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the protocol's per arm)")
    ap.add_argument("--smoke", action="store_true", help="a tiny protocol in a temporary folder")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs, one "
                    "thread each")
    ap.add_argument("--runs", default=None, help="training folders (default runs/methods; smoke: temporary)")
    ap.add_argument("--results", default=None, help="tables, figures and run records (default "
                    "benchmarks/results; smoke: temporary)")
    args = ap.parse_args(argv)
    protocol = SMOKE if args.smoke else PROTOCOL
    scratch = Path(tempfile.mkdtemp(prefix="methods-smoke-")) if args.smoke else None
    results = Path(args.results or (scratch / "results" if scratch else ROOT / "benchmarks" / "results"))
    work = Path(args.runs or (scratch / "runs" if scratch else ROOT / "runs" / "methods"))
    check_lengths(args.task)
    default = CENTRAL + OTHERS * (args.task == "instruct")
    default = SMOKE_ARMS if args.smoke else ABLATIONS if args.lr_from else default
    arms, name = args.arm or list(default), args.name or args.task
    if args.seeds is not None and not 1 <= args.seeds <= protocol["seeds"]:
        sys.exit(f"error: --seeds {args.seeds}: the protocol has seeds 0-{protocol['seeds'] - 1}")
    chosen_file = results / f"{args.task}.json"
    results.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        runner = Runner(pool, args.task, protocol, results / "runs", work)
        settings = dict(task=args.task, test_items=protocol["test_items"], gen=TASKS[args.task]["gen"])
        record = str(results / "runs" / args.task / "base.json")
        base = pool.submit(base_job, dict(record=record, settings=settings))
        if args.quick or args.lr_from:
            if not chosen_file.exists():
                sys.exit(f"error: {chosen_file} not found: run the task's full comparison first")
            chosen = json.loads(chosen_file.read_text())
            T, ladder, sweep = chosen["updates"], [], []
            lr_of = {a: chosen["lr"].get(args.lr_from or a) for a in arms}
            if None in lr_of.values():
                missing = args.lr_from or sorted(a for a in arms if lr_of[a] is None)
                sys.exit(f"error: {chosen_file} has no learning rate for {missing} (run the comparison)")
        else:
            T, ladder = runner.budget()
            lr_of, sweep = runner.sweep(arms, T)
        seeds = lambda a: 2 if args.quick else args.seeds or protocol[  # noqa: E731
            "seeds" if a in CENTRAL or args.lr_from else "other_seeds"]
        records = runner.run([runner.job(a, lr_of[a], s, T) for a in arms for s in range(seeds(a))], "seeds")
        base = base.result()
    if not (args.quick or args.lr_from):
        grid = {a: [r["settings"]["lr"] for r in sweep if r["settings"]["arm"] == a] for a in arms}
        edge = {a: lr_of[a] in (min(grid[a]), max(grid[a])) for a in arms}
        body = {"updates": T, "lr": lr_of, "at_grid_edge": edge,
                "budget": {r["settings"]["updates"]: r["best_val_loss"] for r in ladder},
                "sweep": {a: {f"{r['settings']['lr']:g}": r["best_val_loss"] for r in sweep
                              if r["settings"]["arm"] == a} for a in arms}}
        chosen_file.write_text(json.dumps(body, indent=1))
    flags = [("--name", args.name), ("--lr-from", args.lr_from), ("--seeds", args.seeds and str(args.seeds))]
    command = ["python", "benchmarks/methods.py", "--task", args.task]
    command += [x for f, v in flags if v for x in (f, v)]
    command += ["--quick"] * args.quick + ["--smoke"] * args.smoke
    command += [x for a in args.arm or [] for x in ("--arm", a)]
    tables.report(name + "-quick" * args.quick, shlex.join(command), args.task, arms, lr_of, records, base,
                  results, ladder, sweep, T)
    if scratch:
        print(f"smoke results in {scratch} (benchmarks/results/ untouched)")


if __name__ == "__main__":
    main()
