"""The tables and figures of one group of the methods comparison (benchmarks/methods.py): accuracy, the
two validation measures paired with LoRA by seed, the learning-rate sweep, Figure 1 (gain over the base
by λ on the validation rows, absolute and relative) and Figure 3 (NaRA's update size by λ), as
markdown, CSV and PNG (with matplotlib)."""
import json
import statistics
import time

LAMS = [round(0.1 * k, 1) for k in range(1, 11)]


def mean_std(xs):
    xs = list(xs)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def ce(r):
    """Per-token cross-entropy on the validation rows, averaged over λ = 0.1 ... 1.0."""
    return statistics.mean(r["curve"][str(lam)] for lam in LAMS)


def report(name, command, task, lr_of, records, base, results, sweeps, T, group):
    """<name>.md with every table, <name>.json with the chosen rates, and the figures beside them.
    records: {arm: [records by seed]}; the paired columns subtract LoRA's record of the same seed."""
    arms = list(records)
    ref_arm = "lora" if "lora" in records else arms[0]
    ref = {r["settings"]["seed"]: r for r in records[ref_arm]}
    every = {json.dumps(r["settings"], sort_keys=True): r for rs in records.values() for r in rs}
    every.update({json.dumps(r["settings"], sort_keys=True): r for s in sweeps.values() for r in s.values()})
    hours = sum(r["train_s"] + r["score_s"] for r in every.values()) / 3600
    commits = sorted({r["commit"][:7] + "-dirty" * r["commit"].endswith("-dirty") for r in every.values()})
    lines = [f"# Group {group}: `{task}` at {T} updates (`{command}`)", "",
             f"{time.strftime('%Y-%m-%d')}. Base model: {100 * base['accuracy']:.1f} % on {base['items']} "
             f"test items. The {len(every)} runs behind these tables took {hours:.1f} CPU-hours (training "
             f"and scoring, one thread each), on commit(s) {', '.join(commits)}, torch "
             f"{', '.join(sorted({r['torch'] for r in every.values()}))}.", "",
             "Two measures on the same validation rows (the seed fixes them): the best validation loss of "
             "training (masked-diffusion loss, random t weighted by 1/t: heavy-tailed), and the "
             "cross-entropy per masked answer token at fixed λ = 0.1 ... 1.0, averaged over λ (the same "
             f"masks for every arm). Each is also given minus {ref_arm}'s at the same seed (paired; "
             "negative is better): a difference smaller than its spread over seeds is not a difference.", "",
             f"| method | trainable | lr | seeds | test accuracy % | best val loss | − {ref_arm}'s | "
             f"per-token CE | − {ref_arm}'s | min per run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a, rs in records.items():
        acc, val, tok = (mean_std(f(r) for r in rs) for f in (lambda r: 100 * r["accuracy"],
                                                                lambda r: r["best_val_loss"], ce))
        paired = [r for r in rs if r["settings"]["seed"] in ref]
        dval = mean_std(r["best_val_loss"] - ref[r["settings"]["seed"]]["best_val_loss"] for r in paired)
        dtok = mean_std(ce(r) - ce(ref[r["settings"]["seed"]]) for r in paired)
        wall = statistics.mean(r["train_s"] + r["score_s"] for r in rs) / 60
        lines.append(f"| {a} | {rs[0]['trainable']:,} | {lr_of[a]:g} | {len(rs)} | {acc[0]:.1f} ± "
                     f"{acc[1]:.1f} | {val[0]:.4f} ± {val[1]:.4f} | {dval[0]:+.4f} ± {dval[1]:.4f} | "
                     f"{tok[0]:.4f} ± {tok[1]:.4f} | {dtok[0]:+.4f} ± {dtok[1]:.4f} | {wall:.1f} |")
    if sweeps:
        grid = sorted({lr for s in sweeps.values() for lr in s})
        lines += ["", "Learning-rate sweep, seed 0: best validation loss (the chosen rate in bold)", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in grid) + " |", "|---" * (len(grid) + 1) + "|"]
        for a, s in sweeps.items():
            cells = ["" if lr not in s else f"**{s[lr]['best_val_loss']:.4f}**" if lr == lr_of[a] else
                     f"{s[lr]['best_val_loss']:.4f}" for lr in grid]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        body = {"updates": T, "lr": {a: lr_of[a] for a in sweeps},
                "sweep": {a: {f"{lr:g}": r["best_val_loss"] for lr, r in s.items()}
                          for a, s in sweeps.items()}}
        (results / f"{name}.json").write_text(json.dumps(body, indent=1) + "\n")
    base_loss = {lam: statistics.mean(r["base_curve"][str(lam)] for rs in records.values() for r in rs)
                 for lam in LAMS}
    for what, rel in (("gain over the base per masked token", False),
                      ("gain relative to the base's loss", True)):
        def gain(r, lam):
            b = r["base_curve"][str(lam)]
            return (b - r["curve"][str(lam)]) / (b if rel else 1.0)
        rows = [[lam] + [v for a in arms for v in mean_std(gain(r, lam) for r in records[a])] for lam in LAMS]
        tag = "figure1_relative" if rel else "figure1"
        header = ["lambda"] + [f"{a} {k}" for a in arms for k in ("mean", "std")]
        write_csv(results / f"{name}_{tag}.csv", header, rows)
        lines += ["", f"Figure 1 on the validation rows ({what}; mean ± std over seeds), by noise level λ",
                  "",
                  "| λ | base CE | " + " | ".join(arms) + " |", "|---" * (len(arms) + 2) + "|"]
        fmt = (lambda m, s: f"{m:.1%} ± {s:.1%}") if rel else (lambda m, s: f"{m:.3f} ± {s:.3f}")
        lines += [f"| {row[0]} | {base_loss[row[0]]:.3f} | " + " | ".join(
            fmt(row[1 + 2 * i], row[2 + 2 * i]) for i in range(len(arms))) + " |" for row in rows]
        plot(results / f"{name}_{tag}.png", arms, rows, f"{task}: {what} (Figure 1)",
             "relative CE reduction" if rel else "CE reduction per masked token")
    sized = [a for a in arms if "sizes" in records[a][0]]
    if sized:
        size = lambda a, lam, i: statistics.mean(r["sizes"][str(lam)][i] for r in records[a])  # noqa: E731
        rows3 = [[lam] + [size(a, lam, i) for a in sized for i in (0, 1)] for lam in LAMS]
        header = ["lambda"] + [f"{a} {k}" for a in sized for k in ("|C-I|", "|dW|")]
        write_csv(results / f"{name}_figure3.csv", header, rows3)
        lines += ["", "Figure 3: NaRA's update size by λ (mean over seeds): ‖C(λ) − I‖_F / ‖ΔW(λ)‖_F "
                  "averaged over layers", "", "| λ | " + " | ".join(sized) + " |",
                  "|---" * (len(sized) + 1) + "|"]
        lines += [f"| {row[0]} | " + " | ".join(f"{row[1 + 2 * i]:.3f} / {row[2 + 2 * i]:.3f}"
                                               for i in range(len(sized))) + " |" for row in rows3]
        plot(results / f"{name}_figure3.png", [f"{a}: ‖{k}‖" for a in sized for k in ("C(λ) − I", "ΔW(λ)")],
             [[r[0]] + [v for x in r[1:] for v in (x, 0.0)] for r in rows3], f"{task}: NaRA's update size "
             "(Figure 3)", "Frobenius norm, mean over layers and seeds", paired=True)
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare(new, committed):
    """--quick: each new record's best validation loss and accuracy next to the committed record's."""
    rows = []
    for f in sorted(new.rglob("*seed*.json")):
        r, old = json.loads(f.read_text()), committed / f.relative_to(new)
        o = json.loads(old.read_text()) if old.exists() else {}
        same = o.get("settings") == r["settings"] and o.get("val_curve") == r["val_curve"] and \
            o.get("accuracy") == r["accuracy"]
        was = f"{o['best_val_loss']:.4f} | {100 * o['accuracy']:.1f}" if o else "- | -"
        rows.append(f"| {f.relative_to(new).with_suffix('')} | {r['best_val_loss']:.4f} | "
                    f"{100 * r['accuracy']:.1f} | {was} | {'identical' if same else 'DIFFERENT'} |")
    print("\n| run | best val loss | accuracy % | committed: val loss | accuracy % | curve and accuracy |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(rows))


def write_csv(path, header, rows):
    import csv
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + [[f"{v:.6g}" for v in row] for row in rows])


