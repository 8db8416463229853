"""Download the paper's training and test files into data/llm-adapters/ and data/code/.

    python data/download.py                    # everything below
    python data/download.py --only math_14k    # one file

LLM-Adapters (commonsense_170k.json, math_14k.json and the 14 test sets, as raw files from its
GitHub repository); the code table: the Python split of CodeFeedback as PiSSA released it
(fxmeng/pissa-dataset, python/train.json, through huggingface_hub when it is installed) and MBPP's
test split (task ids 11-510 of the original mbpp.jsonl). Needs a network; offline, it says which URL
to fetch on another machine and where to put the file. Model weights are not downloaded here: fetch
GSAI-ML/LLaDA-8B-Instruct with `huggingface-cli download` (or any mirror) and pass the directory.
"""
import argparse
import json
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLM_ADAPTERS = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main"
MBPP = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"
FILES = {"commonsense_170k": "llm-adapters/ft-training_set/commonsense_170k.json",
         "math_14k": "llm-adapters/ft-training_set/math_14k.json",
         **{task: f"llm-adapters/dataset/{task}/test.json" for task in (
             "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
             "openbookqa", "AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP")},
         "codefeedback_python": "code/codefeedback_python.json", "mbpp": "code/mbpp_test.jsonl"}


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    except OSError as e:
        raise OSError(f"could not fetch {url} ({e})") from None


def content(name):
    """The bytes to write for one entry of FILES."""
    if name == "codefeedback_python":
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            url = "https://huggingface.co/datasets/fxmeng/pissa-dataset/resolve/main/python/train.json"
            raise OSError(f"huggingface_hub is not installed (pip install huggingface_hub); or fetch "
                          f"{url}") from None
        try:
            return Path(hf_hub_download("fxmeng/pissa-dataset", "python/train.json",
                                        repo_type="dataset")).read_bytes()
        except Exception as e:
            raise OSError(f"could not download fxmeng/pissa-dataset python/train.json "
                          f"({type(e).__name__})") from None
    if name == "mbpp":                               # the test split: task ids 11-510
        rows = [json.loads(line) for line in fetch(MBPP).decode().splitlines() if line.strip()]
        return "".join(json.dumps(r) + "\n" for r in rows if 11 <= r["task_id"] <= 510).encode()
    return fetch(f"{LLM_ADAPTERS}/{FILES[name].split('/', 1)[1]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(FILES), help="download only these (repeatable)")
    ap.add_argument("--out", default=str(HERE), help="target folder (holds llm-adapters/ and code/)")
    args = ap.parse_args()
    failed = []
    for name in args.only or FILES:
        target = Path(args.out) / FILES[name]
        if target.exists():
            print(f"{target}: already there")
            continue
        try:
            body = content(name)
        except OSError as e:
            failed.append(name)
            print(f"error: {name}: {e}. Offline? Fetch it elsewhere and copy it to {target}.",
                  file=sys.stderr)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        tmp.write_bytes(body)
        tmp.replace(target)
        print(f"{target}: {len(body):,} bytes")
    if failed:
        sys.exit(f"error: {len(failed)} of the files could not be fetched: {', '.join(failed)}")


if __name__ == "__main__":
    main()
