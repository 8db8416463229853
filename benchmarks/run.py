"""Benchmarks: NaRA's cost next to LoRA, the other methods and the frozen base, as ratios.

    python benchmarks/run.py                 # writes BENCHMARKS.md (about 10 minutes on 2 cores)
    python benchmarks/run.py --quick         # fewer repeats, smaller shapes: checks the script

Every figure is a ratio measured in one process on one thread, the variants interleaved round by
round and summarised by their medians, so machine noise hits all of them alike. Tables: the adapted
layer (LLaDA-8B's 4096 x 4096 projection, 512 tokens), a training step and a sampling step of a small
LLaDA, early termination on the bundled task, parameter counts at 8B and adapter file sizes.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from variants import AuthorsPathNaRA, Fp32PathNaRA, use  # noqa: E402  (the reference paths)

import nara  # noqa: E402
from diffusion import generate, sft_loss  # noqa: E402
from extras import adapters  # noqa: E402
from extras import interop  # noqa: E402
from extras.runs import machine  # noqa: E402
from model import Linear, LLaDA, LLaDAConfig  # noqa: E402

LAYER_METHODS = ("lora", "nara", "nara-c", "multi-lora", "hira", "dora", "nara-dora")
FP32, AUTHORS = "nara, fp32 rank-r path (before)", "nara, rank-r path in activation dtype (authors')"


def interleaved(fns, repeats):
    """{name: median seconds} with the functions run round-robin, after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class Holder(torch.nn.Module):
    """One linear layer in the shape of a LLaDA block, so adapters.attach and LLaDA.conditioning apply."""
    def __init__(self, d, dtype):
        super().__init__()
        self.config = LLaDAConfig.tiny(d_model=d, n_heads=1, n_kv_heads=1, n_layers=1, mlp_hidden_size=8)
        self.transformer = torch.nn.ModuleDict(dict(wte=torch.nn.Embedding(2, d), blocks=torch.nn.ModuleList(
            [torch.nn.ModuleDict(dict(q_proj=Linear(d, d).to(dtype)))])))
        self.noise_nets, self.prompt, self.recompute = torch.nn.ModuleDict(), None, False   # as on CPU

    conditioning = LLaDA.conditioning

    def forward(self, x, lam):
        return self.transformer.blocks[0].q_proj(x, self.conditioning(lam))


def layer_table(d, tokens, batch, repeats, dtype, methods=LAYER_METHODS, variants=True):
    torch.manual_seed(0)
    W = torch.randn(d, d, dtype=dtype) / d ** 0.5
    x = torch.randn(batch, tokens // batch, d, dtype=dtype, requires_grad=True)
    lam = torch.rand(batch)
    fns = {}
    base = Holder(d, dtype)
    base.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
    fns["frozen base"] = lambda: base(x, lam).float().square().mean().backward()
    for m in methods:
        h = Holder(d, dtype)
        h.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
        nara.add_adapters(h, m, r=32, targets=("q_proj",), verbose=False)
        fns[m] = (lambda h=h: h(x, lam).float().square().mean().backward())
    if not variants:
        t = interleaved(fns, repeats)
        return [], t
    h = Holder(d, dtype)
    h.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
    nara.add_adapters(h, "nara", r=32, targets=("q_proj",), dropout=0.0, verbose=False)
    fns["nara, dropout 0"] = lambda: h(x, lam).float().square().mean().backward()
    for name, cls in ((FP32, Fp32PathNaRA), (AUTHORS, AuthorsPathNaRA)):
        other = Holder(d, dtype)
        other.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
        nara.add_adapters(other, "nara", r=32, targets=("q_proj",), verbose=False)
        use(other, cls)
        fns[name] = lambda other=other: other(x, lam).float().square().mean().backward()
    try:
        __import__("importlib").import_module("torch.distributed.tensor")   # PEFT expects it imported
        import peft
        net = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False).to(dtype))
        net[0].weight = torch.nn.Parameter(W, requires_grad=False)
        config = peft.LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, target_modules=["0"])
        pm = peft.get_peft_model(net, config)
        fns["PEFT lora"] = lambda: pm(x).float().square().mean().backward()
    except ImportError:
        pass
    t = interleaved(fns, repeats)
    rows = [f"| {k} | {1e3 * v:.1f} | {v / t['frozen base']:.3f} | {v / t['lora']:.3f} |"
            for k, v in t.items()]
    head = ["| method | ms | x frozen base | x LoRA |", "|---|---|---|---|"]
    return head + rows, t


