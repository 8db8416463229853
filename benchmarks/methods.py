"""Every method side by side on a bundled miniature: the paper's comparison at a fixed budget.

    python benchmarks/methods.py                   # groups a-f in priority order (about 10 CPU-hours for a-e)
    python benchmarks/methods.py --groups ab       # only these groups
    python benchmarks/methods.py --report          # the tables of every complete group, from the records
    python benchmarks/methods.py --quick           # group a's ends (LoRA, NaRA), seeds 0-1, vs the records

The protocol (fixed before any run of it; an arm is a method plus train.py flags):
  1. Every item is trained on and scored. --max-length covers the longest training and test item of
     the task (arith 48, instruct 72 tokens) and --gen-length the longest answer; the script refuses
     to run otherwise, and refuses any run whose train.py reports a skipped item.
  2. A fixed update budget per task, taken from LoRA's ladder (lr 3e-3, seed 0, each a full schedule:
     5 % warm-up, linear decay to 0; best validation loss, test accuracy, minutes of one thread):

        updates   arith: val loss  accuracy  min   instruct: val loss  accuracy  min
            600            1.3947      90 %  2.2              0.4552     20.5 %   5.0
          1,200            1.3694      98 %  4.8              0.3178     34.0 %  10.6
          2,400            1.2315      99 % 11.5              0.1834     72.5 %  22.4
          4,800            1.2146     100 % 25.2              0.1379     92.0 %  31.3
          9,600            1.2105     100 % 39.8              0.1243     97.5 %  75.0

     arith: T = 1,200; instruct: T = 2,400. There LoRA has learned the task without saturating it, so
     accuracy can still separate methods (at the plateau, 100 % and 97.5 %, it cannot); the paper too
     compares methods at one recipe, not at a plateau. Training every arm to LoRA's plateau would cost
     about 100 CPU-hours. The ladder's records are in benchmarks/results/ladder/ (an earlier protocol's
     settings: its Figure 1 was on the test rows).
  3. Learning rate: each swept arm runs at 1e-3, 3e-3 and 1e-2 with seed 0; the rate with the lowest
     best validation loss is kept (never the test set). When it is the grid's lowest or highest, the
     grid is widened once on that side (3e-4 or 3e-2). Ablation arms take NaRA's rate, the rank-2 arms
     their method's rate at rank 8 (no sweep).
  4. Every run: 16 sequences per update, rank 8 on q/k/v/o, dropout 0.05, s = 1, η = 0.1, 20 virtual
     tokens for the prompt methods, validation every T/20 updates on the held-out split (the seed fixes
     it, and the rows, t and masks are the same for every arm at a seed), the best adapter kept. That
     adapter is scored on the whole test file by generation (greedy, low-confidence remasking, early
     termination, last-number scoring), and gives the cross-entropy per masked answer token on the
     validation rows at λ = 0.1 ... 1.0 (Figure 1; the base's on the same rows and masks is kept beside
     it); NaRA arms also give ‖C(λ) − I‖ and ‖ΔW(λ)‖ averaged over layers (Figure 3).
  5. The groups, in this order of priority (two runs at a time, `plan`: every group's sweep first, in
     group order, then the widened rates, then every group's seeds, group by group):
       a  arith     LoRA, NaRA, NaRA-C, Multi-LoRA: sweep, then seeds 1-4 at the chosen rate
       b  instruct  LoRA and NaRA: sweep, then seeds 1-2
       c  arith     rank 2 instead of 8, LoRA and NaRA at their group-a rates, seeds 0-2
       d  arith     DoRA, HiRA, Prompt Tuning, P-Tuning: sweep, then seeds 1-2
       e  arith     the ablation arms at NaRA's rate, seeds 0-2
       f  instruct  NaRA-C and Multi-LoRA (sweep, seeds 1-2), then seeds 3-4 of all four
     A group's tables are written as soon as its last run is in (f rewrites b's instruct.md).

Each finished run leaves a small record, benchmarks/results/runs/<task>/<arm>/lr<lr>-u<T>-seed<s>.json:
its settings, the commit and machine it ran on (runs.machine: torch, kernel path, CPU), its results, and
the fingerprint of its arm: a 2-update train.py run of that arm on the code this script runs, as a
bit-exact hash and as values (its losses and adapter norms). A record is reused when its settings equal
today's and its numerics do: the same hash on the machine it was made on, values within TOLERANCE on
another (a kernel path rounds differently; the code did not change). So the experiment is completed in
parts, on several machines (commit the records), and a change to the training numerics makes every
record it touches run again. `--second-path` runs LoRA and NaRA of groups a and f again as records of
this machine's kernel path, in benchmarks/results/paths/<path>/. Run it from a clone pinned to one
commit (--results may point elsewhere). Training folders go to runs/methods/, where only each run's
scored adapter is kept (<run>.adapter).
--smoke runs a tiny protocol in a temporary folder and never touches benchmarks/results/.
"""
import argparse
import contextlib
import hashlib
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
ABLATIONS = ("nara --condition density", "nara --condition both", "nara --embedding mlp",
             "nara --embedding raw", "nara --hyper-init kaiming", "nara --stage1 0.3",
             "nara --embedding-width 16 --hyper-hidden 16,16")
