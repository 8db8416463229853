import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nara
import train
from conftest import random_model, train_tokenizer, write_real_layout
from model import LLaDA, LLaDAConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaDA in the real layout with its own tokenizer, and a small LLM-Adapters file."""
    d = tmp_path_factory.mktemp("train")
    items = [{"instruction": f"Say {w} {i % 3}.", "input": "", "output": f"{w} {w}", "answer": w}
             for i, w in enumerate(WORDS * 6)]
    (d / "data.json").write_text(json.dumps(items))
    tok_path = train_tokenizer(d / "model", [f"{i['instruction']} {i['output']}" for i in items] + ["user assistant"])
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    cfg = LLaDAConfig.tiny(vocab_size=tok.get_vocab_size(), embedding_size=tok.get_vocab_size(),
                           mask_token_id=tok.token_to_id("<|mdm_mask|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
                           pad_token_id=tok.token_to_id("<|endoftext|>"))
    write_real_layout(random_model(cfg), d / "model")
    return d


def args(setup, out, *extra):
    return ["--model", str(setup / "model"), "--data", str(setup / "data.json"), "--out", str(out),
            "--max-length", "40", "--val-size", "6", "--eval-every", "3", "--batch-size", "6", "--adapter-rank", "4",
            "--lr", "1e-2", "--dropout", "0", *extra]


def train_loss(model, setup):
    """The SFT loss over every example with fixed masks: comparable before and after training."""
    from diffusion import pad_sft
    from model import load_tokenizer, sft_pair
    tok, eos = load_tokenizer(setup / "model"), model.config.eos_token_id
    rows = [pad_sft(*sft_pair(tok, p, a, eos), 40, eos) for p, a in train.load_examples(setup / "data.json")]
    return train.validation_loss(model.eval(), torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), 12, 0)


@pytest.mark.parametrize("method", nara.METHODS)
def test_a_few_updates_decrease_the_loss_and_touch_only_adapters(setup, tmp_path, method):
    model = train.main(args(setup, tmp_path / "run", "--method", method, "--max-updates", "10"))
    base = LLaDA.from_pretrained(setup / "model")
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k                  # the base is bit-unchanged
    before, after = train_loss(base, setup), train_loss(model, setup)
    assert after < 0.95 * before, (before, after)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert len([r for r in rows if "val_loss" in r]) == 4                 # updates 3, 6, 9 and the last
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()


def test_resume_after_a_kill_reaches_the_same_adapter_bit_for_bit(setup, tmp_path):
    train.main(args(setup, tmp_path / "whole", "--max-updates", "7"))
    train.main(args(setup, tmp_path / "split", "--max-updates", "7", "--stop-at", "4"))
    assert not (tmp_path / "split" / "adapter").exists()
    with pytest.raises(ValueError, match="already holds a run"):
        train.main(args(setup, tmp_path / "split", "--max-updates", "7"))
    train.main(args(setup, tmp_path / "split", "--max-updates", "7", "--resume"))
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_two_process_torchrun_keeps_the_ranks_identical(setup, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *args(setup, tmp_path / "ddp", "--max-updates", "3", "--batch-size", "3")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_env()})
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-3000:]
    assert "adapter checksum on 2 ranks: identical" in res.stdout
    assert (tmp_path / "ddp" / "adapter" / "adapter.safetensors").exists()


def _env():
    import os
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


@pytest.mark.parametrize("content, words", [
    ("", "the data file is empty"),
    ("a,b\n1,2\n", "not JSON or JSON lines"),
    ('[{"instruction": "x"}]', "item 0 has no string field 'output'"),
    ('{"question": "q"}\n', "item 0 has no string field 'answer'"),
    ("[1, 2]", "item 0 is not an object"),
])
def test_bad_data_files_are_named(tmp_path, content, words):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(ValueError, match=words):
        train.load_examples(tmp_path / "d.json")


def test_data_formats_are_read(tmp_path):
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    (tmp_path / "code.jsonl").write_text(json.dumps({"query": "Write f.", "answer": "def f(): pass"}) + "\n")
    (tmp_path / "la.json").write_text(json.dumps([{"instruction": "Q", "input": "ctx", "output": "A", "answer": "A"}]))
    assert train.load_examples(tmp_path / "gsm.jsonl") == [("1+1?", "1+1=2\n#### 2")]
    assert train.load_examples(tmp_path / "code.jsonl") == [("Write f.", "def f(): pass")]
    assert train.load_examples(tmp_path / "la.json") == [("Q\n\nctx", "A")]


def test_user_mistakes_are_one_line_errors(setup, tmp_path):
    (tmp_path / "notllada").mkdir()
    for extra, words in [(["--model", str(tmp_path / "notllada")], "config.json: config file not found"),
                         (["--data", str(tmp_path / "missing.json")], "missing.json: data file not found"),
                         (["--method", "qlora"], "invalid choice: 'qlora'")]:
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(setup, tmp_path / "x"), *extra],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and words in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_data_generator_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(ROOT / "data" / "make_data.py"), "--out", str(tmp_path / name)],
                       check=True, capture_output=True)
    for f in ("corpus.txt", "arith/train.json", "arith/test.json", "base/tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "arith" / "train.json").read_bytes() == (ROOT / "data" / "arith" / "train.json").read_bytes()


def test_bundled_base_loads_in_the_real_layout():
    model = LLaDA.from_pretrained(ROOT / "data" / "base")
    assert (ROOT / "data" / "base" / "tokenizer.json").exists()
    assert model.config.mask_token_id != model.config.eos_token_id
    size = sum(f.stat().st_size for f in (ROOT / "data").rglob("*") if f.is_file())
    assert size < 25 * 2**20


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    real, calls = train.sft_loss, []

    def poisoned(model, x, answer, **kw):
        loss, lam = real(model, x, answer, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), lam      # the 5th training batch
    monkeypatch.setattr(train, "sft_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="update 4: loss is nan"):
        train.main(args(setup, out, "--max-updates", "8"))     # calls: updates 1-3, validation at 3, update 4
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["adapter"].values())
    assert not (out / "adapter").exists()
