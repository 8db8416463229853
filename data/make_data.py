"""Generate the bundled data, deterministically from a seed: two toy worlds small enough for a 2-core CPU.

    python data/make_data.py     # data/corpus.txt, data/arith/, data/base/tokenizer.json, and data/instruct/

1. The default run (data/arith, base data/base): single-digit addition. The pre-training corpus
   states the facts as plain text ("3 + 4 = 7", "the sum of 3 and 4 is 7."); the fine-tuning task
   asks the same facts as instructions in the LLM-Adapters format ({instruction, input, output,
   answer}, scored by the last number of the generation, docs/evaluation.md), in a chat format the base has
   never seen, so fine-tuning mostly teaches the format.
2. The instruct miniature (data/instruct, base data/instruct/base), closer to the paper, where
   LLaDA-8B-Instruct already knows the chat format and the fine-tuning data (math_14k) teaches
   longer rationales: the base is pre-trained on addition and subtraction facts as text
   (instruct/corpus.txt) and then instruction-tuned on single-step questions in the chat format
   (instruct/sft.json, "9 - 4 = 5. The answer is 5"); the task (instruct/train.json, test.json) is
   two-step word problems whose answer chains the two steps: "3 + 4 = 7. 7 - 2 = 5. The answer is 5".
"""
import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|mdm_mask|>"]
FACTS = ["{a} + {b} = {c}", "{b} + {a} = {c}", "the sum of {a} and {b} is {c}.", "{a} plus {b} makes {c}.",
         "adding {b} to {a} gives {c}."]
QUESTIONS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
             "Tom has {a} apples and gets {b} more. How many apples does Tom have now?"]


def corpus(rng, n_lines):
    return [rng.choice(FACTS).format(a=a, b=b, c=a + b) for a, b in
            ((rng.randrange(10), rng.randrange(10)) for _ in range(n_lines))]


def task(rng):
    """Every (a, b, question) combination once, shuffled, split 300 train / 100 test."""
    items = [{"instruction": q.format(a=a, b=b), "input": "",
              "output": f"{a} + {b} = {a + b}. The answer is {a + b}",
              "answer": str(a + b)} for a in range(10) for b in range(10) for q in QUESTIONS]
    rng.shuffle(items)
    return items[:300], items[300:]


SUB_FACTS = ["{a} - {b} = {c}", "{a} minus {b} is {c}.", "taking {b} from {a} leaves {c}."]
ONE_STEP = ["What is {a} plus {b}?", "Add {a} and {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}."]
TWO_STEP = ["Tom has {a} apples, gets {b} more and eats {c}. How many apples does Tom have now?",
            "Compute {a} + {b} - {c}.", "Start with {a}, add {b}, then take away {c}. What do you get?",
            "A box holds {a} pens. {b} pens are added and {c} are removed. How many pens are in the box?"]


def instruct_world(rng, n_lines):
    """(corpus lines, single-step chat SFT items, two-step train items, two-step test items)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    subs = [(a, b) for a in range(19) for b in range(10) if b <= a]
    lines = []
    for _ in range(n_lines):                                # half addition, half subtraction facts
        if rng.random() < 0.5:
            a, b = rng.choice(pairs)
            lines.append(rng.choice(FACTS).format(a=a, b=b, c=a + b))
        else:
            a, b = rng.choice(subs)
            lines.append(rng.choice(SUB_FACTS).format(a=a, b=b, c=a - b))
    sft = [{"instruction": q.format(a=a, b=b), "input": "",
            "output": f"{a} {op} {b} = {c}. The answer is {c}", "answer": str(c)}
           for q in ONE_STEP for op in ["+" if "plus" in q or "Add" in q else "-"]
           for a, b in (pairs if op == "+" else subs) for c in [a + b if op == "+" else a - b]]
    rng.shuffle(sft)
    items = [{"instruction": q.format(a=a, b=b, c=c), "input": "",
              "output": f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}",
              "answer": str(a + b - c)}
             for a in range(10) for b in range(10) for c in range(10) if c <= a + b for q in TWO_STEP]
    rng.shuffle(items)
    return lines, sft, items[:1500], items[1500:1700]


def train_tokenizer(texts, vocab_size=384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="random seed of the whole data set")
    ap.add_argument("--out", default=str(HERE), help="folder to write into")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    lines = corpus(rng, 20000)
    train, test = task(rng)
    (out / "arith").mkdir(parents=True, exist_ok=True)
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(lines) + "\n")
    (out / "arith" / "train.json").write_text(json.dumps(train, indent=1))
    (out / "arith" / "test.json").write_text(json.dumps(test, indent=1))
    texts = lines + [t["instruction"] + " " + t["output"] for t in train] + ["user assistant"]
    train_tokenizer(texts).save(str(out / "base" / "tokenizer.json"))
    print(f"wrote {out}/corpus.txt ({len(lines)} lines), arith/train.json ({len(train)}), "
          f"arith/test.json ({len(test)}), base/tokenizer.json")
    rng = random.Random(args.seed + 1)   # the instruct world: its own stream, its own tokenizer
    lines, sft, train, test = instruct_world(rng, 20000)
    (out / "instruct" / "base").mkdir(parents=True, exist_ok=True)
    (out / "instruct" / "corpus.txt").write_text("\n".join(lines) + "\n")
    for name, rows in (("sft", sft), ("train", train), ("test", test)):
        (out / "instruct" / f"{name}.json").write_text(json.dumps(rows, indent=1))
    texts = lines + [t["instruction"] + " " + t["output"] for t in sft + train] + ["user assistant"]
    train_tokenizer(texts).save(str(out / "instruct" / "base" / "tokenizer.json"))
    print(f"wrote {out}/instruct: corpus.txt ({len(lines)} lines), sft.json ({len(sft)}), train.json "
          f"({len(train)}), test.json ({len(test)}), base/tokenizer.json")


if __name__ == "__main__":
    main()
