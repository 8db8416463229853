"""Round trips between this project, PEFT and transformers' AutoModel, on a tiny checkpoint in the
real layout, with the official remote code (configuration_llada.py, modeling_llada.py from a
LLaDA-8B download). Needs `pip install transformers peft`; neither is a dependency of the project.

    python benchmarks/interop_check.py --code path/to/LLaDA-8B-Instruct     # prints one line per round trip

Each line gives the largest |difference| of logits between the two sides (0 = identical) or the
error that the side which should refuse raised. transformers' logits come from its own LLaDA code;
ours from model.py.
"""
import argparse
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import nara  # noqa: E402
from extras import adapters  # noqa: E402
from extras import interop  # noqa: E402
from extras.files import CODE_FILES, save_pretrained  # noqa: E402
from model import LLaDA, LLaDAConfig  # noqa: E402

IDS = torch.tensor([[5, 9, 33, 8, 71, 2, 126, 126], [1, 4, 100, 3, 3, 60, 126, 7]])


def tiny(directory, code, seed=0):
    """A random tiny LLaDA saved in the real layout, with the official code beside it."""
    torch.manual_seed(seed)
    model = LLaDA(LLaDAConfig.tiny(n_kv_heads=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name or "ln_f" in name else p.normal_(0, 0.2)
    directory.mkdir(parents=True)
    for f in CODE_FILES:
        shutil.copy(Path(code) / f, directory / f)
    model.source = str(directory)
    save_pretrained(model, directory)
    return LLaDA.from_pretrained(directory, device="cpu", dtype=torch.float32)


def theirs(directory, dtype=torch.float32):
    from transformers import AutoModel
    return AutoModel.from_pretrained(directory, trust_remote_code=True, torch_dtype=dtype).eval()


@torch.no_grad()
def logits(model, **kw):
    out = model(IDS, **kw)
    return (out.logits if hasattr(out, "logits") else out).float()


def wrap(model):
    """Our model under the module names transformers' LLaDA has (model.transformer...), for PEFT."""
    class HF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, **kw):
            return self.model(input_ids, **kw)
    return HF()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", required=True, help="folder holding configuration_llada.py and "
                                                  "modeling_llada.py")
    args = ap.parse_args()
    import peft
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="nara-interop-"))
    ours = tiny(work / "base", args.code)
    rows = []

    def check(name, fn, refused=False):
        try:
            result = fn()
            rows.append((name, "NOT REFUSED: " + result if refused else result))
        except Exception as e:                                  # a failure is a finding, printed, not hidden
            first = str(e).splitlines()[0][:160].replace(str(work), "...")
            rows.append((name, f"refused by name: {first}" if refused and isinstance(e, ValueError)
                         else f"FAILS: {type(e).__name__}: {first}"))
            traceback.print_exc(file=open(work / "errors.txt", "a"))

    def diff(a, b):
        return f"max |diff| {float((a - b).abs().max()):.2e}"
    check("LLaDA.from_pretrained vs AutoModel, fp32",
          lambda: diff(logits(ours), logits(theirs(work / "base"))))
    check("LLaDA.from_pretrained vs AutoModel, bf16", lambda: diff(
        logits(LLaDA.from_pretrained(work / "base", device="cpu", dtype=torch.bfloat16)),
        logits(theirs(work / "base", torch.bfloat16))))

    def peft_to_ours(name, **options):
        base = theirs(work / "base")
        targets = options.pop("target_modules", ["q_proj", "v_proj"])
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False,
                         **options)
        pm = get_peft_model(base, cfg).eval()
        pm.save_pretrained(work / name)
        plain = LLaDA.from_pretrained(work / "base", device="cpu", dtype=torch.float32)
        mine = interop.load_peft(plain, work / name, verbose=False).eval()
        return diff(logits(mine), logits(pm))
    check("PEFT LoRA -> interop.load_peft", lambda: peft_to_ours("plain"))
    check("PEFT LoRA use_rslora -> load_peft", lambda: peft_to_ours("rslora", use_rslora=True))
    check("PEFT LoRA alpha_pattern -> load_peft", lambda: peft_to_ours("alpha", alpha_pattern={"v_proj": 32}))
    check("PEFT LoRA rank_pattern -> load_peft", lambda: peft_to_ours("rank", rank_pattern={"q_proj": 2}))
    check("PEFT LoRA regex target_modules -> load_peft",
          lambda: peft_to_ours("regex", target_modules=r".*\.blocks\.1\.(q_proj|attn_out)"))
    check("PEFT DoRA (use_dora) -> load_peft", lambda: peft_to_ours("dora", use_dora=True))
    for option, value in (("layers_to_transform", [0]), ("modules_to_save", ["ln_f"]), ("bias", "all")):
        check(f"PEFT LoRA {option} -> load_peft", lambda o=option, v=value: peft_to_ours(o, **{o: v}),
              refused=True)
    check("PEFT LoRA on the LM head -> load_peft", lambda: peft_to_ours("head", target_modules=["ff_out"]),
          refused=True)

    def ours_to_peft(method, lam=0.5, auto=None):
        model = LLaDA.from_pretrained(work / "base", device="cpu", dtype=torch.float32)
        nara.add_adapters(model, method, r=4, dropout=0.0, verbose=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        interop.export_peft(model, work / f"export-{method}", lam=lam)
        expect = logits(model.eval(), noise_level=torch.full((2,), lam))
        if auto:
            pm = getattr(peft, auto).from_pretrained(work / f"export-{method}", trust_remote_code=True,
                                                     torch_dtype=torch.float32)
        else:
            pm = PeftModel.from_pretrained(theirs(work / "base"), work / f"export-{method}")
        return diff(expect, logits(pm.eval()))
    for method in ("lora", "nara", "dora"):
        check(f"interop.export_peft ({method}) -> PeftModel.from_pretrained",
              lambda m=method: ours_to_peft(m))
    for auto in ("AutoPeftModelForCausalLM", "AutoPeftModel"):
        check(f"interop.export_peft -> {auto}.from_pretrained", lambda a=auto: ours_to_peft("nara", auto=a))

    def merged(lam=0.3):
        model = LLaDA.from_pretrained(work / "base", device="cpu", dtype=torch.float32)
        nara.add_adapters(model, "nara", r=4, dropout=0.0, verbose=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        expect = logits(model.eval(), noise_level=torch.full((2,), lam))
        save_pretrained(adapters.merge(model, lam), work / "merged")
        return diff(expect, logits(theirs(work / "merged")))
    check("save_pretrained -> AutoModel", lambda: diff(logits(ours), logits(theirs(work / "base"))))
    check("adapters.merge(λ) + save_pretrained -> AutoModel", merged)
    width = max(len(r[0]) for r in rows)
    for name, result in rows:
        print(f"{name:<{width}}  {result}")
    print(json.dumps({"errors": str(work / "errors.txt")}))


if __name__ == "__main__":
    main()
