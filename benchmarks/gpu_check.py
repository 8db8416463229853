"""One prepared check of the CUDA path at the real LLaDA-8B size, with random weights.

    python benchmarks/gpu_check.py --dir /tmp/llada-8b-random --out gpu_check.md
    python benchmarks/gpu_check.py --tiny      # the same script on CPU with a tiny config

Writes a random checkpoint in the released layout (bf16, 6 shards grouped by tensor kind, index),
loads it with LLaDA.from_pretrained (peak host RSS against the file size, load time, GPU memory),
then times bf16 forwards and NaRA/LoRA training steps at length 512 (autocast, fp32 adapters),
with and without activation checkpointing, the recipe's 32-sequence update in several layouts (with the
default recomputation of norms, SiLU and dropout, and once keeping every intermediate), a sampling step
of the paper's GSM8K setting (16 prompts, gen 256, block 8: the head only at the current block) next to
the base model's, and writes a markdown table. FLOP utilisation counts the work of a frozen-base
adapter step: forward + input-gradient backward = 4 x 8.0 G FLOP per token (adapter gradients ~1 %).
"""
import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import LLaDA, LLaDAConfig  # noqa: E402
import nara  # noqa: E402

# The released checkpoint groups tensors by kind, not by layer (see its model.safetensors.index.json).
SHARD_OF_KIND = {"attn_out": 1, "wte": 1, "ln_f": 1, "ff_out": 2, "head": 2, "attn_norm": 3, "ff_norm": 3,
                 "q_proj": 3, "k_proj": 3, "v_proj": 4, "ff_proj": 4, "up_proj": 5}