# name: task, report, arms, where the rate comes from ("sweep", "method": the same method's group-a
# rate, or an arm's), seeds per arm; arms of `first` run their seeds before the others' later seeds
GROUPS = {
    "a": dict(task="arith", report="arith", arms=CENTRAL, rate="sweep", seeds=5),
    "b": dict(task="instruct", report="instruct", arms=("lora", "nara"), rate="sweep", seeds=3),
    "c": dict(task="arith", report="arith-rank2", arms=("lora --adapter-rank 2", "nara --adapter-rank 2"),
              rate="method", seeds=3),
    "d": dict(task="arith", report="arith-others", arms=OTHERS, rate="sweep", seeds=3),
    "e": dict(task="arith", report="arith-ablations", arms=("nara", "nara-c", *ABLATIONS), rate="nara",
              seeds=3),
    "f": dict(task="instruct", report="instruct", arms=CENTRAL, rate="sweep", seeds=5),
}
PROTOCOL = dict(updates={"arith": 1200, "instruct": 2400}, batch_size=16, rank=8, lrs=(1e-3, 3e-3, 1e-2),
                wider=(3e-4, 3e-2), test_items=None, groups=GROUPS)
SMOKE = dict(updates={"arith": 4}, batch_size=4, rank=2, lrs=(1e-3, 1e-2), wider=(1e-4, 1e-1), test_items=8,
             groups={"a": dict(task="arith", report="arith", arms=("lora", "nara"), rate="sweep", seeds=2),
                     "e": dict(task="arith", report="arith-ablations", arms=("nara", "nara --stage1 0.5"),
                               rate="nara", seeds=1)})


def slug(text):
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text.replace(" --", "_")).strip("_")


def check_lengths(task):
    """Refuse a protocol under which any item would be skipped or truncated."""
    from extras.tasks import load_tokenizer, prompt_of, sft_pair
    spec = TASKS[task]
    tok = load_tokenizer(ROOT / spec["model"])
    for split in ("data", "test"):
        examples = json.loads((ROOT / spec[split]).read_text())
        pairs = [sft_pair(tok, prompt_of(e), e["output"], 0) for e in examples]
        longest, answer = max(len(p) + len(a) for p, a in pairs), max(len(a) for _, a in pairs)
        if longest > spec["max_length"] or answer > spec["gen"]["gen_length"]:
            sys.exit(f"error: {spec[split]}: an item of {longest} tokens (answer {answer}) does not fit "
                     f"--max-length {spec['max_length']} / --gen-length {spec['gen']['gen_length']}: no item "
                     "may be skipped")