def profile_table(d, tokens, batch, repeats, dtype, top=8):
    """Where NaRA's extra time over LoRA goes in the adapted layer's forward + backward: torch.profiler's
    self time per operator, per call, for each, and the operators whose difference is largest."""
    torch.manual_seed(0)
    W = torch.randn(d, d, dtype=dtype) / d ** 0.5
    x = torch.randn(batch, tokens // batch, d, dtype=dtype, requires_grad=True)
    lam = torch.rand(batch)
    per_op = {}
    for m in ("lora", "nara"):
        h = Holder(d, dtype)
        h.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
        nara.add_adapters(h, m, r=32, targets=("q_proj",), verbose=False)
        h(x, lam).float().square().mean().backward()                                  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                h(x, lam).float().square().mean().backward()
        per_op[m] = {e.key: e.self_cpu_time_total / repeats / 1e3 for e in prof.key_averages()}
    keys = set(per_op["lora"]) | set(per_op["nara"])
    diff = {k: per_op["nara"].get(k, 0.0) - per_op["lora"].get(k, 0.0) for k in keys}
    total = {m: sum(v.values()) for m, v in per_op.items()}
    rows = [f"| {k} | {per_op['lora'].get(k, 0.0):.2f} | {per_op['nara'].get(k, 0.0):.2f} | {diff[k]:+.2f} |"
            for k in sorted(keys, key=lambda k: -abs(diff[k]))[:top]]
    head = ["| operator (self time) | LoRA, ms | NaRA, ms | NaRA − LoRA, ms |", "|---|---|---|---|"]
    return head + rows + [f"| all operators | {total['lora']:.2f} | {total['nara']:.2f} | "
                          f"{total['nara'] - total['lora']:+.2f} |"], total


def small_config():
    return LLaDAConfig(d_model=512, n_heads=8, n_kv_heads=8, n_layers=4,
                       mlp_hidden_size=1408, vocab_size=4096,
                       embedding_size=4096, max_sequence_length=512, mask_token_id=4095, eos_token_id=4094,
                       pad_token_id=4094)


def step_table(batch, length, repeats, dtype, methods=LAYER_METHODS, variants=True):
    """Training steps of a small LLaDA in the recipe's dtypes: base weights in `dtype` (bf16 under bf16
    autocast when the CPU computes it natively), fp32 adapters."""
    torch.manual_seed(0)
    ids = torch.randint(0, 4000, (batch, length))
    answer = torch.arange(length).expand(batch, length) >= length // 4
    fns, models = {}, {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def make(method, cls=None, recompute=False):
        torch.manual_seed(0)
        model = LLaDA(small_config()).to(dtype)
        nara.add_adapters(model, method, r=32, verbose=False)
        model.recompute = recompute
        return use(model, cls) if cls else model

    def step(model, opt, micro=batch):
        for i in range(0, batch, micro):
            with autocast:
                loss = sft_loss(model, ids[i:i + micro], answer[i:i + micro])[0]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    runs = [(m, make(m), batch) for m in ("lora",) + tuple(x for x in methods if x != "lora")]
    if variants:
        runs[2:2] = [(f"nara, 1 x {batch} accumulation", runs[1][1], 1),
                     ("nara, recomputing norms, SiLU, dropout", make("nara", recompute=True), batch),
                     (FP32, make("nara", Fp32PathNaRA), batch)]
    for name, model, micro in runs:
        if name in LAYER_METHODS:
            models[name] = model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        fns[name] = lambda model=model, opt=opt, micro=micro: step(model, opt, micro)
    t = interleaved(fns, repeats)
    rows = [f"| {k} | {1e3 * v:.0f} | {batch * length / v:.0f} | {t['lora'] / v:.3f} |" for k, v in t.items()]
    return ["| method | ms / step | tokens/s | speed vs LoRA |", "|---|---|---|---|"] + rows, t, models


@torch.no_grad()
def sampling_table(models, batch, length, repeats, dtype):
    ids = torch.randint(0, 4000, (batch, length))
    lam = torch.rand(batch)
    base = LLaDA(small_config()).to(dtype).eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def forward(model, **kw):
        with autocast:
            return model(ids, **kw)
    fns = {"base": lambda: forward(base)}
    for m in [m for m in ("lora", "nara", "multi-lora") if m in models]:
        fns[m] = (lambda mm=models[m].eval(): forward(mm, noise_level=lam))
    t = interleaved(fns, repeats)
    rows = [f"| {k} | {1e3 * v:.1f} | {v / t['base']:.3f} | {v / t['lora']:.3f} |" for k, v in t.items()]
    return ["| model | ms / denoising step | x base | x LoRA |", "|---|---|---|---|"] + rows, t


@torch.no_grad()
def early_stop_table(n_prompts):
    import json

    from extras.tasks import chat_ids, load_tokenizer
    model, tok = LLaDA.from_pretrained(ROOT / "data" / "base"), load_tokenizer(ROOT / "data" / "base")
    runs = sorted((ROOT / "runs").glob("default*/adapter"))
    if runs:
        interop.load_adapter(model, runs[-1], verbose=False)
    model.eval()
    items = json.loads((ROOT / "data" / "arith" / "test.json").read_text())[:n_prompts]
    rows = ["| till_eos | model calls | wall s | same answers |", "|---|---|---|---|"]
    outs = {}
    for till in (False, True):
        calls, t0, outs[till] = 0, time.perf_counter(), []
        for it in items:
            stats = {}
            p = torch.tensor([chat_ids(tok, [{"role": "user", "content": it["instruction"]}])])
            y = generate(model, p, steps=64, gen_length=64, block_length=8, till_eos=till, stats=stats,
                         eot_token_id=tok.token_to_id("<|eot_id|>"))
            calls += stats["model_calls"]
            answer = y[0, p.shape[1]:].tolist()
            ends = (model.config.eos_token_id, tok.token_to_id("<|eot_id|>"))
            stop = [i for i, t in enumerate(answer) if t in ends]
            outs[till].append(answer[:stop[0]] if stop else answer)          # the answer up to its first EOS
        same = "-" if not till else sum(a == b for a, b in zip(outs[False], outs[True]))
        rows.append(f"| {till} | {calls} | {time.perf_counter() - t0:.1f} | {same}/{len(items)} |")
    return rows, ("the default run's NaRA adapter" if runs else "the bare bundled base")


def saved_for_backward(model, fn):
    """{(where, shape, dtype): bytes} of the tensors autograd keeps while fn() runs its forward,
    each storage once, parameters and buffers left out (they are resident anyway)."""
    import collections
    seen = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            for t in [*model.parameters(), *model.buffers()]}
    stack, kept, hooks = ["elsewhere"], collections.Counter(), []
    for name, m in model.named_modules():
        if name.startswith("transformer.blocks.1.") or name in ("transformer.blocks.1", "transformer.ln_f"):
            short = name.replace("transformer.blocks.1.", "").replace("transformer.blocks.1", "block")
            short = short.replace("transformer.", "")
            hooks.append(m.register_forward_pre_hook(lambda m, a, s=short: stack.append(s)))
            hooks.append(m.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))

    held = []     # each counted storage stays alive until the forward ends: no address of it is reused

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            held.append(t)
            kept[(stack[-1], tuple(t.shape), str(t.dtype)[6:])] += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    held.clear()
    for h in hooks:
        h.remove()
    return kept


