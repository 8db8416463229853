"""Generate the bundled data of the default run, deterministically from a seed.

    python data/make_data.py            # writes data/corpus.txt, data/arith/{train,test}.json, data/base/tokenizer.json

A toy world small enough for a 2-core CPU: single-digit addition. The pre-training corpus states
the facts as plain text ("3 + 4 = 7", "the sum of 3 and 4 is 7."); the fine-tuning task asks the
same facts as instructions in the LLM-Adapters format ({instruction, input, output, answer}, scored
by the last number of the generation, SPEC §5), which the pre-trained base has never seen.
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
    items = [{"instruction": q.format(a=a, b=b), "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}",
              "answer": str(a + b)} for a in range(10) for b in range(10) for q in QUESTIONS]
    rng.shuffle(items)
    return items[:300], items[300:]


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


if __name__ == "__main__":
    main()
