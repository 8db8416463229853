"""Benchmarks: NaRA's cost next to LoRA, the other methods and the frozen base, as ratios.

    python benchmarks/run.py                 # writes BENCHMARKS.md (about 10 minutes on 2 cores)
    python benchmarks/run.py --quick         # fewer repeats, smaller shapes: checks the script

Every figure is a ratio measured in one process on one thread, the variants interleaved round by
round and summarised by their medians, so machine noise hits all of them alike. Tables: the adapted
layer (LLaDA-8B's 4096 x 4096 projection, 512 tokens), a training step and a sampling step of a small
LLaDA, early termination on the bundled task, parameter counts at 8B and adapter file sizes.
"""
import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import nara  # noqa: E402
from diffusion import generate, sft_loss  # noqa: E402
from model import LLaDA, LLaDAConfig, Linear  # noqa: E402

LAYER_METHODS = ("lora", "nara", "nara-c", "multi-lora", "hira", "dora", "nara-dora")


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
    """One linear layer in the shape of a LLaDA block, so add_adapters and LLaDA.condition apply."""
    def __init__(self, d, dtype):
        super().__init__()
        self.config = LLaDAConfig.tiny(d_model=d, n_heads=1, n_kv_heads=1, n_layers=1, mlp_hidden_size=8)
        self.transformer = torch.nn.ModuleDict(dict(blocks=torch.nn.ModuleList(
            [torch.nn.ModuleDict(dict(q_proj=Linear(d, d).to(dtype)))])))
        self.noise_nets, self.adapter_config = torch.nn.ModuleDict(), None

    condition = LLaDA.condition

    def forward(self, x, lam):
        return self.transformer.blocks[0].q_proj(x, self.condition(lam))


def layer_table(d, tokens, batch, repeats, dtype):
    torch.manual_seed(0)
    W = torch.randn(d, d, dtype=dtype) / d ** 0.5
    x = torch.randn(batch, tokens // batch, d, dtype=dtype, requires_grad=True)
    lam = torch.rand(batch)
    fns = {}
    base = Holder(d, dtype)
    base.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
    fns["frozen base"] = lambda: base(x, lam).float().square().mean().backward()
    for m in LAYER_METHODS:
        h = Holder(d, dtype)
        h.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
        nara.add_adapters(h, m, r=32, targets=("q_proj",), verbose=False)
        fns[m] = (lambda h=h: h(x, lam).float().square().mean().backward())
    h = Holder(d, dtype)
    h.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(W, requires_grad=False)
    nara.add_adapters(h, "nara", r=32, targets=("q_proj",), dropout=0.0, verbose=False)
    fns["nara, dropout 0"] = lambda: h(x, lam).float().square().mean().backward()
    try:
        __import__("importlib").import_module("torch.distributed.tensor")   # PEFT expects it imported
        import peft
        net = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False).to(dtype))
        net[0].weight = torch.nn.Parameter(W, requires_grad=False)
        pm = peft.get_peft_model(net, peft.LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, target_modules=["0"]))
        fns["PEFT lora"] = lambda: pm(x).float().square().mean().backward()
    except ImportError:
        pass
    t = interleaved(fns, repeats)
    rows = [f"| {k} | {1e3 * v:.1f} | {v / t['frozen base']:.3f} | {v / t['lora']:.3f} |" for k, v in t.items()]
    head = ["| method | ms | x frozen base | x LoRA |", "|---|---|---|---|"]
    return head + rows, t


def small_config():
    return LLaDAConfig(d_model=512, n_heads=8, n_kv_heads=8, n_layers=4, mlp_hidden_size=1408, vocab_size=4096,
                       embedding_size=4096, max_sequence_length=512, mask_token_id=4095, eos_token_id=4094, pad_token_id=4094)


