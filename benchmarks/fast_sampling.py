"""Parallel decoding and the block KV cache against the exact sampler, on both bundled tasks.

    python benchmarks/fast_sampling.py                  # both parts, one thread (about 3 CPU-hours)
    python benchmarks/fast_sampling.py --part drift     # only part 1

Adapters: LoRA and NaRA at seeds 0-2 of each task, trained under the miniature's protocol, as
benchmarks/methods.py keeps them: <adapters>/<task>/<arm>/lr<lr>-u<T>-seed<s>.adapter (default
runs/methods; `python benchmarks/methods.py --second-path` writes them).

Part 1, the cache's error and NaRA's λ (on 30 validation rows of seed 0): the exact sampler runs, and at
every step the same tokens also go through each cache rule; the table gives the largest logit difference
at the block's masked positions against the uncached forward, for the base (what the cache alone costs),
LoRA (the same with an adapter) and NaRA (the cache plus C(λ) of the block's first step), and how often
the greedy token there differs. The refresh rule (recompute the cache when λ has moved by more than δ) is
chosen here, never on the test set.
Part 2, what it buys and costs (on the test sets): for the exact sampler, threshold 0.9, prefix, dual
and threshold + dual, at the task's own generation settings and a long one (gen_length 256, block 32,
as LLaDA's GSM8K setting): accuracy, model calls and positions computed per answer, wall time per
answer on one thread. Writes benchmarks/results/fast_sampling.md and .json.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusion import BlockCache  # noqa: E402
from extras import interop  # noqa: E402
from extras.files import atomic_write  # noqa: E402
from extras.runs import machine  # noqa: E402
from extras.tasks import accuracy, load_items, load_tokenizer, prompt_of, read_records, sft_rows  # noqa: E402
from model import LLaDA  # noqa: E402

TASKS = {"arith": dict(model="data/base", data="data/arith/train.json", test="data/arith/test.json", val_size=30,
                       max_length=48, own=dict(gen_length=16, steps=16, block_length=16)),
         "instruct": dict(model="data/instruct/base", data="data/instruct/train.json", test="data/instruct/test.json",
                          val_size=100, max_length=72, own=dict(gen_length=32, steps=32, block_length=8))}
LONG = dict(gen_length=256, steps=256, block_length=32)
MODES = {"exact": {}, "threshold 0.9": dict(threshold=0.9), "prefix": dict(cache="prefix"),
         "dual": dict(cache="dual"), "threshold 0.9 + dual": dict(threshold=0.9, cache="dual")}
RULES = {"prefix": ("prefix", None), **{f"dual, refresh {delta}": ("dual", delta) for delta in (None, 0.1, 0.05)}}
ROWS = 30                                  # validation rows per task in part 1 (arith holds out 30)
BATCH = 32                                 # prompts per generation batch (answer_all's default)


def held_out(task, tok, eos, seed=0):
    """The validation rows train.py holds out at this seed (runs.split), as items."""
    spec = TASKS[task]
    rows = read_records(ROOT / spec["data"])
    ids, _, _, kept = sft_rows(tok, ROOT / spec["data"], spec["max_length"], eos, rows)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:spec["val_size"]]
    return [{"prompt": prompt_of(rows[kept[i]]), "gold": rows[kept[i]]["output"]} for i in perm.tolist()]


def models(task, adapters, seeds):
    """[(name, arm, loader)] of the base and each adapter."""
    out = [("base", "base", lambda: LLaDA.from_pretrained(ROOT / TASKS[task]["model"]))]
    for arm in ("lora", "nara"):
        for s in seeds:
            found = sorted((Path(adapters) / task / arm).glob(f"lr*-seed{s}.adapter"))
            if not found:
                sys.exit(f"error: no {arm} adapter of seed {s} in {Path(adapters) / task / arm}: run "
                         "`python benchmarks/methods.py --second-path` (it keeps them), or pass --adapters")
            out.append((f"{arm} seed {s}", arm, lambda f=found[-1]: interop.load_adapter(
                LLaDA.from_pretrained(ROOT / TASKS[task]["model"]), f, verbose=False)))
    return out


class Drift(nn.Module):
    """The model the exact sampler calls; each call's tokens also go through every cache rule, and the
    largest logit difference at the block's masked positions (and greedy flips there) is kept."""
    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.caches = {name: BlockCache(mode, delta) for name, (mode, delta) in RULES.items()}
        self.diffs, self.flips = {name: [] for name in RULES}, {name: [0, 0] for name in RULES}

    def forward(self, x, attention_mask=None, noise_level=None, logits_at=None):
        exact = self.model(x, attention_mask, noise_level=noise_level, logits_at=logits_at)
        lo, hi = logits_at.start, logits_at.stop
        masked = x[:, lo:hi] == self.config.mask_token_id
        for name, cache in self.caches.items():
            got, computed = cache.logits(self.model, x, attention_mask, noise_level, lo, hi)
            if computed < x.numel():                                      # a cached step (not a full one)
                self.diffs[name].append(float((got - exact).abs().amax(-1)[masked].max()))
                self.flips[name][0] += int((got.argmax(-1) != exact.argmax(-1))[masked].sum())
                self.flips[name][1] += int(masked.sum())
        return exact


