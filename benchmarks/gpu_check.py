"""The one prepared check of the CUDA path: the real commands end to end, then LLaDA-8B's shapes.

    python benchmarks/gpu_check.py          # on a GPU machine: writes runs/gpu_check.md (~6 min on an H200)
    python benchmarks/gpu_check.py --tiny                      # the same script on a CPU, tiny shapes

Part 1 runs the commands users run, on the bundled model, as subprocesses on this machine's device
(bf16 weights, fp32 adapters, bf16 autocast on CUDA): a short `train.py`, the same run killed after its
first checkpoint and continued with --resume (max |difference| of the two adapters: 0 on a CPU; on
CUDA some reductions are not deterministic), `eval.py` (the default table), `eval.py --noise-curve`,
`eval.py --task humaneval --limit 2` and `torchrun --nproc_per_node=1 train.py`.
Part 2 writes a random checkpoint at LLaDA-8B's shapes in the released layout and measures loading
(host RSS, time), bf16 forwards, LoRA/NaRA training steps with and without activation checkpointing,
the recipe's 32-sequence update in several layouts, what NaRA's rank-2r path (nara.py) and the fp32
rank-r path it replaced cost against the rank-r product in bf16 (the authors' autocast path) and how
much of C − I = 1e-3·D each applies (benchmarks/variants.py), and
a sampling step of the paper's GSM8K setting next to the base's. FLOP utilisation counts the work of
a frozen-base adapter step: forward + input-gradient backward = 4 x 8.0 GFLOP per token.
The report is rewritten after every row, so a run stopped by a time limit keeps what it measured.
"""
import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from variants import AuthorsPathNaRA, Fp32PathNaRA, use  # noqa: E402  (the reference paths)

import nara  # noqa: E402
from diffusion import sft_loss  # noqa: E402
from extras import adapters  # noqa: E402
from extras.files import config_json, released_shard  # noqa: E402
from extras.runs import machine  # noqa: E402
from model import LLaDA, LLaDAConfig  # noqa: E402


class Report:
    """Rows of a markdown table, printed and written to the file after each one."""
    def __init__(self, path, header):
        self.path, self.lines = Path(path), [*header, "", "| what | figure |", "|---|---|"]

    def add(self, what, figure):
        self.lines.append(f"| {what} | {figure} |")
        print(what, "=", figure, flush=True)
        self.path.write_text("\n".join(self.lines) + "\n")


def commit():
    """The checked-out commit (with "+changes" when the tree differs), so every figure names its code."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---------------------------------------------------------------- part 1: the commands
def commands(report, work, tiny):
    """Each command's exit status, wall time and last line; the kill/resume adapters compared."""
    from safetensors.torch import load_file
    py, env = sys.executable, {**os.environ, "PYTHONUNBUFFERED": "1"}
    updates = ["--max-updates", "6" if tiny else "40", "--eval-every", "3" if tiny else "10"]
    short = ["--limit", "8"] if tiny else []
    if tiny:   # a shorter held-out report than the default's 100 items
        test = json.loads((ROOT / "data" / "arith" / "test.json").read_text())[:8]
        (work / "test.json").write_text(json.dumps(test))
        updates += ["--test", str(work / "test.json")]

    def run(what, argv, timeout=900):
        t0 = time.time()
        try:
            res = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
            last = (res.stdout.strip().splitlines() or [""])[-1][:120].replace("|", "/")
            figure = f"exit {res.returncode}, {time.time() - t0:.0f} s: {last}"
            if res.returncode:
                figure += f" — {res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else ''}"
        except subprocess.TimeoutExpired:
            figure = f"timed out after {timeout} s"
        report.add(what, figure)

    run("python train.py (short default run)", [py, str(ROOT / "train.py"), "--out", "runs/whole", *updates])
    killed = subprocess.Popen([py, str(ROOT / "train.py"), "--out", "runs/split", *updates], cwd=work,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while killed.poll() is None and not (work / "runs" / "split" / "checkpoint.pt").exists():
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    run("same run killed after its first checkpoint, then --resume",
        [py, str(ROOT / "train.py"), "--out", "runs/split", "--resume", *updates])
    try:
        a, b = (load_file(str(work / "runs" / d / "adapter" / "adapter.safetensors"))
                for d in ("whole", "split"))
        report.add("resumed vs uninterrupted adapter, max abs difference",
                   f"{max(float((a[k].float() - b[k].float()).abs().max()) for k in a):.3g}")
    except Exception as e:                                                 # noqa: BLE001 (the report goes on)
        report.add("resumed vs uninterrupted adapter", f"not compared: {type(e).__name__}: {e}")
    run("python eval.py (default: base vs the run's adapter)",
        [py, str(ROOT / "eval.py"), "--adapter", "runs/whole/adapter", *short, "--out", "runs/eval"])
    eval_py = [py, str(ROOT / "eval.py")]
    run("python eval.py --noise-curve",
        [*eval_py, "--adapter", "runs/whole/adapter", "--noise-curve", *short, "--out", "runs/noise"])
    run("python eval.py --task humaneval --limit 2",
        [*eval_py, "--task", "humaneval", "--limit", "2", "--adapter", "none", "--allow-unsandboxed-code",
         "--out", "runs/he", *(["--gen-length", "16", "--steps", "16"] if tiny else [])])
    run("torchrun --nproc_per_node=1 train.py",
        [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ROOT / "train.py"),
         "--out", "runs/ddp", *updates])


