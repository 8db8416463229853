"""The paper's two figures, measured: Figure 1, the validation loss per masked token at fixed noise
levels λ (the same masks for every model), and Figure 3, NaRA's update size by λ, ‖C(λ) − I‖ and
‖ΔW(λ)‖. Used by eval.py (--noise-curve, and the default table) and benchmarks/methods.py.
"""
import csv

import torch

import nara
from diffusion import sft_mask
from extras import adapters
from extras.tasks import pad_sft, sft_pair

LAMS = [round(0.1 * k, 1) for k in range(1, 11)]


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
                           logits_at=masked)   # (N, V): the masked positions only
            total += float(torch.nn.functional.cross_entropy(logits.double(), x[masked], reduction="sum"))
            count += int(masked.sum())
        curve[lam] = total / count
    return curve


@torch.no_grad()
def update_magnitude(model, lams):
    """{λ: (‖C(λ) − I‖_F averaged over hypernetworks or None, ‖ΔW(λ)‖_F averaged over layers)}, Figure
    3, with C as the layers apply it (fp32) and one ΔW in memory at a time. A density-conditioned NaRA
    gets noise density λ too: what masking a fraction λ at random gives on average."""
    out = {}
    layers = [m for m in model.modules() if isinstance(m, nara.LoRALinear)]
    for lam in lams:
        cond = adapters.cond_at(model, lam, density=lam)                 # density: only where a core reads it
        cores = [(C - torch.eye(C.shape[-1], device=C.device)).norm().item()
                 for C in (cond[k].reshape(-1, *cond[k].shape[-2:])[0] for k in model.noise_nets)]
        deltas = [(m.merged_weight(cond) - m.weight.float()).norm().item() for m in layers]
        out[lam] = (sum(cores) / len(cores) if cores else None, sum(deltas) / len(deltas) if deltas else None)
    return out


def noise_report(model, tok, items, adapter):
    """One model's Figure 1 curve on the items' gold outputs and, with an adapter, its Figure 3 sizes."""
    eos = model.config.eos_token_id
    pairs = [sft_pair(tok, it["prompt"], it.get("output") or str(it["gold"]), eos) for it in items]
    L = max(len(p) + len(a) for p, a in pairs)                         # pad to the longest, no further
    rows = [pad_sft(p, a, L, eos) for p, a in pairs]
    curve = noise_curve(model, torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), LAMS)
    return curve, update_magnitude(model, LAMS) if adapter else None


def write_noise(curves, sizes, out, name):
    """The table of Figure 1 (loss per masked token by λ) and Figure 3 (update sizes), printed with its
    legend, as <name>-noise_curve.csv and, with matplotlib, <name>-noise_curve.png."""
    csv_file, png = out / f"{name}-noise_curve.csv", out / f"{name}-noise_curve.png"
    header = ["λ"] + [f"loss {n}" for n in curves] + [f"{k} {n}" for n in sizes for k in ("‖C−I‖", "‖ΔW‖")]
    lines = [[lam] + [curves[n][lam] for n in curves] + [v for n in sizes for v in sizes[n][lam]]
             for lam in LAMS]
    width = [max(len(h), 7) for h in header]
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, width)))
    for line in lines:
        print("  ".join(f"{'-' if v is None else f'{v:.4f}' if i else f'{v:.1f}':>{w}}"
                        for i, (v, w) in enumerate(zip(line, width))))
    print("loss: cross-entropy per masked answer token with a fraction λ of the answer masked (Figure 1); "
          "‖C−I‖: NaRA's core C(λ) minus the identity, Frobenius norm, averaged over hypernetworks; ‖ΔW‖: "
          "each adapted layer's update at λ, Frobenius norm, averaged over layers (Figure 3); - = the method "
          "has no core (or, for ‖ΔW‖, no weight update)")
    with open(csv_file, "w", newline="") as f:
        csv.writer(f).writerows([["lambda"] + header[1:]] + lines)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print(f"wrote {csv_file} (pip install matplotlib for a plot)")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in curves:
        ax.plot(LAMS, [curves[n][l] for l in LAMS], marker="o", label=n)
    ax.set_xlabel("noise level λ (masked fraction)")
    ax.set_ylabel("CE per masked token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {csv_file} and {png}")
