import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, train_args
from safetensors.torch import load_file

import nara
import train
from extras import adapters, interop, tasks
from model import LLaDA

ROOT = Path(__file__).resolve().parents[1]


def train_loss(model, tiny_task):
    """The SFT loss over every example with fixed masks: comparable before and after training."""
    from extras.tasks import load_tokenizer, pad_sft, sft_pair
    tok, eos = load_tokenizer(tiny_task / "model"), model.config.eos_token_id
    examples = tasks.load_examples(tiny_task / "data.json")
    rows = [pad_sft(*sft_pair(tok, p, a, eos), 40, eos) for p, a in examples]
    return train.validation_loss(model.eval(), torch.stack([r[0] for r in rows]),
                                 torch.stack([r[1] for r in rows]), 12, 0)


@pytest.mark.parametrize("method", nara.METHODS)
def test_a_few_updates_decrease_the_loss_and_touch_only_adapters(tiny_task, tmp_path, method):
    model = train.main(train_args(tiny_task, tmp_path / "run", "--method", method, "--max-updates", "10"))
    base = LLaDA.from_pretrained(tiny_task / "model")
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k                  # the base is bit-unchanged
    before, after = train_loss(base, tiny_task), train_loss(model, tiny_task)
    assert after < 0.95 * before, (before, after)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert len([r for r in rows if "val_loss" in r]) == 4                 # updates 3, 6, 9 and the last
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()


def test_resume_after_a_kill_reaches_the_same_adapter_bit_for_bit(tiny_task, tmp_path):
    train.main(train_args(tiny_task, tmp_path / "whole", "--max-updates", "7"))
    train.main(train_args(tiny_task, tmp_path / "split", "--max-updates", "7", "--stop-at", "4"))
    assert not (tmp_path / "split" / "adapter").exists()
    with pytest.raises(ValueError, match="already holds a run"):
        train.main(train_args(tiny_task, tmp_path / "split", "--max-updates", "7"))
    train.main(train_args(tiny_task, tmp_path / "split", "--max-updates", "7", "--resume"))
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_two_process_torchrun_keeps_the_ranks_identical(tiny_task, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *train_args(tiny_task, tmp_path / "ddp", "--max-updates", "3",
                                               "--batch-size", "3")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_env()})
    cause = [line for line in res.stderr.splitlines() if any(w in line for w in ("terminate", "what()", "Error"))]
    assert res.returncode == 0, "\n".join(cause[:20]) + res.stdout[-1000:] + res.stderr[-2000:]
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
        tasks.load_examples(tmp_path / "d.json")


def test_data_formats_are_read(tmp_path):
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    (tmp_path / "code.jsonl").write_text(json.dumps({"query": "Write f.", "answer": "def f(): pass"}) + "\n")
    (tmp_path / "la.json").write_text(json.dumps([{"instruction": "Q", "input": "ctx",
                                                   "output": "A", "answer": "A"}]))
    assert tasks.load_examples(tmp_path / "gsm.jsonl") == [("1+1?", "1+1=2\n#### 2")]
    assert tasks.load_examples(tmp_path / "code.jsonl") == [("Write f.", "def f(): pass")]
    assert tasks.load_examples(tmp_path / "la.json") == [("Q\n\nctx", "A")]


def test_user_mistakes_are_one_line_errors(tiny_task, tmp_path):
    (tmp_path / "notllada").mkdir()
    for extra, words in [(["--model", str(tmp_path / "notllada")], "config.json: config file not found"),
                         (["--data", str(tmp_path / "missing.json")], "missing.json: data file not found"),
                         (["--method", "qlora"], "invalid choice: 'qlora'")]:
        cmd = [sys.executable, str(ROOT / "train.py"), *train_args(tiny_task, tmp_path / "x"), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and words in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_data_generator_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(ROOT / "data" / "make_data.py"), "--out", str(tmp_path / name)],
                       check=True, capture_output=True)
    for f in ("corpus.txt", "arith/train.json", "arith/test.json", "base/tokenizer.json",
              "instruct/corpus.txt", "instruct/sft.json", "instruct/train.json", "instruct/test.json",
              "instruct/base/tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
        assert (tmp_path / "a" / f).read_bytes() == (ROOT / "data" / f).read_bytes(), f   # the bundled files


@pytest.mark.parametrize("base", ["base", "instruct/base"])
def test_bundled_bases_load_in_the_real_layout(base):
    model = LLaDA.from_pretrained(ROOT / "data" / base)
    assert (ROOT / "data" / base / "tokenizer.json").exists()
    assert model.config.mask_token_id != model.config.eos_token_id
    size = sum(f.stat().st_size for f in (ROOT / "data").rglob("*") if f.is_file())
    assert size < 25 * 2**20


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_task, tmp_path, monkeypatch):
    real, calls = train.sft_loss, []

    def poisoned(model, x, answer, **kw):
        loss, lam = real(model, x, answer, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), lam      # the 5th training batch
    monkeypatch.setattr(train, "sft_loss", poisoned)
    out = tmp_path / "nan"
    said = "update 4: loss is nan; stopped, the last checkpoint \\(update 3\\)"
    with pytest.raises(FloatingPointError, match=said):
        # calls: updates 1-3, validation at 3, update 4
        train.main(train_args(tiny_task, out, "--max-updates", "8"))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["adapter"].values())
    assert not (out / "adapter").exists()