def commit():
    """The commit this code is, with '-dirty' when tracked files differ from it."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    dirty = "-dirty" if git("status", "--porcelain", "-uno") else ""
    return (git("rev-parse", "HEAD") or "unknown") + dirty


# ---------------------------------------------------------------- one run (in a worker process)
def train(task, argv, out, log):
    """train.py as users run it, one thread; the output folder's metrics lines."""
    spec = TASKS[task]
    argv = ["--model", str(ROOT / spec["model"]), "--data", str(ROOT / spec["data"]), "--out", str(out),
            *argv]
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], stdout=f, stderr=f, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ", 0 skipped" not in Path(log).read_text():
        raise RuntimeError(f"{log}: train.py skipped items; the protocol trains on all of them")
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def fingerprint(task, argv):
    """The numbers of a 2-update run of an arm under these train.py flags: `hash`, of its adapter and
    validation losses (bit-exact: equal only where the machine is, runs.machine()), `values`, the two
    losses and each adapter tensor's norm (compared within TOLERANCE on another machine), `machine`."""
    import torch
    from safetensors.torch import load_file

    from extras.runs import machine
    torch.set_num_threads(1)                                          # as train() runs it
    with tempfile.TemporaryDirectory(prefix="methods-fp-") as tmp:
        argv = [*argv, "--max-updates", "2", "--eval-every", "1", "--batch-size", "4"]
        steps = train(task, argv, Path(tmp) / "run", Path(tmp) / "log.txt")
        losses = [m["val_loss"] for m in steps]
        h = hashlib.sha256(json.dumps(losses).encode())
        tensors = sorted(load_file(Path(tmp) / "run" / "adapter" / "adapter.safetensors").items())
        for k, t in tensors:
            h.update(k.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"hash": h.hexdigest()[:16], "values": losses + [float(t.double().norm()) for _, t in tensors],
            "machine": machine()}


# How far a 2-update run's values may move with the machine alone: across the 9 kernel paths of one
# CPU (ATEN_CPU_CAPABILITY default/avx2/avx512 x MKL_CBWR unset/AVX2/COMPATIBLE) the largest relative
# difference was 8e-6; any change to the training code seen so far moves them by 1e-3 or more.
TOLERANCE = 1e-4


def same_numerics(record, fp):
    """Whether `record` was made by today's training numerics (fp = today's fingerprint of its arm): the
    same hash where the record's machine is today's; within TOLERANCE of its values on another machine,
    whose rounding differs though the code does not (its runs are another draw, not a change)."""
    if record.get("machine") == fp["machine"]:
        return record.get("fingerprint") == fp["hash"]
    old = record.get("fingerprint_values") or []
    return len(old) == len(fp["values"]) and all(abs(a - b) <= TOLERANCE * abs(b)
                                                 for a, b in zip(old, fp["values"]))


def validation_rows(task, tok, eos, seed):
    """The rows train.py holds out at this seed (train.main's split), as it pads them."""
    import torch

    from extras.tasks import sft_rows
    spec = TASKS[task]
    ids, answer, *_ = sft_rows(tok, ROOT / spec["data"], spec["max_length"], eos)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:spec["val_size"]]
    return ids[perm], answer[perm]


def score(task, model, tok, seed, limit=None):
    """Test accuracy by generation, the Figure 1 curves (model and base) on the validation rows and (NaRA)
    the Figure 3 sizes of one model."""
    from extras import adapters, figures
    from extras.tasks import accuracy, load_items
    examples = load_items("auto", ROOT / TASKS[task]["test"])[:limit]
    acc, _ = accuracy(model.eval(), tok, examples, **TASKS[task]["gen"])
    ids, answer = validation_rows(task, tok, model.config.eos_token_id, seed)
    curve = figures.noise_curve(model, ids, answer, tables.LAMS)
    with adapters.base_only(model):
        base = figures.noise_curve(model, ids, answer, tables.LAMS)
    out = {"accuracy": acc, "items": len(examples), "curve": {str(k): v for k, v in curve.items()},
           "base_curve": {str(k): v for k, v in base.items()}}
    if model.noise_nets and all(hasattr(n, "net") for n in model.noise_nets.values()):
        out["sizes"] = {str(k): v for k, v in figures.update_magnitude(model, tables.LAMS).items()}
    return out


