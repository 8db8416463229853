"""Pre-train the small base dLLMs with LLaDA's masked-diffusion loss (and, for the instruct
miniature, instruction-tune it with LLaDA's SFT loss, all parameters, as LLaDA-Instruct was made).

    python data/make_data.py && python data/pretrain.py      # data/base: about 15 minutes on 2 CPU cores
    python data/pretrain.py --corpus data/instruct/corpus.txt --out data/instruct/base \
        --sft data/instruct/sft.json                          # the instruct miniature: about 25 minutes

Writes {config.json, model.safetensors} (bf16, the released LLaDA layout) beside the tokenizer that
make_data.py trained, so the runs load it like LLaDA-8B itself.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from diffusion import pretrain_loss, sft_loss  # noqa: E402
from extras.files import save_pretrained  # noqa: E402
from extras.tasks import load_tokenizer, pad_sft, sft_pair  # noqa: E402
from model import LLaDA, LLaDAConfig  # noqa: E402


def run(model, loss_fn, steps, lr, what, t0):
    """AdamW with linear warm-up (5 %) and decay to 0, gradient clipping 1.0."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm,
                                                                 (steps - s) / (steps - warm)))
    for step in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{what} step {step}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f} s",
                  flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    ap.add_argument("--length", type=int, default=48, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warm-up and decay)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--out", default=str(HERE / "base"), help="model directory (holds tokenizer.json)")
    ap.add_argument("--corpus", default=str(HERE / "corpus.txt"), help="pre-training text")
    ap.add_argument("--sft", default=None, help="LLM-Adapters .json of chat examples for an "
                                                "instruction-tuning stage")
    ap.add_argument("--sft-steps", type=int, default=1500, help="optimizer steps of the instruction-tuning "
                                                                "stage")
    ap.add_argument("--sft-length", type=int, default=64, help="prompt + answer tokens, EOS-padded, in that "
                                                               "stage")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    tok = load_tokenizer(out)
    stream = torch.tensor(tok.encode(Path(args.corpus).read_text(), add_special_tokens=False).ids)
    V = tok.get_vocab_size()
    cfg = LLaDAConfig(d_model=256, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=768,
                      vocab_size=V, embedding_size=(V + 63) // 64 * 64, max_sequence_length=256,
                      mask_token_id=tok.token_to_id("<|mdm_mask|>"),
                      eos_token_id=tok.token_to_id("<|endoftext|>"),
                      pad_token_id=tok.token_to_id("<|endoftext|>"))
    model = LLaDA(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    t0 = time.time()

    def windows():                                                        # (B, L) windows of the corpus
        start = torch.randint(0, len(stream) - args.length, (args.batch_size,))
        return pretrain_loss(model, torch.stack([stream[s:s + args.length] for s in start]))[0]
    run(model, windows, args.steps, args.lr, "pre-training", t0)
    if args.sft:                                                          # LLaDA's SFT stage, every parameter
        import json
        eos = cfg.eos_token_id
        rows = [pad_sft(*sft_pair(tok, e["instruction"], e["output"], eos), args.sft_length, eos)
                for e in json.loads(Path(args.sft).read_text())]
        ids, answer = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

        def chats():
            idx = torch.randint(0, len(ids), (args.batch_size,))
            return sft_loss(model, ids[idx], answer[idx])[0]
        run(model, chats, args.sft_steps, args.lr / 3, "instruction tuning", t0)
    save_pretrained(model.to(torch.bfloat16), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