# ------------------------------------------------------------------ user mistakes, each a one-line error
def corrupt(path, how):
    """Empty, cut in half, or garbage where the format's directory is (a safetensors file's JSON
    header at the start, a torch.save zip's central directory at the end)."""
    data = path.read_bytes()
    garbage = data[:8] + b"{garbage" + data[16:-64] + b"x" * 64
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "header": garbage}[how])


@pytest.mark.parametrize("extra, words", [
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--adapter-rank", "0"], "--adapter-rank 0: must be a positive integer"),
    (["--adapter-rank", "-3"], "--adapter-rank -3: must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--val-size", "0"], "--val-size must be at least 1"),
    (["--lr=-1e-3"], "--lr must be positive"),
    (["--dropout", "1.5"], "--dropout 1.5: must be in [0, 1)"),
    (["--method", "lora", "--eta", "0.5"], "--eta does not apply to --method lora"),
    (["--stage1", "2"], "--stage1 must be in [0, 1]"),
    (["--stage1", "0.5", "--hyper-init", "kaiming"], "--stage1 with --hyper-init kaiming"),
    (["--hyper-hidden", "a,b"], "argument --hyper-hidden: 'a,b'"),
    (["--groups", "qk"], "argument --groups: 'qk'"),
    (["--freeze", "C"], "--freeze 'C'"),
    (["--model", "./no/such/model"], "no such model directory"),
    (["--test", "missing.json"], "missing.json: test file not found"),
])
def test_bad_flags_fail_before_any_work(tiny_task, tmp_path, extra, words):
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        train.main(train_args(tiny_task, tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()                                # nothing started


def test_a_bad_test_file_fails_before_training(tiny_task, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{"instruction": "q", "answer": "7"},
                                                 {"instruction": "q", "input": "seven"}]))
    with pytest.raises(ValueError, match="t.json: item 1 has neither an 'answer' nor an 'output'"):
        train.main(train_args(tiny_task, tmp_path / "run", "--test", str(tmp_path / "t.json")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, words", [
    (["--lr", "2e-2"], "--lr = 0.01, not 0.02"),
    (["--seed", "1"], "--seed = 0, not 1"),
    (["--max-updates", "9"], "--max-updates = 4, not 9"),
    (["--adapter-rank", "2"], "--adapter-rank = 4, not 2"),
    (["--method", "lora"], "--method = 'nara', not 'lora'"),
])
def test_resume_refuses_other_settings(tiny_task, tmp_path, change, words):
    out = tmp_path / "run"
    train.main(train_args(tiny_task, out, "--max-updates", "4", "--stop-at", "3"))
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        train.main(train_args(tiny_task, out, "--max-updates", "4", "--resume", *change))
    # --stop-at may change
    train.main(train_args(tiny_task, out, "--max-updates", "4", "--resume", "--stop-at", "4"))
    assert (out / "adapter").exists()


