"""The tables and figures of a methods comparison (benchmarks/methods.py): accuracy and paired validation
loss per arm, the budget ladder, the learning-rate sweep, Figure 1 (absolute and relative gain over the
base by λ) and Figure 3 (NaRA's update size by λ), as markdown, CSV and PNG (with matplotlib)."""
import json
import statistics
import time

LAMS = [round(0.1 * k, 1) for k in range(1, 11)]


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(name, command, task, arms, lr_of, records, base, results, ladder, sweep, T):
    """<name>.md with every table, and the figures' CSV and PNG files beside it, in `results`."""
    seed = lambda r: r["settings"]["seed"]  # noqa: E731
    by_arm = {a: sorted((r for r in records if r["settings"]["arm"] == a), key=seed) for a in arms}
    runs = {json.dumps(r["settings"], sort_keys=True): r for r in ladder + sweep + records}
    minutes = sum(r["train_s"] + r["score_s"] for r in runs.values()) / 60
    lines = [f"# Methods side by side: `{task}`, {T} updates (`{command}`)", "",
             f"Base model: accuracy {100 * base['accuracy']:.1f} % on {base['items']} test items. "
             f"{time.strftime('%Y-%m-%d')}. The {len(runs)} runs behind this table took {minutes:.0f} "
             "run-minutes (training and scoring, one thread each; two run at a time on 2 cores).", "",
             "A seed fixes the validation split, the data order and the masks, so each arm's best validation "
             f"loss is also given minus {arms[0]}'s at the same seed (paired difference; negative is "
             "better).",
             "",
             f"| method | trainable | lr | seeds | test accuracy % | best val loss | − {arms[0]}'s, paired | "
             "min per run |", "|---|---|---|---|---|---|---|---|"]
    first = {seed(r): r["best_val_loss"] for r in by_arm[arms[0]]}
    for a, rs in by_arm.items():
        acc, val = mean_std([100 * r["accuracy"] for r in rs]), mean_std([r["best_val_loss"] for r in rs])
        diff = mean_std([r["best_val_loss"] - first[seed(r)] for r in rs if seed(r) in first])
        wall = statistics.mean(r["train_s"] + r["score_s"] for r in rs) / 60
        lines.append(f"| {a} | {rs[0]['trainable']:,} | {lr_of[a]:g} | {len(rs)} | {acc[0]:.1f} ± "
                     f"{acc[1]:.1f} | {val[0]:.4f} ± {val[1]:.4f} | {diff[0]:+.4f} ± {diff[1]:.4f} | "
                     f"{wall:.1f} |")
    if ladder:
        lr = ladder[0]["settings"]["lr"]
        lines += ["", f"The budget: LoRA at lr {lr:g}, seed 0, best validation loss by the number of updates "
                  f"(the first within 1 % of the doubled run's is {T}):", "",
                  "| updates | best val loss | its validation curve (update: loss) |", "|---|---|---|"]
        lines += [f"| {r['settings']['updates']} | {r['best_val_loss']:.4f} | "
                  + ", ".join(f"{s}: {v:.3f}" for s, v in r["val_curve"][1::2]) + " |" for r in ladder]
    if sweep:
        grid = sorted({r["settings"]["lr"] for r in sweep})
        lines += ["", f"Learning-rate sweep at {T} updates, seed 0: best validation loss (the chosen rate in "
                  "bold)", "", "| method | " + " | ".join(f"{lr:g}" for lr in grid) + " |",
                  "|---" * (len(grid) + 1) + "|"]
        for a in arms:
            got = {r["settings"]["lr"]: r["best_val_loss"] for r in sweep if r["settings"]["arm"] == a}
            cells = ["" if lr not in got else f"**{got[lr]:.4f}**" if lr == lr_of[a] else f"{got[lr]:.4f}"
                     for lr in grid]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    for what, rel in (("gain over the base per masked token", False),
                      ("gain relative to the base's loss", True)):
        loss = lambda lam: base["curve"][str(lam)]  # noqa: E731
        gain = lambda r, lam: (loss(lam) - r["curve"][str(lam)]) / (loss(lam) if rel else 1.0)  # noqa: E731
        rows = [[lam] + [v for a in arms for v in mean_std([gain(r, lam) for r in by_arm[a]])]
                for lam in LAMS]
        tag = "figure1_relative" if rel else "figure1"
        header = ["lambda"] + [f"{a} {k}" for a in arms for k in ("mean", "std")]
        write_csv(results / f"{name}_{tag}.csv", header, rows)
        lines += ["", f"Figure 1 ({what}; mean over seeds), by noise level λ", "",
                  "| λ | base loss | " + " | ".join(arms) + " |", "|---" * (len(arms) + 2) + "|"]
        lines += [f"| {row[0]} | {loss(row[0]):.3f} | " + " | ".join(
            f"{row[1 + 2 * i]:{'.1%' if rel else '.3f'}}" for i in range(len(arms))) + " |" for row in rows]
        plot(results / f"{name}_{tag}.png", arms, rows, f"{task}: {what} (Figure 1)",
             "relative CE reduction" if rel else "CE reduction per masked token")
    sized = [a for a in arms if "sizes" in by_arm[a][0]]
    if sized:
        size = lambda a, lam, i: statistics.mean(r["sizes"][str(lam)][i] for r in by_arm[a])  # noqa: E731
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
             "(Figure 3)", "Frobenius norm, mean over layers and seeds")
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
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
        mean, std = [row[1 + 2 * i] for row in rows], [row[2 + 2 * i] for row in rows]
        ax.plot(lams, mean, marker="o", ms=3, label=a)
        low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
        ax.fill_between(lams, low, high, alpha=0.15)
    ax.set_xlabel("noise level λ (masked fraction of the answer)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