def run_job(job):
    """Train and score one run; write its record."""
    import torch
    torch.set_num_threads(1)
    from extras import interop
    from extras.files import atomic_write
    from extras.tasks import load_tokenizer
    from model import LLaDA
    record_file, work, s = Path(job["record"]), Path(job["work"]), job["settings"]
    shutil.rmtree(work, ignore_errors=True)                           # a partly trained run starts over
    work.mkdir(parents=True)
    t0 = time.time()
    argv = [*s["train"], "--method", *shlex.split(s["arm"])]
    steps = train(s["task"], argv, work / "run", work / "log.txt")
    log = (work / "log.txt").read_text()
    curve = [[m["step"], m["val_loss"]] for m in steps if "val_loss" in m]
    trainable = int(re.search(r"trainable ([\d,]+) of", log).group(1).replace(",", ""))
    fp = job["fingerprint"]
    record = {"settings": s, "fingerprint": fp["hash"], "fingerprint_values": fp["values"],
              "machine": fp["machine"], "commit": job["commit"],
              "trainable": trainable, "best_val_loss": min(v for _, v in curve), "val_curve": curve,
              "train_s": time.time() - t0}
    t0 = time.time()
    model_dir = ROOT / TASKS[s["task"]]["model"]
    with open(work / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        model = interop.load_adapter(LLaDA.from_pretrained(model_dir), work / "run" / "best")
        record.update(score(s["task"], model, load_tokenizer(model_dir), s["seed"], s["test_items"]),
                      score_s=time.time() - t0, torch=torch.__version__,
                      finished=time.strftime("%Y-%m-%d %H:%M"))
    record_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    kept = work.parent / f"{work.name}.adapter"                       # the scored adapter, for later use
    shutil.rmtree(kept, ignore_errors=True)
    shutil.move(work / "run" / "best", kept)
    shutil.rmtree(work, ignore_errors=True)
    return record


def base_job(job):
    """The base model's test accuracy, once per task."""
    import torch
    torch.set_num_threads(1)
    from extras.files import atomic_write
    from extras.tasks import accuracy, load_items, load_tokenizer
    from model import LLaDA
    record_file, s = Path(job["record"]), job["settings"]
    model_dir = ROOT / TASKS[s["task"]]["model"]
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        model = LLaDA.from_pretrained(model_dir).eval()
        examples = load_items("auto", ROOT / TASKS[s["task"]]["test"])[:s["test_items"]]
        acc, _ = accuracy(model, load_tokenizer(model_dir), examples, **TASKS[s["task"]]["gen"])
    record = {"settings": s, "accuracy": acc, "items": len(examples)}
    record_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


# ---------------------------------------------------------------- the protocol
class Missing(Exception):
    """--report: a run the group needs has no valid record."""


class Runs:
    """The protocol's training runs by their settings: a record whose settings and numerics are today's
    is reused; the others are trained on the pool, two at a time, in the order they are asked for
    (report_only: never trained, Missing instead)."""
    def __init__(self, pool, protocol, results, work, report_only=False, fixed=None):
        self.pool, self.p, self.results, self.work = pool, protocol, Path(results), Path(work)
        self.report_only, self.fixed = report_only, fixed or {}        # fixed: {(task, arm): lr}, not swept
        self.done, self.prints, self.commit = {}, {}, commit()

    def settings(self, task, arm, lr, seed):
        p, spec, T = self.p, TASKS[task], self.p["updates"][task]
        train = ["--max-updates", str(T), "--eval-every", str(max(1, T // 20)), "--batch-size",
                 str(p["batch_size"]), "--adapter-rank", str(p["rank"]), "--max-length",
                 str(spec["max_length"]), "--val-size", str(spec["val_size"]), "--lr", f"{lr:g}", "--seed",
                 str(seed)]
        return dict(task=task, arm=arm, lr=lr, seed=seed, updates=T, train=train, test_items=p["test_items"],
                    gen=spec["gen"], figure1="validation rows")

    def file(self, s):
        return self.results / "runs" / s["task"] / slug(s["arm"]) / f"lr{s['lr']:g}-u{s['updates']}-seed{s['seed']}.json"

    def fingerprints(self, pairs):
        """Every (task, arm)'s fingerprint, on the pool, before any run."""
        pairs = sorted(set(pairs) - set(self.prints))
        argv = [[*self.settings(t, a, 1e-2, 0)["train"][4:-4], "--lr", "0.01", "--method", *shlex.split(a)]
                for t, a in pairs]
        self.prints.update(zip(pairs, self.pool.map(fingerprint, [t for t, _ in pairs], argv)))

    def get(self, jobs):
        """Reuse or train the runs of these settings, in their order; their records land in self.done."""
        futures = {}
        for s in jobs:
            file = self.file(s)
            if file in self.done or file in futures:
                continue
            old = json.loads(file.read_text()) if file.exists() else None
            if old and old["settings"] == s and same_numerics(old, self.prints[s["task"], s["arm"]]):
                self.done[file] = old
            elif not self.report_only:
                name = file.relative_to(self.results / "runs").with_suffix("")
                futures[file] = self.pool.submit(run_job, dict(
                    settings=s, record=str(file), work=str(self.work / name),
                    fingerprint=self.prints[s["task"], s["arm"]], commit=self.commit))
        for file, future in futures.items():                             # in the order they were asked for
            r = self.done[file] = future.result()
            s, minutes = r["settings"], (r["train_s"] + r["score_s"]) / 60
            print(f"{s['task']} {s['arm']} lr {s['lr']:g} seed {s['seed']}: best val {r['best_val_loss']:.4f}, "
                  f"accuracy {100 * r['accuracy']:.1f} %, {minutes:.1f} min", flush=True)

    def record(self, task, arm, lr, seed):
        s = self.settings(task, arm, lr, seed)
        if self.file(s) not in self.done:
            raise Missing(f"{task} {arm} lr {lr:g} seed {seed}")
        return self.done[self.file(s)]

    def widening(self, task, arm):
        """The rate that widens the sweep once past its best edge, or None."""
        grid = list(self.p["lrs"])
        best = min(grid, key=lambda lr: self.record(task, arm, lr, 0)["best_val_loss"])
        side = ([w for w in self.p["wider"] if w < min(grid)] if best == min(grid) else
                [w for w in self.p["wider"] if w > max(grid)] if best == max(grid) else [])
        return side[0] if side else None

    def rate(self, task, arm):
        """(the chosen rate, {lr: seed-0 record}) of an arm: the swept rate with the lowest best validation
        loss (the committed one for --quick and --second-path, with no sweep)."""
        if (task, arm) in self.fixed:
            return self.fixed[task, arm], None
        lrs = [*self.p["lrs"], *[w for w in [self.widening(task, arm)] if w]]
        sweep = {lr: self.record(task, arm, lr, 0) for lr in sorted(lrs)}
        return min(sweep, key=lambda lr: sweep[lr]["best_val_loss"]), sweep


def rate_source(spec, arm):
    """The arm whose swept rate an arm of this group takes: its own, its method's, or NaRA's (the LoRA
    added to pair with, its own)."""
    if spec["rate"] == "sweep" or arm not in spec["arms"]:
        return arm
    return arm.split()[0] if spec["rate"] == "method" else spec["rate"]


def arms_of(spec):
    """The group's arms, with group a's LoRA first where it is there to pair with (rate "sweep"/"nara")."""
    arms = list(spec["arms"])
    return arms if "lora" in arms or spec["rate"] == "method" else ["lora", *arms]


def plan(runs, groups):
    """The order of the protocol's runs: every sweep first (group by group), the widened rates, then every
    group's seeds, group by group, seed by seed. Runs two groups share are asked for once, first by the
    earlier group."""
    p = runs.p
    swept = list(dict.fromkeys((p["groups"][g]["task"], rate_source(p["groups"][g], a)) for g in groups
                               for a in arms_of(p["groups"][g])))
    swept = [(t, a) for t, a in swept if (t, a) not in runs.fixed]
    runs.get([runs.settings(t, a, lr, 0) for t, a in swept for lr in p["lrs"]])
    widened = []
    for t, a in swept:
        try:
            widened += [runs.settings(t, a, w, 0) for w in [runs.widening(t, a)] if w]
        except Missing:
            pass
    runs.get(widened)
    seeds = []
    for g in groups:
        spec = p["groups"][g]
        try:
            rates = {a: runs.rate(spec["task"], rate_source(spec, a))[0] for a in arms_of(spec)}
        except Missing:
            continue
        seeds += [runs.settings(spec["task"], a, rates[a], s) for s in range(spec["seeds"]) for a in arms_of(spec)]
    runs.get(seeds)


def group(runs, name):
    """({arm: rate}, {arm: sweep}, {arm: [records by seed]}) of a group, or Missing."""
    spec = runs.p["groups"][name]
    lr_of, sweeps, records = {}, {}, {}
    for a in arms_of(spec):
        lr_of[a], sweep = runs.rate(spec["task"], rate_source(spec, a))
        if sweep and spec["rate"] == "sweep" and a in spec["arms"]:
            sweeps[a] = sweep
        records[a] = [runs.record(spec["task"], a, lr_of[a], s) for s in range(spec["seeds"])]
    return lr_of, sweeps, records


def paths_report(committed, protocol):
    """<task>-paths.md for groups a and f: their LoRA and NaRA records of each kernel path (the committed
    ones, and each of paths/<path>/), side by side and pooled. A path counts with its leading seeds that
    both arms have (seeds 0-2 while seed 3 is still training), so the table says what is in so far; a
    task without chosen rates yet (no <task>.json) has none."""
    for task in ("arith", "instruct"):
        if not (committed / f"{task}.json").exists():
            continue
        lr = json.loads((committed / f"{task}.json").read_text())["lr"]
        by_path = {}
        for label, root in [("native", committed / "runs"), *[(p.name, p / "runs") for p in
                                                               sorted((committed / "paths").glob("*"))]]:
            files = {a: [root / task / a / f"lr{lr[a]:g}-u{protocol['updates'][task]}-seed{s}.json"
                         for s in range(5)] for a in ("lora", "nara")}
            seeds = next((s for s in range(5) if not all(fs[s].exists() for fs in files.values())), 5)
            if seeds:
                by_path[label] = {a: [json.loads(f.read_text()) for f in fs[:seeds]] for a, fs in files.items()}
        if len(by_path) > 1:
            tables.paths(task, by_path, committed, "python benchmarks/methods.py --report", seeds=5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default=None, help="which groups, in priority order (default: all, abcdef)")
    ap.add_argument("--report", action="store_true", help="no training: the tables of every group whose "
                    "records are all in, and what the others lack")
    ap.add_argument("--quick", action="store_true", help="LoRA and NaRA on arith at group a's rates, seeds "
                    "0-1, in a temporary folder, compared with the committed records")
    ap.add_argument("--second-path", action="store_true", help="groups a's and f's LoRA and NaRA again, "
                    "seeds 0-4 at their committed rates, as records of this machine's kernel path in "
                    "benchmarks/results/paths/<path>/: run it under another path than the committed "
                    "records', e.g. ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE")
    ap.add_argument("--smoke", action="store_true", help="a tiny protocol in a temporary folder")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs, one "
                    "thread each (default: 2)")
    ap.add_argument("--runs", default=None, help="training folders (default runs/methods; smoke: temporary)")
    ap.add_argument("--results", default=None, help="tables, figures and run records (default "
                    "benchmarks/results; smoke and quick: temporary)")
    args = ap.parse_args(argv)
    protocol = SMOKE if args.smoke else PROTOCOL
    scratch = Path(tempfile.mkdtemp(prefix="methods-")) if args.quick or (args.smoke and not args.results) \
        else None
    committed = Path(args.results or ROOT / "benchmarks" / "results")
    results = scratch / "results" if scratch else committed
    work = Path(args.runs or (scratch / "runs" if scratch else ROOT / "runs" / "methods"))
    groups = args.groups or "".join(protocol["groups"])
    fixed = {}                                        # (task, arm): the committed rate, not swept again
    if args.quick or args.second_path:
        for task in ("arith",) + ("instruct",) * args.second_path:
            chosen = committed / f"{task}.json"
            lr = json.loads(chosen.read_text())["lr"] if chosen.exists() else {}
            if not {"lora", "nara"} <= set(lr):
                sys.exit(f"error: {chosen} has no rates for lora and nara: run its group first")
            fixed.update({(task, a): lr[a] for a in ("lora", "nara")})
    if args.quick:
        quick = dict(task="arith", report="arith-quick", arms=("lora", "nara"), rate="method", seeds=2)
        protocol, groups = {**protocol, "groups": {"q": quick}}, "q"
    if args.second_path:
        from extras.runs import machine
        m = machine()
        results = committed / "paths" / f"{m['cpu_capability']}-{m['mkl_cbwr'] or 'native'}".lower()
        protocol, groups = {**protocol, "groups": {
            "p": dict(task="arith", report="arith", arms=("lora", "nara"), rate="method", seeds=5),
            "r": dict(task="instruct", report="instruct", arms=("lora", "nara"), rate="method", seeds=5)}}, "pr"
    unknown = [g for g in groups if g not in protocol["groups"]]
    if unknown:
        sys.exit(f"error: --groups {groups}: no group {unknown[0]!r} (choose from "
                 f"{''.join(protocol['groups'])})")
    tasks = sorted({protocol["groups"][g]["task"] for g in groups})
    for task in tasks:
        check_lengths(task)
    results.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        runs = Runs(pool, protocol, results, work, args.report, fixed)
        specs = [protocol["groups"][g] for g in groups]
        runs.fingerprints({(s["task"], a) for s in specs for a in arms_of(s)}
                          | {(s["task"], rate_source(s, a)) for s in specs for a in arms_of(s)})
        bases = {} if args.report else {t: pool.submit(base_job, dict(
            record=str(results / "runs" / t / "base.json"),
            settings=dict(task=t, test_items=protocol["test_items"], gen=TASKS[t]["gen"]))) for t in tasks}
        plan(runs, groups)
        for g, spec in zip(groups, specs):
            try:
                lr_of, sweeps, records = group(runs, g)
            except Missing as e:
                print(f"group {g} ({spec['report']}): not complete, no record for {e}")
                continue
            base_file = results / "runs" / spec["task"] / "base.json"
            base = bases[spec["task"]].result() if bases else json.loads(base_file.read_text())
            command = "python benchmarks/methods.py " + ("--quick" if args.quick else "--second-path"
                                                         if args.second_path else f"--groups {g}")
            tables.report(spec["report"], command, spec["task"], lr_of, records, base, results, sweeps,
                          protocol["updates"][spec["task"]], g)
    if args.report or args.second_path:
        paths_report(committed, protocol)
    if args.quick:
        tables.compare(results / "runs", committed / "runs")
    if scratch:
        print(f"results in {scratch} ({committed} untouched)")


if __name__ == "__main__":
    main()