# ---------------------------------------------------------------- part 2: LLaDA-8B's shapes
def write_random_checkpoint(cfg, path, device):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_json(cfg), indent=2))
    with torch.device("meta"):
        shapes = LLaDA(cfg).base_shapes()
    shards, weight_map, total = {}, {}, 0
    for key, shape in shapes.items():
        name = f"model-{released_shard(key):05d}-of-00006.safetensors"
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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def core_share(model, device, L):
    """How much of C − I = 1e-3·D the first q_proj applies in bf16, against fp64 (1 = all of it)."""
    layer, r = model.eval().transformer.blocks[0].q_proj, model.transformer.blocks[0].q_proj.r   # no dropout
    D = torch.diag(torch.tensor([(-1.0) ** i for i in range(r)], device=device))
    x = model.transformer.wte(torch.randint(0, model.config.eos_token_id, (2, L), device=device))
    with torch.no_grad():
        B = torch.randn_like(layer.lora_B)
        exact = (x.double() @ layer.lora_A.double().T) @ (1e-3 * D).double().T @ B.double().T
        C1, C0 = torch.eye(r, device=device) + 1e-3 * D, torch.eye(r, device=device)
        layer.lora_B.copy_(B)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            applied = (layer(x, {"nara": C1}).double() - layer(x, {"nara": C0}).double())
        layer.lora_B.zero_()
    return float((applied * exact).sum() / (exact * exact).sum())


