"""Fixtures: tiny LLaDA checkpoints written in exactly the released layout, and a tiny tokenizer."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "OMP_NUM_THREADS" not in os.environ:        # tests/kernel_paths.py sets it to run at 1 and 2
    torch.set_num_threads(1)

import nara  # noqa: E402
from extras.files import config_json, released_shard  # noqa: E402  (importing extras registers every method)
from model import LLaDA, LLaDAConfig  # noqa: E402

REFERENCE = Path(__file__).parent / "reference"      # the real LLaDA-8B-Instruct config.json and index
PROMPT = [m for m, spec in nara.METHODS.items() if spec.inputs]       # the methods that add input tokens


def rank(method, r, **low_rank):
    """add_adapters' rank (and other low-rank options) for `method`, none for a prompt method."""
    return {} if method in PROMPT else {"r": r, **low_rank}
# The sums on one path through LLaDAConfig.tiny(): 2 blocks of 6 sums in a row (q/k/v, attention, attn_out,
# gate/up, down, the norm) of at most 128 terms (MLP width, vocabulary) each.
TINY_MODEL = 2 * 6 * 128


def tolerance(reference, terms=TINY_MODEL, dtype=torch.float32):
    """How far two computations of `reference` in `dtype` may differ when they add the same numbers in
    another order: another batch size, sequence length or shape, so another kernel or BLAS blocking. A
    sum of n terms rounds by at most about n·eps times the size of what it adds (Higham, Accuracy and
    Stability of Numerical Algorithms, §4.2), and sums in a row add their errors: taken here as
    terms·eps·max|reference|, with `terms` the terms summed on the way (TINY_MODEL for the tiny model's
    output, d_in for one layer). Computations of the same shapes on the same kernels are compared bit for
    bit instead; in float64 this is ~1e-13 of the values, far below any difference a bug makes."""
    return terms * torch.finfo(dtype).eps * float(torch.as_tensor(reference).detach().abs().max())



def random_model(config=None, seed=0):
    """A tiny LLaDA whose norms are random too, so a wrong norm weight cannot go unnoticed."""
    torch.manual_seed(seed)
    model = LLaDA(config or LLaDAConfig.tiny())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2 if "wte" not in name else 1.0)
    return model


def write_real_layout(model, directory, n_shards=6):
    """Write `model` as bf16 shards named and grouped like the released LLaDA-8B checkpoint, with
    an index holding the correct total_size and {"format": "pt"} metadata in every shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json(model.config), indent=2))
    shards, weight_map = {}, {}
    for key, t in model.state_dict().items():
        name = f"model-{released_shard(key):05d}-of-{n_shards:05d}.safetensors"
        shards.setdefault(name, {})["model." + key] = t.detach().to(torch.bfloat16).contiguous()
        weight_map["model." + key] = name
    for name, tensors in shards.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for ts in shards.values() for t in ts.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = random_model()
    return write_real_layout(model, tmp_path / "llada-tiny"), model


def train_tokenizer(directory, texts):
    """A byte-level BPE tokenizer with LLaDA's special tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|mdm_mask|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """A tiny LLaDA in the real layout with its own tokenizer, and a small LLM-Adapters file."""
    d = tmp_path_factory.mktemp("train")
    items = [{"instruction": f"Say {w} {i % 3}.", "input": "", "output": f"{w} {w}", "answer": w}
             for i, w in enumerate(["red", "blue", "green", "cat", "dog", "sun"] * 6)]
    (d / "data.json").write_text(json.dumps(items))
    texts = [f"{i['instruction']} {i['output']}" for i in items] + ["user assistant"]
    tok_path = train_tokenizer(d / "model", texts)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LLaDAConfig.tiny(vocab_size=tok.get_vocab_size(), embedding_size=tok.get_vocab_size(),
                           mask_token_id=tok.token_to_id("<|mdm_mask|>"), eos_token_id=eos, pad_token_id=eos)
    write_real_layout(random_model(cfg), d / "model")
    return d


def train_args(task, out, *extra):
    """train.py's flags for a short run on tiny_task (no adapter dropout, but for the prompt methods,
    which have none)."""
    prompt = "--method" in extra and extra[list(extra).index("--method") + 1] in PROMPT
    return ["--model", str(task / "model"), "--data", str(task / "data.json"), "--out", str(out),
            "--max-length", "40", "--val-size", "6", "--eval-every", "3", "--batch-size", "6",
            "--adapter-rank", "4", "--lr", "1e-2", *([] if prompt else ["--dropout", "0"]), *extra]
