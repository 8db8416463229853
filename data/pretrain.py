"""Pre-train the small base dLLM of the default run with LLaDA's masked-diffusion loss.

    python data/make_data.py && python data/pretrain.py      # about 15 minutes on 2 CPU cores

Writes data/base/{config.json, model.safetensors} (bf16, the released LLaDA layout) beside the
tokenizer that make_data.py trained, so the default run loads it like LLaDA-8B itself.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffusion import pretrain_loss  # noqa: E402
from model import LLaDA, LLaDAConfig, load_tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    ap.add_argument("--length", type=int, default=48, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warm-up and decay)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--out", default=str(HERE / "base"), help="model directory (holds tokenizer.json)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    tok = load_tokenizer(out)
    stream = torch.tensor(tok.encode((HERE / "corpus.txt").read_text(), add_special_tokens=False).ids)
    V = tok.get_vocab_size()
    cfg = LLaDAConfig(d_model=256, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=768,
                      vocab_size=V, embedding_size=(V + 63) // 64 * 64, max_sequence_length=256,
                      mask_token_id=tok.token_to_id("<|mdm_mask|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
                      pad_token_id=tok.token_to_id("<|endoftext|>"))
    model = LLaDA(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = args.steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (args.steps - s) / (args.steps - warm)))
    t0 = time.time()
    for step in range(args.steps):
        start = torch.randint(0, len(stream) - args.length, (args.batch_size,))
        x = torch.stack([stream[s:s + args.length] for s in start])            # (B, L) windows of the corpus
        loss, _ = pretrain_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} | loss {loss.item():.3f} | {time.time() - t0:.0f} s", flush=True)
    model.to(torch.bfloat16).save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