def drift(tasks, adapters, gen_of):
    """Part 1: {task: {setting: {model: {rule: (mean, max logit difference, flip share)}}}}."""
    out = {}
    for task in tasks:
        tok = load_tokenizer(ROOT / TASKS[task]["model"])
        for setting, gen in gen_of(task).items():
            for name, arm, load in models(task, adapters, [0]):
                model = load().eval()
                spy = Drift(model)
                accuracy(spy, tok, held_out(task, tok, model.config.eos_token_id)[:ROWS], **gen)
                out.setdefault(task, {}).setdefault(setting, {})[arm] = {
                    r: (statistics.mean(spy.diffs[r]) if spy.diffs[r] else 0.0, max(spy.diffs[r], default=0.0),
                        spy.flips[r][0] / max(1, spy.flips[r][1])) for r in RULES}
                print(task, setting, arm, {r: f"{v[0]:.2e}/{v[1]:.2e}/{v[2]:.3f}"
                                           for r, v in out[task][setting][arm].items()}, flush=True)
    return out


def table(results, save, tasks, adapters, gen_of, refresh, seeds_of, limit_of):
    """Part 2, into results["table"][task][setting][model][mode]; saved after each model and setting, and a
    measure already there for the same items is kept (an interrupted run goes on where it stopped)."""
    for task in tasks:
        tok = load_tokenizer(ROOT / TASKS[task]["model"])
        every = load_items("auto", ROOT / TASKS[task]["test"])
        for name, arm, load in models(task, adapters, sorted({s for st in gen_of(task) for s in seeds_of(st)})):
            model = None
            for setting, gen in gen_of(task).items():
                if arm != "base" and int(name.split()[-1]) not in seeds_of(setting):
                    continue
                items = every[:limit_of(setting)]
                done = results.setdefault("table", {}).setdefault(task, {}).setdefault(setting, {}).setdefault(name, {})
                for mode, fast in MODES.items():
                    if done.get(mode, {}).get("items") == len(items):
                        continue
                    model = model or load().eval()
                    stats, t0 = {}, time.perf_counter()
                    acc, _ = accuracy(model, tok, items, stats=stats, batch_size=BATCH, **gen, **fast,
                                      **({"refresh": refresh} if "cache" in fast else {}))
                    seconds = time.perf_counter() - t0
                    batches = math.ceil(len(items) / BATCH)                # a call computes a whole batch
                    done[mode] = dict(accuracy=acc, calls=stats["model_calls"] / batches, items=len(items),
                                      positions=stats["positions"] / len(items), seconds=seconds / len(items))
                    print(task, setting, name, mode, f"{100 * acc:.1f} %", f"{stats['model_calls'] / batches:.1f} "
                          f"calls, {seconds / len(items):.3f} s per answer", flush=True)
                    save()


