"""Download the paper's training and test files (LLM-Adapters) into data/llm-adapters/.

    python data/download.py                    # commonsense_170k.json, math_14k.json and the 14 test sets
    python data/download.py --only math_14k    # one file

Needs a network. Offline, it says which URL to fetch on another machine and where to put it.
Model weights are not downloaded here: fetch GSAI-ML/LLaDA-8B-Instruct with `huggingface-cli download`
(or any mirror) and pass the directory to train.py --model.
"""
import argparse
import sys
import urllib.request
from pathlib import Path

BASE = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main"
FILES = {"commonsense_170k": "ft-training_set/commonsense_170k.json", "math_14k": "ft-training_set/math_14k.json"}
FILES.update({task: f"dataset/{task}/test.json" for task in (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
    "AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP")})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(FILES), help="download only these (repeatable)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "llm-adapters"), help="target folder")
    args = ap.parse_args()
    out = Path(args.out)
    for name in args.only or FILES:
        target = out / FILES[name]
        if target.exists():
            print(f"{target}: already there")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{BASE}/{FILES[name]}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = r.read()
        except OSError as e:
            sys.exit(f"error: could not fetch {url} ({e}). Offline? Download it elsewhere and copy it to {target}.")
        tmp = target.with_suffix(".part")
        tmp.write_bytes(body)
        tmp.replace(target)
        print(f"{target}: {len(body):,} bytes")


if __name__ == "__main__":
    main()