def test_resume_refuses_changed_data_and_never_touches_a_finished_run(tiny_task, tmp_path):
    data, out = tmp_path / "data.json", tmp_path / "run"
    data.write_text((tiny_task / "data.json").read_text())
    def run(*extra):
        return train.main([*train_args(tiny_task, out, "--max-updates", "4"), "--data", str(data), *extra])
    run("--stop-at", "3")
    data.write_text(data.read_text().replace("Say", "Tell"))
    with pytest.raises(ValueError, match="--data \\(the file changed since the run started\\)"):
        run("--resume")
    data.write_text(data.read_text().replace("Tell", "Say"))
    run("--resume")
    stamp = (out / "adapter" / "adapter.safetensors").stat().st_mtime
    for extra in (["--resume"], []):
        with pytest.raises(ValueError, match="holds a finished run"):
            run(*extra)
    assert (out / "adapter" / "adapter.safetensors").stat().st_mtime == stamp


def test_a_run_killed_before_its_first_checkpoint_restarts_cleanly(tiny_task, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')     # what a kill at update 1 leaves
    (out / "run.json").write_text("{}")
    train.main(train_args(tiny_task, out, "--max-updates", "4"))
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (out / "adapter").exists()
    with pytest.raises(ValueError, match="--resume needs --out"):
        train.main(["--resume"])


@pytest.mark.parametrize("how", ["empty", "truncated", "header"])
def test_corrupt_files_are_named(tiny_task, tmp_path, how):
    model = tmp_path / "model"
    shutil.copytree(tiny_task / "model", model)
    shard = sorted(model.glob("*.safetensors"))[0]
    corrupt(shard, how)
    with pytest.raises(ValueError, match=f"{shard.name}: not a readable safetensors file"):
        LLaDA.from_pretrained(model)
    out = tmp_path / "run"
    train.main(train_args(tiny_task, out, "--max-updates", "4", "--stop-at", "3"))
    corrupt(out / "checkpoint.pt", how)
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable checkpoint"):
        train.main(train_args(tiny_task, out, "--max-updates", "4", "--resume"))
    corrupt(out / "best" / "adapter.safetensors", how)
    with pytest.raises(ValueError, match="adapter.safetensors: not a readable safetensors file"):
        interop.load_adapter(LLaDA.from_pretrained(tiny_task / "model"), out / "best")
    (out / "best" / "adapter_config.json").write_text('{"method": "nara",')
    with pytest.raises(ValueError, match="adapter_config.json: invalid JSON"):
        interop.load_adapter(LLaDA.from_pretrained(tiny_task / "model"), out / "best")


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tiny_task, tmp_path):
    import signal
    out = tmp_path / "run"
    args = train_args(tiny_task, out, "--max-updates", "100000", "--eval-every", "2")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**_env(), "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as typed:
    # a runner started in the background of a script inherits SIGINT ignored, and so would train.py
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at update" in err and "the last checkpoint (update" in err and "--resume" in err


def test_the_ablation_switches_reach_the_run(tiny_task, tmp_path):
    """--stage1 1.0 keeps the hypernetwork at its init (C = I all run long), --freeze A keeps A,
    --warm-start starts A and B from a saved LoRA, and the prompt methods train."""
    lora = train.main(train_args(tiny_task, tmp_path / "lora", "--method", "lora", "--max-updates", "3"))
    model = train.main(train_args(tiny_task, tmp_path / "nara", "--max-updates", "3", "--stage1",
                                  "1.0", "--freeze", "A",
                            "--warm-start", str(tmp_path / "lora" / "adapter")))
    torch.manual_seed(0)                                                  # the run's own init (--seed 0)
    init = nara.add_adapters(LLaDA.from_pretrained(tiny_task / "model"), "nara", r=4,
                                 dropout=0.0, verbose=False)
    for k, v in adapters.adapter_state(model).items():
        if k.startswith("noise_nets."):
            assert torch.equal(v, init.state_dict()[k]), k                                # never trained
        if k.endswith(".lora_A"):
            assert torch.equal(v, adapters.adapter_state(lora)[k]), k   # warm start, then frozen
    assert any(not torch.equal(v, adapters.adapter_state(lora)[k])
               for k, v in adapters.adapter_state(model).items()
               if k.endswith(".lora_B"))
    half = train.main(train_args(tiny_task, tmp_path / "half", "--max-updates", "4", "--stage1", "0.5"))
    assert half.noise_nets["nara"].net[-1].weight.abs().max() > 0        # stage 2 trains the hypernetwork
    for method in PROMPT:
        train.main(train_args(tiny_task, tmp_path / method, "--method", method, "--max-updates", "2",
                              "--virtual-tokens", "3",
                        "--prompt-init-text", "Say red"))
        assert (tmp_path / method / "adapter" / "adapter.safetensors").exists()