def write_random_checkpoint(cfg, path, device):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2))
    with torch.device("meta"):
        shapes = LLaDA(cfg).base_shapes()
    shards, weight_map, total = {}, {}, 0
    for key, shape in shapes.items():
        kind = "head" if key == "model.transformer.ff_out.weight" else re.sub(r"\.weight$", "", key).split(".")[-1]
        name = f"model-{SHARD_OF_KIND[kind]:05d}-of-00006.safetensors"
        shards.setdefault(name, []).append((key, shape))
        weight_map[key] = name
    g = torch.Generator(device=device).manual_seed(0)
    for name, items in shards.items():
        tensors = {}
        for key, shape in items:
            if "norm" in key or "ln_f" in key:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02).cpu()
            tensors[key] = t
            total += t.numel() * 2
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def timed(fn, device, repeats=5):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def commit():
    """The checked-out commit (with "+changes" when the tree differs), so every figure names its code."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llada-8b-random", help="where to write the random checkpoint")
    ap.add_argument("--out", default="gpu_check.md", help="markdown file for the results")
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU, to check the script itself")
    ap.add_argument("--length", type=int, default=512, help="sequence length of the timed steps")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = LLaDAConfig.tiny() if args.tiny else LLaDAConfig()
    L = 64 if args.tiny else min(args.length, cfg.max_sequence_length)
    rows = [f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
            f"length {L}; {time.strftime('%Y-%m-%d')}; code of commit {commit()}", "", "| what | figure |", "|---|---|"]
    add = lambda what, fig: (rows.append(f"| {what} | {fig} |"), print(what, "=", fig, flush=True))  # noqa: E731

    path = Path(args.dir)
    if args.write_only:
        write_random_checkpoint(cfg, path, device)
        return
    t0 = time.time()                      # written by a child process, so this one's peak RSS is the load's
    subprocess.run([sys.executable, __file__, "--write-only", "--dir", str(path)] + ["--tiny"] * args.tiny, check=True)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    add("random checkpoint written", f"{size / 2**30:.2f} GiB in {time.time() - t0:.0f} s")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.time()
    model = LLaDA.from_pretrained(path, device=device, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    add("from_pretrained time", f"{time.time() - t0:.1f} s")
    add("peak host RSS before / after load", f"{rss0 / 2**30:.2f} / {rss1 / 2**30:.2f} GiB (file {size / 2**30:.2f} GiB)")
    if device.type == "cuda":
        add("GPU memory after load", f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB")

    ids = torch.randint(0, cfg.eos_token_id, (1, L), device=device)
    with torch.no_grad():
        logits = model(ids)
        add("bf16 forward: dtype, finite", f"{logits.dtype}, {bool(torch.isfinite(logits).all())}")
        add("bf16 forward, base (1 x L)", f"{timed(lambda: model(ids), device) * 1e3:.1f} ms")
    del logits
    flops_fwd = 2 * 8.0e9 * L if not args.tiny else 1.0

    for method in ("lora", "nara"):
        nara.add_adapters(model, method, r=32 if not args.tiny else 4, verbose=True)
        lam = torch.tensor([0.5], device=device)
        with torch.no_grad():
            add(f"sampling step (forward), {method}", f"{timed(lambda: model(ids, noise_level=lam), device) * 1e3:.1f} ms")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for ckpt in (False, True):
            model.train().gradient_checkpointing = ckpt
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(ids, noise_level=lam).float().logsumexp(-1).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            dt = timed(step, device, repeats=3)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
            mfu = 3 * flops_fwd / dt / 989e12 if device.type == "cuda" else 0
            add(f"train step {method}, checkpointing={ckpt}", f"{dt * 1e3:.0f} ms, peak GPU {peak:.1f} GiB, "
                f"{L / dt:.0f} tok/s, MFU {100 * mfu:.0f} % of 989 TFLOP/s bf16")
        if method == "lora":
            nara.merge(model, 0.5)
    # the recipe's update: 32 sequences of length L with NaRA, as one batch or as accumulated micro-batches
    from diffusion import sft_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    answer = torch.arange(L, device=device)[None] >= L // 4                     # prompt = first quarter
    for micro, ckpt, recompute in ((1, True, True), (4, True, True), (8, True, True), (32, True, True),
                                   (8, False, True), (32, False, True), (32, False, False)):
        model.train().gradient_checkpointing = ckpt
        model.recompute = recompute
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        x = torch.randint(0, cfg.eos_token_id, (micro, L), device=device)

        def update():
            for _ in range(32 // micro):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss, _ = sft_loss(model, x, answer.expand(micro, L))
                (loss / (32 // micro)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            dt = timed(update, device, repeats=2)
        except torch.OutOfMemoryError:
            add(f"recipe update 32 = {micro} x {32 // micro}, checkpointing={ckpt}, recompute={recompute}", "out of memory")
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
        mfu = 32 * L * 4 * 8.0e9 / dt / 989e12 if device.type == "cuda" else 0
        add(f"recipe update 32 = {micro} x {32 // micro}, checkpointing={ckpt}, recompute={recompute}",
            f"{dt:.2f} s, {32 * L / dt:.0f} tok/s, peak GPU {peak:.1f} GiB, {100 * mfu:.0f} % of 989 TFLOP/s bf16")
    model.eval()                                  # a sampling step of the GSM8K setting: 16 prompts, gen 256, block 8
    prompts = torch.randint(0, cfg.eos_token_id, (16, 100 + 256 if not args.tiny else 24), device=device)
    block, lam16 = slice(prompts.shape[1] - 8, prompts.shape[1]), torch.full((16,), 0.5, device=device)
    base_model = LLaDA.from_pretrained(args.dir, device=device).eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        t_base = timed(lambda: base_model(prompts, positions=block), device)
        t_nara = timed(lambda: model(prompts, noise_level=lam16, positions=block), device)
    add("GSM8K sampling step (16 x 356 tokens, head at the 8-token block): base / nara",
        f"{t_base * 1e3:.1f} / {t_nara * 1e3:.1f} ms (ratio {t_nara / t_base:.3f})")
    Path(args.out).write_text("\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