def step_table(batch, length, repeats):
    torch.manual_seed(0)
    ids = torch.randint(0, 4000, (batch, length))
    answer = torch.arange(length).expand(batch, length) >= length // 4
    fns, models = {}, {}
    for m in ("lora",) + tuple(x for x in LAYER_METHODS if x != "lora"):
        torch.manual_seed(0)
        model = LLaDA(small_config())
        nara.add_adapters(model, m, r=32, verbose=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        models[m] = model

        def step(model=model, opt=opt, micro=batch):
            for i in range(0, batch, micro):
                sft_loss(model, ids[i:i + micro], answer[i:i + micro])[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fns[m] = step
        if m == "nara":
            fns[f"nara, 1 x {batch} accumulation"] = lambda model=model, opt=opt: step(model, opt, micro=1)
    t = interleaved(fns, repeats)
    rows = [f"| {k} | {1e3 * v:.0f} | {batch * length / v:.0f} | {t['lora'] / v:.3f} |" for k, v in t.items()]
    return ["| method | ms / step | tokens/s | speed vs LoRA |", "|---|---|---|---|"] + rows, t, models


@torch.no_grad()
def sampling_table(models, batch, length, repeats):
    ids = torch.randint(0, 4000, (batch, length))
    lam = torch.rand(batch)
    base = LLaDA(small_config()).eval()
    fns = {"base": lambda: base(ids)}
    for m in ("lora", "nara", "multi-lora"):
        fns[m] = (lambda mm=models[m].eval(): mm(ids, noise_level=lam))
    t = interleaved(fns, repeats)
    rows = [f"| {k} | {1e3 * v:.1f} | {v / t['base']:.3f} | {v / t['lora']:.3f} |" for k, v in t.items()]
    return ["| model | ms / denoising step | x base | x LoRA |", "|---|---|---|---|"] + rows, t


@torch.no_grad()
def early_stop_table(n_prompts):
    import json
    from model import chat_ids, load_tokenizer
    model, tok = LLaDA.from_pretrained(ROOT / "data" / "base"), load_tokenizer(ROOT / "data" / "base")
    runs = sorted((ROOT / "runs").glob("default*/adapter"))
    if runs:
        nara.load_adapter(model, runs[-1], verbose=False)
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
            stop = [i for i, t in enumerate(answer) if t in (model.config.eos_token_id, tok.token_to_id("<|eot_id|>"))]
            outs[till].append(answer[:stop[0]] if stop else answer)          # the answer up to its first EOS
        rows.append(f"| {till} | {calls} | {time.perf_counter() - t0:.1f} | "
                    f"{'-' if not till else sum(a == b for a, b in zip(outs[False], outs[True]))}/{len(items)} |")
    return rows, ("the default run's NaRA adapter" if runs else "the bare bundled base")


def size_table():
    rows = ["| method (r = 32, q/k/v/o of 32 blocks) | trainable parameters | % of total | adapter file |",
            "|---|---|---|---|"]
    for m in ("lora", "nara", "nara-c", "multi-lora", "hira", "dora", "nara-dora"):
        with torch.device("meta"):
            model = LLaDA(LLaDAConfig())
        nara.add_adapters(model, m, r=32, verbose=False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        file_bytes = sum(t.numel() * t.element_size() for t in nara.adapter_state(model).values())
        rows.append(f"| {m} | {trainable:,} | {100 * trainable / total:.4f} | {file_bytes / 2**20:.1f} MiB (fp32) |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    dtype = torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX512",) or torch.cuda.is_available() else torch.float32
    layer, lt = layer_table(256 if q else 4096, 64 if q else 512, 4, 3 if q else 11, dtype)
    step, st, models = step_table(4, 32 if q else 128, 3 if q else 9)
    samp, sp = sampling_table(models, 4, 32 if q else 128, 3 if q else 15)
    early, which = early_stop_table(4 if q else 30)
    lines = [
        "# Benchmarks", "",
        f"`python benchmarks/run.py` on {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
        "Ratios of medians, variants interleaved; absolute times are this machine's and noisy.", "",
        f"## Adapted layer: forward + backward, 4096 x 4096, 512 tokens in 4 sequences (one λ each), r = 32, {str(dtype)[6:]}",
        "", *layer, "",
        "## Training step: a small LLaDA (d 512, 4 layers), 4 sequences x 128 tokens, r = 32, fp32", "", *step, "",
        "## Sampling step: one denoising forward, same model, 4 x 128 tokens", "", *samp, "",
        f"## Early termination: 30 bundled questions, gen 64, block 8, 64 steps, {which}", "", *early, "",
        "## Size at LLaDA-8B (SPEC §3)", "", *size_table(), "",
        "## Goals", "",
        f"- NaRA / LoRA per training step: {st['nara'] / st['lora']:.3f} (goal <= 1.05)",
        f"- NaRA / LoRA per sampling step: {sp['nara'] / sp['lora']:.3f} (goal <= 1.05)",
        f"- NaRA / frozen base, adapted layer forward + backward: {lt['nara'] / lt['frozen base']:.3f} (goal <= 1.10); "
        f"{lt['nara, dropout 0'] / lt['frozen base']:.3f} without the adapter dropout. What limits it on a CPU is the "
        "dropout mask: drawing 2 M random numbers costs 5-8 ms on one thread (about 5 % of the base's "
        "forward + backward), the same for LoRA and PEFT; on a GPU that draw is a cheap elementwise kernel.",
        (f"- PEFT LoRA / our LoRA, same layer: {lt['PEFT lora'] / lt['lora']:.3f} (goal >= 0.95)" if "PEFT lora" in lt
         else "- PEFT is not installed here: `pip install peft` adds its LoRA to the layer table"), "",
    ]
    gpu = ROOT / "benchmarks" / "gpu_check_h200.md"
    if gpu.exists():                                     # the last CUDA figures, from benchmarks/gpu_check.py
        lines += ["## GPU: LLaDA-8B shapes on one H200 (`python benchmarks/gpu_check.py`, random weights)", "",
                  *gpu.read_text().splitlines(), ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