def account_table(tokens):
    """What one block of LLaDA-8B's width keeps for backward per token (bf16, NaRA r = 32 on q/k/v/o,
    dropout 0.05, block 1 of 2 so that its input needs a gradient), keeping every intermediate vs
    recomputing norms, SiLU and the adapters' dropout."""
    cfg = LLaDAConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=2,
                      mlp_hidden_size=12288, vocab_size=512,
                      embedding_size=512, max_sequence_length=tokens, mask_token_id=511, eos_token_id=510,
                      pad_token_id=510)
    torch.manual_seed(0)
    model = LLaDA(cfg).to(torch.bfloat16)
    nara.add_adapters(model, "nara", r=32, verbose=False)
    model.train()
    ids = torch.randint(0, 500, (1, tokens))
    answer = torch.arange(tokens)[None] >= tokens // 4
    per_token = {}
    for recompute in (False, True):
        model.recompute = recompute
        torch.manual_seed(1)
        kept = saved_for_backward(model, lambda: sft_loss(model, ids, answer, t=torch.tensor([0.5])))
        per_token[recompute] = {k: v / tokens for k, v in kept.items()   # what grows with tokens
                                if k[0] not in ("elsewhere", "ln_f") and tokens in k[1]}
    label = lambda k: f"{k[0]}: {k[2]} {'x'.join(str(n) for n in k[1] if n not in (1, tokens))}"  # noqa: E731
    merged = {r: {} for r in per_token}
    for r, kept in per_token.items():
        for k, v in kept.items():
            large = max(per_token[False].get(k, 0), per_token[True].get(k, 0)) >= 512
            name = label(k) if large else "smaller tensors"
            merged[r][name] = merged[r].get(name, 0) + v
    rows = ["| kept for backward (block 1, per token) | every intermediate | recomputed |", "|---|---|---|"]
    for name in sorted(set(merged[False]) | set(merged[True]), key=lambda n: (n == "smaller tensors", n)):
        cells = [f"{merged[r].get(name, 0) / 1024:.1f} KiB" for r in (False, True)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = [sum(per_token[r].values()) / 1024 for r in (False, True)]
    rows.append(f"| **one block** | **{totals[0]:.1f} KiB** | **{totals[1]:.1f} KiB** |")
    return rows, totals


def head_table(repeats, quick):
    """The LM head at LLaDA's vocabulary (126,464) on a small model: everywhere vs only where read."""
    V = 126464
    cfg = LLaDAConfig(d_model=128 if quick else 256, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=256,
                      vocab_size=V, embedding_size=V, max_sequence_length=512, mask_token_id=V - 1,
                      eos_token_id=V - 2, pad_token_id=V - 2)
    torch.manual_seed(0)
    model = LLaDA(cfg)
    nara.add_adapters(model, "nara", r=8, verbose=False)
    ids = torch.randint(0, V - 2, (4, 64 if quick else 128))
    answer = torch.arange(ids.shape[1]).expand_as(ids) >= ids.shape[1] // 4
    t = torch.full((4,), 0.5)
    masked, _ = __import__("diffusion").sft_mask(answer, t)
    noisy = torch.where(masked, V - 1, ids)

    def full():                                               # the previous sft_loss: head and CE everywhere
        logits = model(noisy, noise_level=t)
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none") * masked
        return ce.sum() / masked.sum()

    def selected():
        logits = model(noisy, noise_level=t, logits_at=masked)
        return torch.nn.functional.cross_entropy(logits.float(), ids[masked])
    model.train()
    step = {"full head": lambda: full().backward(), "selected positions": lambda: selected().backward()}
    kept = {k: sum(saved_for_backward(model, f).values())
            for k, f in (("full head", full), ("selected positions", selected))}
    times = interleaved(step, repeats)
    model.eval()
    block = slice(ids.shape[1] - 8, ids.shape[1])
    with torch.no_grad():
        samp = interleaved({"full head": lambda: model(noisy, noise_level=t)[:, block],
                            "selected positions": lambda: model(noisy, noise_level=t,
                                                                logits_at=block)}, repeats)
    rows = ["| head computed at | training step ms | kept for backward | sampling step ms (block of 8) |",
            "|---|---|---|---|"]
    for k in step:
        what = f"{k} ({int(masked.sum())} of {masked.numel()} positions are read)" if k == "full head" else k
        rows.append(f"| {what} | {1e3 * times[k]:.0f} | {kept[k] / 2**20:.0f} MiB | {1e3 * samp[k]:.1f} |")
    return rows, times, samp, kept


def size_table():
    rows = ["| method (r = 32, q/k/v/o of 32 blocks) | trainable parameters | % of total | adapter file |",
            "|---|---|---|---|"]
    for m in ("lora", "nara", "nara-c", "multi-lora", "hira", "dora", "nara-dora"):
        with torch.device("meta"):
            model = LLaDA(LLaDAConfig())
        nara.add_adapters(model, m, r=32, verbose=False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        file_bytes = sum(t.numel() * t.element_size() for t in adapters.adapter_state(model).values())
        rows.append(f"| {m} | {trainable:,} | {100 * trainable / total:.4f} | {file_bytes / 2**20:.1f} MiB "
                    "(fp32) |")
    return rows


def amx():
    """Whether this CPU has AMX tiles (Linux's /proc/cpuinfo flags)."""
    info = Path("/proc/cpuinfo")
    return info.is_file() and "amx_tile" in info.read_text()


def amx_note():
    if amx():
        return ["This CPU has AMX: its bf16 matmuls run on tiles, as fast as the goals assume."]
    return ["This CPU has no AMX: its bf16 matmuls run on AVX-512 or the portable kernels, so the frozen "
            "matmul that LoRA and NaRA share is slow next to the small terms, which hides their cost. Where "
            "bf16 matmul is fast (AMX, a GPU's tensor cores) the small terms weigh more: "
            "`benchmarks/gpu_check.py` times LoRA's and NaRA's steps on the first GPU it runs on."]


SECOND_PATH = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def ratios(dtype, quick):
    """NaRA / LoRA per adapted layer (forward + backward), per training step and per sampling step: the
    three goals, with no other variant (what run.py measures on a second kernel path)."""
    q = quick
    _, layer = layer_table(256 if q else 4096, 64 if q else 512, 4, 3 if q else 11, dtype, ("lora", "nara"),
                           variants=False)
    _, step, models = step_table(4, 32 if q else 128, 3 if q else 9, dtype, ("lora", "nara"), variants=False)
    _, samp = sampling_table(models, 4, 32 if q else 128, 3 if q else 15, dtype)
    return {"layer": layer["nara"] / layer["lora"], "step": step["nara"] / step["lora"],
            "sampling": samp["nara"] / samp["lora"], "machine": machine()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to write")
    ap.add_argument("--ratios", action="store_true", help="only the three NaRA / LoRA ratios, as JSON (run.py "
                    "runs itself this way on a second kernel path)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="the base's dtype (default: bfloat16 where "
                    "torch's kernels are AVX512 or on CUDA, else float32)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    bf16 = torch.backends.cpu.get_cpu_capability() in ("AVX512",) or torch.cuda.is_available()
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if bf16 else torch.float32
    if args.ratios:
        return print(json.dumps(ratios(dtype, q)))
    env = {**os.environ, **SECOND_PATH, "OMP_NUM_THREADS": "1"}           # the same three, another path
    second = json.loads(subprocess.run([sys.executable, __file__, "--ratios", "--dtype", str(dtype)[6:],
                                        *["--quick"] * q], env=env, capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    layer, lt = layer_table(256 if q else 4096, 64 if q else 512, 4, 3 if q else 11, dtype)
    step, st, models = step_table(4, 32 if q else 128, 3 if q else 9, dtype)
    samp, sp = sampling_table(models, 4, 32 if q else 128, 3 if q else 15, dtype)
    early, which = early_stop_table(4 if q else 30)
    head, ht, hs, hk = head_table(3 if q else 9, q)
    profile, _ = profile_table(256 if q else 4096, 64 if q else 512, 4, 3 if q else 11, dtype)
    account, totals = account_table(20 if q else 80)   # a token count no width of the model has
    per_token_8b = [t * 32 / 2**10 for t in totals]              # MiB per token over LLaDA-8B's 32 blocks
    gib = [t * 16384 / 1024 for t in per_token_8b]               # the recipe's update: 32 x 512 tokens
    m = machine()
    lines = [
        "# Benchmarks", "",
        f"`python benchmarks/run.py` on {m['cpu']} ({platform.machine()}; torch's {m['cpu_capability']} "
        f"kernels, MKL_CBWR {m['mkl_cbwr'] or 'unset'}), {m['threads']} thread, torch {m['torch']}, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
        "Ratios of medians, variants interleaved; absolute times are this machine's and noisy.", "",
        "## Adapted layer: forward + backward, 4096 x 4096, 512 tokens in 4 sequences (one λ each), r = 32, "
        f"{str(dtype)[6:]}", "", *layer, "",
        "## Training step: a small LLaDA (d 512, 4 layers), 4 sequences x 128 tokens, r = 32, "
        f"{str(dtype)[6:]} base" + (" under bf16 autocast" if dtype == torch.bfloat16 else "")
        + ", fp32 adapters", "",
        *step, "", "## Sampling step: one denoising forward, same model and dtypes, 4 x 128 tokens", "",
        *samp, "",
        f"## Early termination: 30 bundled questions, gen 64, block 8, 64 steps, {which}", "", *early, "",
        "## Size at LLaDA-8B (docs/methods.md)", "", *size_table(), "",
        "## The LM head only where it is read: LLaDA's vocabulary (126,464), a small model, 4 sequences, "
        "half the answer masked", "", *head, "",
        "## What one block keeps for backward, per token, at LLaDA-8B's width (NaRA r = 32, bf16, dropout "
        "0.05)",
        "",
        "Measured with autograd's saved-tensor hooks (each storage once, and held until the forward ends "
        "so that no address is reused: before, a storage released during the forward could pass its "
        "address to a later tensor, which was then skipped as already counted, and the recomputed block "
        "read 97.1 or 105.1 KiB depending on what the process had run before; weights and the per-batch "
        "bf16 copies of A and B left out). `recomputed` is the default on CUDA (`model.recompute`): the "
        "norms keep their bf16 input instead of its fp32 copy, SiLU(gate)·up keeps gate and up, and each "
        "adapter's dropout(x)·Aᵀ keeps only x, shared by q, k and v, and the RNG state; backward recomputes "
        "them, and "
        "gradients are bit for bit the same on one machine (the same kernels on the same shapes; tests/test_model.py). On CPU the dropout masks are kept in "
        "bf16; on CUDA they are bool (half).", "", *account, "",
        "## NaRA / LoRA on two kernel paths (the goals: each <= 1.02)", "",
        "The same three ratios measured again by `python benchmarks/run.py --ratios` in a subprocess on torch's "
        "portable kernels and MKL's compatible code path (ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE), "
        f"{str(dtype)[6:]} base, one thread:", "",
        "| kernel path | adapted layer, forward + backward | training step | sampling step |", "|---|---|---|---|",
        f"| {m['cpu_capability']}, MKL_CBWR {m['mkl_cbwr'] or 'unset'} (this run) | {lt['nara'] / lt['lora']:.3f} | "
        f"{st['nara'] / st['lora']:.3f} | {sp['nara'] / sp['lora']:.3f} |",
        f"| {second['machine']['cpu_capability']}, MKL_CBWR {second['machine']['mkl_cbwr']} | {second['layer']:.3f} | "
        f"{second['step']:.3f} | {second['sampling']:.3f} |", "",
        f"Where NaRA's extra time goes, the adapted layer of the first table ({str(dtype)[6:]}, forward + "
        "backward, torch.profiler's self time per call, the operators that differ most):", "", *profile, "",
        *amx_note(), "",
        "## Goals", "",
        f"- NaRA / LoRA, adapted layer forward + backward ({str(dtype)[6:]}): {lt['nara'] / lt['lora']:.3f} "
        "(goal <= 1.02)",
        f"- NaRA / LoRA per training step: {st['nara'] / st['lora']:.3f} (goal <= 1.02); the fp32 rank-r "
        f"path it replaced: {st[FP32] / st['lora']:.3f}",
        f"- NaRA / LoRA per sampling step: {sp['nara'] / sp['lora']:.3f} (goal <= 1.02). The rank-2r "
        "up-projection adds r·d_out multiply-adds per token to each adapted layer, r/d_in of it: 6 % at this "
        "model's d = 512 (about 2 % of its whole step), 0.8 % at LLaDA-8B's 4096, where the layer table "
        "measures it",
        "- Recomputing norms, SiLU and dropout / keeping them, training step on this CPU: "
        f"{st['nara, recomputing norms, SiLU, dropout'] / st['nara']:.3f} (so it is on by default on CUDA "
        f"only); memory kept per block {totals[1] / totals[0]:.2f}x",
        "- LM head only where read / everywhere: training step "
        f"{ht['selected positions'] / ht['full head']:.3f}, kept for backward "
        f"{hk['selected positions'] / hk['full head']:.2f}x, sampling step "
        f"{hs['selected positions'] / hs['full head']:.3f}",
        "- Expected activation memory of the recipe's update (32 x 512 tokens, 32 blocks), from the table: "
        f"{gib[0]:.1f} GiB keeping everything, {gib[1]:.1f} GiB recomputed; plus 14.9 GiB of bf16 weights "
        "and the head's fp32 log-probabilities at the masked positions (about 3.4 GiB at half of 450 answer "
        "tokens masked): see the GPU section for what was measured.",
        "- NaRA / frozen base, adapted layer forward + backward: "
        f"{lt['nara'] / lt['frozen base']:.3f} (goal <= 1.10); "
        f"{lt['nara, dropout 0'] / lt['frozen base']:.3f} without the adapter dropout. What limits it on a "
        "CPU is the dropout mask: drawing 2 M random numbers costs 5-8 ms on one thread (about 5 % of the "
        "base's forward + backward), the same for LoRA and PEFT; on a GPU that draw is a cheap elementwise "
        "kernel.",
        "- NaRA's rank-2r path (C − I survives bf16) / the fp32 rank-r path it replaced / the rank-r product "
        "in the activations' dtype (the authors' autocast path, C − I lost), same layer: 1 / "
        f"{lt[FP32] / lt['nara']:.3f} / {lt[AUTHORS] / lt['nara']:.3f} on "
        "this CPU (benchmarks/gpu_check.py measures them on a GPU)",
        (f"- PEFT LoRA / our LoRA, same layer: {lt['PEFT lora'] / lt['lora']:.3f} (goal >= 0.95)"
         if "PEFT lora" in lt else "- PEFT is not installed here: `pip install peft` adds its LoRA to the "
         "layer table"), "",
    ]
    fast = ROOT / "benchmarks" / "results" / "fast_sampling.md"
    if fast.exists():                                    # the last `python benchmarks/fast_sampling.py`
        body = fast.read_text().split("\n", 1)[1].replace("\n## ", "\n### ")
        lines += ["## Parallel decoding and the block KV cache (benchmarks/results/fast_sampling.md)", body, ""]
    gpu = ROOT / "benchmarks" / "gpu_check_h200.md"
    if gpu.exists():                                     # the last CUDA figures, from benchmarks/gpu_check.py
        lines += ["## GPU: LLaDA-8B shapes on one H200 (`python benchmarks/gpu_check.py`, random weights)",
                  "", *gpu.read_text().splitlines(), ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