def plot(path, arms, rows, title, ylabel, paired=False):
    """One line per arm with its ± std band; paired: lines 2i and 2i+1 are one arm's two measures, drawn
    in one hue (dashed, then solid) so that any number of arms stays legible."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print(f"(pip install matplotlib to draw {path.name})")
    fig, ax = plt.subplots(figsize=(8, 4))
    lams = [row[0] for row in rows]
    for i, a in enumerate(arms):
        mean, std = [row[1 + 2 * i] for row in rows], [row[2 + 2 * i] for row in rows]
        style = dict(color=plt.cm.tab20(i % 20), ls="--" if i % 2 == 0 else "-") if paired else {}
        line, = ax.plot(lams, mean, marker="o", ms=3, label=a, **style)
        low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
        ax.fill_between(lams, low, high, alpha=0.15, color=line.get_color())
    ax.set_xlabel("noise level λ (masked fraction of the answer)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paths(task, by_path, results, command, seeds):
    """<task>-paths.md: LoRA and NaRA of one group on each kernel path side by side, and the draws of all
    paths pooled. by_path: {path: {arm: [records of seeds 0, 1, ...]}}, of the protocol's `seeds`; a path
    with fewer is named as not complete. A seed fixes the data split, order and the draws of t on every
    path, so LoRA and NaRA stay paired by seed within a path; across paths the same seed is another draw."""
    arms = list(next(iter(by_path.values())))
    acc = {p: {a: [100 * r["accuracy"] for r in rs] for a, rs in arms_.items()} for p, arms_ in by_path.items()}
    short = [f"{p} has {seed_range(len(rs[arms[0]]))} of {seed_range(seeds)} so far"
             for p, rs in by_path.items() if len(rs[arms[0]]) < seeds]

    def spread(xs, sign=""):                          # one draw has a mean and no spread
        m, s = mean_std(xs)
        return f"{m:{sign}.1f} ± {s:.1f}" if len(xs) > 1 else f"{m:{sign}.1f}"
    lines = [f"# `{task}`: LoRA and NaRA on {len(by_path)} CPU kernel paths (`{command}`)", "",
             f"{time.strftime('%Y-%m-%d')}. The same protocol, rates and seeds on each path; "
             + "; ".join(f"{p}: {paths_machine(rs)}" for p, rs in by_path.items()) + "."
             + "".join(f" Not complete: {s}." for s in short), "",
             "| method | " + " | ".join(f"{p}: accuracy % by seed | {p}: mean ± std" for p in by_path)
             + f" | pooled ({sum(len(acc[p][arms[0]]) for p in by_path)} runs): mean ± std |",
             "|---" * (2 * len(by_path) + 2) + "|"]
    for a in arms:
        cells = []
        for p in by_path:
            cells += [", ".join(f"{v:.1f}" for v in acc[p][a]), spread(acc[p][a])]
        m, s = mean_std(v for p in by_path for v in acc[p][a])
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {m:.1f} ± {s:.1f} |")
    ref = arms[0]
    for a in arms[1:]:
        pairs = [x - y for p in by_path for x, y in zip(acc[p][a], acc[p][ref])]
        per_path = {p: spread([x - y for x, y in zip(acc[p][a], acc[p][ref])], "+") for p in by_path}
        pm, ps = mean_std(pairs)
        se = ps / len(pairs) ** 0.5
        lines += ["", f"{a} − {ref}, paired by seed within each path: "
                  + "; ".join(f"{p} {d}" for p, d in per_path.items())
                  + f"; all {len(pairs)} pairs {pm:+.1f} ± {ps:.1f} (standard error {se:.1f}, t = "
                  f"{pm / se if se else float('inf'):.1f}); {a} ahead in {sum(d > 0 for d in pairs)}, tied in "
                  f"{sum(d == 0 for d in pairs)}, behind in {sum(d < 0 for d in pairs)}."]
    (results / f"{task}-paths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def seed_range(n):
    return "seed 0" if n == 1 else f"seeds 0–{n - 1}"


def paths_machine(records):
    m = next(iter(records.values()))[0].get("machine") or {}
    return f"{m.get('cpu', '?')}, torch's {m.get('cpu_capability', '?')} kernels, MKL_CBWR {m.get('mkl_cbwr') or 'unset'}"