def shapes(report, args, device, tiny):
    cfg = LLaDAConfig.tiny() if tiny else LLaDAConfig()
    L = 64 if tiny else min(args.length, cfg.max_sequence_length)
    path = Path(args.dir)
    t0 = time.time()                      # written by a child process, so this one's peak RSS is the load's
    subprocess.run([sys.executable, __file__, "--write-only", "--dir", str(path)] + ["--tiny"] * tiny,
                   check=True)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    report.add("random checkpoint written", f"{size / 2**30:.2f} GiB in {time.time() - t0:.0f} s")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.time()
    model = LLaDA.from_pretrained(path, device=device, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.add("from_pretrained time", f"{time.time() - t0:.1f} s")
    report.add("peak host RSS before / after load", f"{rss0 / 2**30:.2f} / {rss1 / 2**30:.2f} GiB (file "
                                                    f"{size / 2**30:.2f} GiB)")
    if device.type == "cuda":
        report.add("GPU memory after load", f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    cuda = device.type == "cuda"
    peak = lambda: torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0  # noqa: E731
    mfu = lambda tokens, dt: 4 * 8.0e9 * tokens / dt / 989e12 if cuda else 0.0  # noqa: E731

    ids = torch.randint(0, cfg.eos_token_id, (1, L), device=device)
    with torch.no_grad():
        logits = model(ids)
        report.add("bf16 forward: dtype, finite", f"{logits.dtype}, {bool(torch.isfinite(logits).all())}")
        report.add("bf16 forward, base (1 x L)", f"{timed(lambda: model(ids), device) * 1e3:.1f} ms")
    del logits
    lam = torch.tensor([0.5], device=device)
    for method in ("lora", "nara"):
        nara.add_adapters(model, method, r=4 if tiny else 32)
        with torch.no_grad():
            dt = timed(lambda: model(ids, noise_level=lam), device)
            report.add(f"sampling step (forward), {method}", f"{dt * 1e3:.1f} ms")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for ckpt in (False, True):
            model.train().gradient_checkpointing = ckpt
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(ids, noise_level=lam).float().logsumexp(-1).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            dt = timed(step, device, repeats=3)
            report.add(f"train step {method}, checkpointing={ckpt}",
                       f"{dt * 1e3:.0f} ms, peak GPU {peak():.1f} GiB, {L / dt:.0f} tok/s, MFU "
                       f"{100 * mfu(L, dt):.0f} %")
        opt = None                                # freed before the next optimizer
        if method == "lora":
            adapters.merge(model, 0.5)
    for name, cls in (("rank-2r path", nara.NaRALinear), ("fp32 rank-r path, before", Fp32PathNaRA),
                      ("rank-r in bf16, authors'", AuthorsPathNaRA)):
        report.add(f"NaRA in bf16: share of C − I = 1e-3·D applied ({name}; 1 = all)",
                   f"{core_share(use(model, cls), device, L):.3f}")
    use(model, nara.NaRALinear)
    # the recipe's update: 32 sequences of length L with NaRA, as one batch or as accumulated micro-batches
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    answer = torch.arange(L, device=device)[None] >= L // 4                    # prompt = first quarter
    layouts = ((1, True, True), (4, True, True), (8, True, True), (32, True, True),
               (8, False, True), (32, False, True),
               (32, False, False), (32, False, "fp32"), (32, False, "authors"))
    for micro, ckpt, recompute in layouts:
        model.train().gradient_checkpointing = ckpt
        model.recompute = recompute is not False
        use(model, {"fp32": Fp32PathNaRA, "authors": AuthorsPathNaRA}.get(recompute, nara.NaRALinear))
        if cuda:
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
        what = (f"recipe update 32 = {micro} x {32 // micro}, checkpointing={ckpt}, "
                + {"authors": "rank-r path in bf16 (authors')", "fp32": "fp32 rank-r path (before)"}.get(
                    recompute, f"recompute={recompute}"))
        try:
            dt = timed(update, device, repeats=1 if micro == 1 else 2)
        except torch.cuda.OutOfMemoryError:
            report.add(what, "out of memory")
            continue
        report.add(what, f"{dt:.2f} s, {32 * L / dt:.0f} tok/s, peak GPU {peak():.1f} GiB, "
                         f"{100 * mfu(32 * L, dt):.0f} % MFU")
    opt = None
    model.eval()   # a sampling step of the GSM8K setting: 16 prompts, gen 256, block 8
    prompts = torch.randint(0, cfg.eos_token_id, (16, 100 + 256 if not tiny else 24), device=device)
    block, lam16 = slice(prompts.shape[1] - 8, prompts.shape[1]), torch.full((16,), 0.5, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        t_nara = timed(lambda: model(prompts, noise_level=lam16, logits_at=block), device)
        with adapters.base_only(model):   # the same model, adapters bypassed
            t_base = timed(lambda: model(prompts, noise_level=lam16, logits_at=block), device)
    report.add("GSM8K sampling step (16 x 356 tokens, head at the 8-token block): base / nara",
               f"{t_base * 1e3:.1f} / {t_nara * 1e3:.1f} ms (ratio {t_nara / t_base:.3f})")
    # the fast sampler's steps (diffusion.BlockCache) at the answer's first block of 32: the full forward
    # (the block's first step), the block and all after it (prefix), the block alone (dual)
    lo = prompts.shape[1] - (256 if not tiny else 8)
    first = slice(lo, lo + (32 if not tiny else 4))
    span = first.stop - lo
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        _, kv = model(prompts, noise_level=lam16, logits_at=first, keep_kv=True)
        t_full = timed(lambda: model(prompts, noise_level=lam16, logits_at=first), device)
        t_prefix = timed(lambda: model(prompts[:, lo:], noise_level=lam16, logits_at=slice(0, span), kv=kv,
                                       start=lo), device)
        t_dual = timed(lambda: model(prompts[:, lo:first.stop], noise_level=lam16, logits_at=slice(0, span), kv=kv,
                                     start=lo), device)
    kv = None                                          # freed before the report
    report.add("GSM8K step with the block cache (nara, block 32 at the answer's start): full / prefix / dual",
               f"{t_full * 1e3:.1f} / {t_prefix * 1e3:.1f} / {t_dual * 1e3:.1f} ms (dual {t_full / t_dual:.1f}x "
               "faster)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llada-8b-random", help="where to write the random checkpoint")
    ap.add_argument("--work", default="/tmp/gpu-check-runs", help="working folder of the commands of part 1")
    ap.add_argument("--out", default="runs/gpu_check.md", help="markdown file for the results")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, to check the script itself")
    ap.add_argument("--length", type=int, default=512, help="sequence length of the timed steps")
    ap.add_argument("--skip-commands", action="store_true", help="only part 2")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.write_only:
        write_random_checkpoint(LLaDAConfig.tiny() if args.tiny else LLaDAConfig(), Path(args.dir), device)
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    m = machine()
    report = Report(args.out, [f"device: {name}; host CPU {m['cpu']} ({m['cpu_capability']} kernels); torch "
                               f"{torch.__version__}; {time.strftime('%Y-%m-%d')}; code of commit {commit()}"])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_commands:
        commands(report, work, args.tiny)
    shapes(report, args, device, args.tiny)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
