"""Evaluate a base model or a fine-tuned adapter by generation and answer extraction (SPEC §5).

    python eval.py                                     # the default run's adapter on the bundled test set
    python eval.py --model DIR --adapter RUN_DIR/adapter --data test.json --limit 200

Scoring here: math-style tasks, the last number of the generation counts, correct when within
0.001 of float(answer) (never the test file's `output`, which may be a model-written rationale).
Generation: LLaDA's sampler with temperature 0, low-confidence remasking and block-wise early
termination, prompts left-padded with EOS and masked. Not yet here: the commonsense label sets,
code execution and the noise-level curves.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion import generate
from model import chat_ids

HERE = Path(__file__).resolve().parent
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text):
    """The last number in `text` ('1,234' -> 1234.0, '$12' -> 12.0), or None."""
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def math_correct(generation, answer):
    got = last_number(generation)
    return got is not None and abs(got - float(answer)) < 1e-3


@torch.no_grad()
def answer_all(model, tok, instructions, gen_length=16, steps=16, block_length=16, batch_size=32, desc="generating"):
    """Generate an answer to each instruction (one user turn through the chat template)."""
    eos, eot = model.config.eos_token_id, tok.token_to_id("<|eot_id|>")
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(instructions), batch_size), desc=desc, leave=False, disable=None):
        prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q in instructions[i:i + batch_size]]
        P = max(map(len, prompts))
        ids = torch.tensor([[eos] * (P - len(p)) + p for p in prompts], device=device)      # left padding
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
        x = generate(model, ids, mask, steps=steps, gen_length=gen_length, block_length=block_length,
                     till_eos=True, eot_token_id=eot)
        for row in x[:, P:].tolist():
            stop = [j for j, t in enumerate(row) if t in (eos, eot)]
            out.append(tok.decode(row[:stop[0]] if stop else row))
    return out


def accuracy(model, tok, examples, **gen):
    generations = answer_all(model, tok, [e["instruction"] for e in examples], **gen)
    correct = [math_correct(g, e["answer"]) for g, e in zip(generations, examples)]
    return sum(correct) / max(1, len(correct)), generations


def main(argv=None):
    import nara
    from model import LLaDA, load_tokenizer
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "data" / "base"), help="LLaDA model directory")
    ap.add_argument("--adapter", default=None, help="adapter directory written by train.py ('none' for the bare "
                    "model; default: the newest runs/default*/adapter)")
    ap.add_argument("--data", default=str(HERE / "data" / "arith" / "test.json"), help="LLM-Adapters JSON test file")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    ap.add_argument("--gen-length", type=int, default=16, help="answer length in tokens")
    ap.add_argument("--steps", type=int, default=16, help="sampling steps")
    ap.add_argument("--block-length", type=int, default=16, help="semi-autoregressive block length")
    args = ap.parse_args(argv)
    if args.adapter is None:
        runs = sorted(Path("runs").glob("default*/adapter"), key=lambda p: p.stat().st_mtime)
        if not runs:
            sys.exit("error: no runs/default*/adapter here: run `python train.py` first, or pass --adapter")
        args.adapter = str(runs[-1])
    try:
        examples = json.loads(Path(args.data).read_text())[:args.limit]
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: --data {args.data}: {e}")
    model = LLaDA.from_pretrained(args.model)
    tok = load_tokenizer(args.model)
    gen = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length)
    base_acc, _ = accuracy(model, tok, examples, **gen)
    print(f"base accuracy: {100 * base_acc:.1f} % of {len(examples)}")
    if args.adapter != "none":
        if not Path(args.adapter).is_dir():
            sys.exit(f"error: --adapter {args.adapter}: no such directory (run `python train.py` first)")
        nara.load_adapter(model, args.adapter)
        acc, _ = accuracy(model.eval(), tok, examples, **gen)
        print(f"adapter accuracy: {100 * acc:.1f} % of {len(examples)}")


if __name__ == "__main__":
    main()