def mean_std(xs):
    xs = list(xs)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(results, refresh, out):
    m = results["machine"]
    lines = ["# Parallel decoding and the block KV cache", "",
             f"`python benchmarks/fast_sampling.py`, {results['date']}, one thread on {m['cpu']} (torch "
             f"{m['torch']}, {m['cpu_capability']} kernels; other jobs shared the cores, so seconds are this "
             "run's, ratios within one row are comparable). Adapters: LoRA and NaRA of the miniature's "
             "protocol (benchmarks/methods.py's runs; each table names its seeds); greedy, low-confidence, early "
             "termination.", ""]
    if results.get("commands"):                                  # the runs whose parts were put together here
        lines += ["Made by: " + "; ".join(f"`{c}`" for c in results["commands"]) + ".", ""]
    if "drift" in results:
        lines += ["## 1. What the cache changes in the logits, and NaRA's λ (validation rows, seed 0)", "",
                  "Each step of the exact sampler also runs through the cache; the largest |logit difference| "
                  "at the block's masked positions against the uncached forward of the same tokens (mean over "
                  "the cached steps / largest), and the share of those positions whose greedy token differs. "
                  "`refresh δ`: the cache is computed again once any row's λ has moved by more than δ.", ""]
        for task, settings in results["drift"].items():
            for setting, by_arm in settings.items():
                lines += [f"**{task}, {setting}**", "", "| rule | " + " | ".join(by_arm) + " |",
                          "|---" * (len(by_arm) + 1) + "|"]
                for rule in RULES:
                    lines.append(f"| {rule} | " + " | ".join(
                        f"{v[rule][0]:.3f} / {v[rule][1]:.3f}, {100 * v[rule][2]:.1f} %" for v in by_arm.values())
                                 + " |")
                lines.append("")
    if "table" in results:
        lines += ["## 2. Accuracy, model calls, positions and time per answer (test sets)", "",
                  f"The first test items of each task, in batches of {BATCH} prompts; model calls per answer (every "
                  "call computes its whole batch); positions computed per answer (rows x length, summed over the "
                  "calls); the base, then LoRA and NaRA as mean ± std over the seeds each setting names; `adapters "
                  "− exact`: each adapter's accuracy minus its own under the exact sampler, mean ± std. The cache is "
                  f"computed again when λ moved by more than {refresh} (None: never within a block); "
                  "docs/evaluation.md says which rule to use, and why.", ""]
        for task, settings in results["table"].items():
            for setting, by_model in settings.items():
                by_model = {name: v for name, v in by_model.items() if all(mode in v for mode in MODES)}
                if "base" not in by_model:
                    continue
                seeds = sorted({name.split()[-1] for name in by_model if name != "base"})
                lines += [f"**{task}, {setting}**: {by_model['base']['exact']['items']} items, adapter seeds "
                          f"{', '.join(seeds)}", "",
                          "| sampler | base % | LoRA % | NaRA % | adapters − exact, points | model calls | positions "
                          "| s / answer | calls, positions, time vs exact |", "|---|---|---|---|---|---|---|---|---|"]
                exact = by_model
                for mode in MODES:
                    def of(arm, key):
                        return [v[mode][key] for name, v in by_model.items() if name.startswith(arm)]
                    acc = {arm: mean_std(100 * a for a in of(arm, "accuracy")) for arm in ("base", "lora", "nara")}
                    lost = mean_std(100 * (v[mode]["accuracy"] - v["exact"]["accuracy"])
                                    for name, v in exact.items() if name != "base")
                    calls, pos, sec = (statistics.mean(v[mode][k] for v in by_model.values())
                                       for k in ("calls", "positions", "seconds"))
                    c0, p0, s0 = (statistics.mean(v["exact"][k] for v in by_model.values())
                                  for k in ("calls", "positions", "seconds"))
                    lines.append(f"| {mode} | {acc['base'][0]:.1f} | {acc['lora'][0]:.1f} ± {acc['lora'][1]:.1f} | "
                                 f"{acc['nara'][0]:.1f} ± {acc['nara'][1]:.1f} | {lost[0]:+.1f} ± {lost[1]:.1f} | "
                                 f"{calls:.1f} | {pos:,.0f} | {sec:.3f} | {c0 / calls:.1f}x, {p0 / pos:.1f}x, "
                                 f"{s0 / sec:.1f}x |")
                for arm in ("lora", "nara"):
                    lost = {mode: statistics.mean(100 * (v[mode]["accuracy"] - v["exact"]["accuracy"])
                                                  for name, v in by_model.items() if name.startswith(arm))
                            for mode in MODES}
                    lines.append(f"| ({arm}: − exact) | | | | " + ", ".join(f"{k} {v:+.1f}" for k, v in lost.items()
                                                                           if k != "exact") + " | | | | |")
                lines.append("")
    (out / "fast_sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("drift", "table", "both", "report"), default="both",
                    help="report: only the markdown, from the .json (default: both parts)")
    ap.add_argument("--adapters", default=str(ROOT / "runs" / "methods"), help="the protocol's kept adapters "
                    "(default: runs/methods)")
    ap.add_argument("--refresh", type=float, default=None, help="part 2's refresh rule (default: never "
                    "within a block, the rule part 1 chose)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="adapter seeds at the task's own "
                    "setting (default: 0 1 2)")
    ap.add_argument("--limit", type=int, default=None, help="test items per task at its own setting (default: all)")
    ap.add_argument("--long-seeds", type=int, nargs="+", default=[0], help="adapter seeds at the long setting "
                    "(default: 0)")
    ap.add_argument("--long-limit", type=int, default=BATCH, help="test items at the long setting, whose exact "
                    f"sampler costs about 20 s per answer on one thread (default: {BATCH}, one batch)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="(default: both)")
    ap.add_argument("--settings", nargs="+", default=["own", "long"], choices=["own", "long"],
                    help="the task's own generation settings, the long one, or both (default: both)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="(default: benchmarks/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "fast_sampling.json"
    results = json.loads(file.read_text()) if file.exists() else {}
    if args.part != "report":
        results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))

    def save():                                               # whole or not at all: a temporary file, renamed
        atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))

    def gen_of(task):
        own = TASKS[task]["own"]
        every = {f"own (gen {own['gen_length']}, block {own['block_length']})": own, "long (gen 256, block 32)": LONG}
        return {name: gen for name, gen in every.items() if name.split()[0] in args.settings}
    if args.part in ("drift", "both"):
        for task, settings in drift(args.tasks, args.adapters, gen_of).items():
            results.setdefault("drift", {}).setdefault(task, {}).update(settings)
        save()
    if args.part in ("table", "both"):
        results["refresh"] = args.refresh
        table(results, save, args.tasks, args.adapters, gen_of, args.refresh,
              lambda setting: args.long_seeds if setting.startswith("long") else args.seeds,
              lambda setting: args.long_limit if setting.startswith("long") else args.limit)
    report(results, results.get("refresh", args.refresh), out)


if __name__ == "__main__":
    main()
