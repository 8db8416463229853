import json
from pathlib import Path

import pytest
import torch
from conftest import random_model, tolerance, train_tokenizer

import nara
import eval as ev
from extras import adapters, figures, interop, tasks
from extras.files import save_pretrained
from extras.tasks import load_tokenizer
from model import LLaDAConfig

GOOD = "def add(a, b):\n    return a + b\n"


# ------------------------------------------------------------------ extraction and scoring
@pytest.mark.parametrize("text, expect", [("3 + 4 = 7. The answer is 7", 7.0), ("It costs $12.", 12.0),
                                          ("a total of 1,234 apples", 1234.0), ("drops to -3.5 today", -3.5),
                                          ("no digits here", None), ("first 5 then 6", 6.0)])
def test_last_number(text, expect):
    assert tasks.last_number(text) == expect


@pytest.mark.parametrize("task, text, gold, ok", [
    ("boolq", "True, because ... so false is wrong", "true", True),
    ("piqa", "Solution2 is better than solution1", "solution2", True),
    ("social_i_qa", "the correct answer is answer3", "answer3", True),
    ("ARC-Challenge", "answer2, not answer1", "answer1", False),           # the first match counts
    ("hellaswag", "ending4", "ending4", True),
    ("winogrande", "Option1", "option1", True),
    ("openbookqa", "none of them", "answer1", False),
    ("AQuA", "The answer is C, not D", "C", True),
    ("AQuA", "ANSWER unclear", "A", False),
    ("gsm8k", "She pays $1,234 in total", "1234", True),
    ("SVAMP", "so -3.5 degrees", "-3.5", True),
    ("AddSub", "4.0004", "4", True),
    ("MultiArith", "it is 4, no 5", "4", False),                           # the last number counts
])
def test_extraction_rules(task, text, gold, ok):
    assert tasks.is_correct(task, tasks.extract(task, text), gold) == ok


# ------------------------------------------------------------------ loaders in the released formats
def test_loaders(tmp_path):
    la = [{"instruction": "Q?", "input": "", "output": "rationale 17", "answer": "18"}]
    (tmp_path / "la.json").write_text(json.dumps(la))
    assert tasks.load_items("gsm8k", tmp_path / "la.json")[0]["gold"] == "18"       # `answer`, never `output`
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "Q", "answer": "so\n#### 1,080"}) + "\n")
    assert tasks.load_items("gsm8k-jsonl", tmp_path / "g.jsonl") == [{"prompt": "Q", "gold": "1080"}]
    (tmp_path / "m.jsonl").write_text(json.dumps({"text": "Add.", "code": GOOD,
                                                  "test_list": ["assert add(1, 1) == 2"],
                                                  "test_setup_code": ""}) + "\n")
    item = tasks.load_items("mbpp", tmp_path / "m.jsonl")[0]
    assert "assert add(1, 1) == 2" in item["prompt"] and ev.run_untrusted(item["canonical"],
                                                                          item["tests"], item["names"])
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "Q"}]))
    with pytest.raises(ValueError, match="item 0 has no field 'answer'"):
        tasks.load_items("boolq", tmp_path / "bad.json")
    with pytest.raises(ValueError, match="test file not found"):
        tasks.load_items("boolq", tmp_path / "none.json")


# ------------------------------------------------------------------ generation, curves, summaries
@pytest.fixture
def tiny(tmp_path):
    tok = load_tokenizer(train_tokenizer(tmp_path, ["What is 1 plus 2? 3 + 4 = 7", "user assistant"] * 10))
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LLaDAConfig.tiny(vocab_size=tok.get_vocab_size(), embedding_size=tok.get_vocab_size(),
                           mask_token_id=tok.token_to_id("<|mdm_mask|>"), eos_token_id=eos, pad_token_id=eos)
    return random_model(cfg).eval(), tok


def test_batched_generation_equals_one_by_one(tiny):
    # Each prompt is padded to another length in the batch than alone: in float64 the logits agree to
    # ~1e-15, so the greedy tokens do on any kernel path (in fp32 a near-tie between two could flip).
    model, tok = tiny
    model = model.double()
    prompts = ["What is 1 plus 2?", "Hi", "What is 3 plus 4 plus 7?"]
    both = tasks.answer_all(model, tok, prompts, gen_length=8, steps=8, block_length=8, batch_size=3)
    for prompt, got in zip(prompts, both):
        assert got == tasks.answer_all(model, tok, [prompt], gen_length=8, steps=8, block_length=8)[0]
    assert all("<|endoftext|>" not in g and "<|mdm_mask|>" not in g for g in both)


def test_noise_curve_and_update_size_of_a_hand_set_nara(tiny):
    model, tok = tiny
    nara.add_adapters(model, "nara", r=2, verbose=False).eval()            # eval: no adapter dropout
    with torch.no_grad():
        # C = I + 0.1·diag(1, 2)
        model.noise_nets["nara"].net[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 2.0]))
        layer = model.transformer.blocks[0].q_proj
        layer.lora_B.fill_(0.5)
    sizes = figures.update_magnitude(model, [0.3, 0.9])
    assert sizes[0.3][0] == pytest.approx(0.1 * 5 ** 0.5) and sizes[0.9][0] == pytest.approx(0.1 * 5 ** 0.5)
    C = torch.eye(2) + 0.1 * torch.diag(torch.tensor([1.0, 2.0]))
    # 1 of 8 adapted layers is non-zero
    expect = (0.5 * torch.ones(64, 2) @ C @ layer.lora_A).norm().item() / 8
    assert sizes[0.3][1] == pytest.approx(expect, rel=1e-5)
    ids = torch.randint(0, 40, (5, 12))
    answer = torch.arange(12).expand(5, 12) >= 4
    a, b = figures.noise_curve(model, ids, answer, [0.5, 1.0]), figures.noise_curve(model,
                                                                                    ids, answer, [0.5, 1.0])
    assert a == b and set(a) == {0.5, 1.0} and all(v > 0 for v in a.values())
    masked, _ = __import__("diffusion").sft_mask(answer, torch.ones(5))
    logits = model(torch.where(masked, model.config.mask_token_id, ids), noise_level=torch.ones(5))
    full = torch.nn.functional.cross_entropy(logits[masked].double(), ids[masked]).item()
    # λ = 1 masks the whole answer; the curve's head runs on the masked rows only, another matmul shape
    assert a[1.0] == pytest.approx(full, abs=tolerance(logits))


def test_cli_writes_complete_results(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    save_pretrained(model, tmp_path / "m")
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    nara.add_adapters(model, "nara", r=2, verbose=False)
    interop.save_adapter(model, tmp_path / "a")
    data = [{"instruction": "What is 1 plus 2?", "input": "", "output": "3", "answer": "3"}] * 3
    (tmp_path / "t.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    ev.main(["--model", "m", "--adapter", "a", "--task", "arith", "--data", "t.json", "--out", "res"])
    summary = json.loads((tmp_path / "res" / "t-base.summary.json").read_text())   # named after the data
    for key in ("accuracy", "correct", "items", "gen_length", "steps", "block_length",
                "temperature", "remasking",
                "till_eos", "model", "adapter", "wall_s"):
        assert key in summary
    assert summary["items"] == 3
    rows = [json.loads(l) for l in (tmp_path / "res" / "t-base.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "generation", "extracted", "gold", "correct"}
    assert len((tmp_path / "res" / "results.csv").read_text().splitlines()) == 3   # header + base + adapter
    assert len(next((tmp_path / "res").glob("t-*-noise_curve.csv")).read_text().splitlines()) == 11


def test_multiple_choice_by_likelihood_picks_the_most_likely_label(tiny, monkeypatch):
    model, tok = tiny
    seen = []

    def fake(model, prompt, answer, mc_num, batch_size):
        seen.append(tok.decode(answer))
        return 1.0 if tok.decode(answer).endswith("option2") else -1.0
    monkeypatch.setattr(tasks, "log_likelihood", fake)
    assert tasks.choose_by_likelihood(model, tok, "winogrande", "Which?", mc_num=4) == "option2"
    assert [s.split()[-1] for s in seen] == ["option1", "option2"]
    seen.clear()
    tasks.choose_by_likelihood(model, tok, "ARC-Easy", "Which?", mc_num=4)
    assert [s.split()[-1] for s in seen] == [f"answer{k}" for k in range(1, 6)]
    monkeypatch.undo()                                                     # and with the real estimator
    assert tasks.choose_by_likelihood(model, tok, "boolq", "Is it?", mc_num=4) in ("true", "false")


# ------------------------------------------------------------------ user mistakes and result files
@pytest.mark.parametrize("extra, words", [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "-1"], "--limit must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--gen-length", "10", "--block-length", "4"], "--gen-length 10 must be a multiple of --block-length 4"),
    (["--adapter", "no/such/run/adapter"], "--adapter no/such/run/adapter: no such directory"),
    (["--mc"], "--mc scores the commonsense label sets, not --task arith"),
])
def test_bad_eval_flags_are_named(tmp_path, extra, words):
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        ev.main(["--out", str(tmp_path / "res"), *extra])


@pytest.mark.parametrize("rows, words", [
    ([], "no test items"),
    ([{"instruction": "q", "answer": "7"}, {"instruction": "q", "answer": "seven"}],
     "item 1 has the non-numeric answer 'seven'"),
])
def test_bad_test_files_are_named_before_any_model_loads(tmp_path, rows, words):
    (tmp_path / "t.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=words):
        ev.main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "t.json"), "--task", "arith",
                 "--adapter", "none",
                 "--out", str(tmp_path / "r")])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ev.main(["--out", str(tmp_path / "file")])


def test_two_adapters_of_one_run_keep_their_own_results(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    save_pretrained(model, tmp_path / "m")
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    nara.add_adapters(model, "lora", r=2, verbose=False)
    for sub in ("adapter", "best"):
        interop.save_adapter(model, tmp_path / "runs" / "x" / sub)
    (tmp_path / "t.json").write_text(json.dumps([{"instruction": "What is 1 plus 2?",
                                                  "input": "", "answer": "3"}] * 2))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "m", "--adapter", "runs/x/adapter", "--adapter", "runs/x/best", "--data",
            "t.json", "--out", "res"]
    ev.main(argv)
    ev.main(argv)
    assert {p.name for p in (tmp_path / "res").glob("*.summary.json")} == {
        "t-base.summary.json", "t-x-adapter.summary.json", "t-x-best.summary.json"}
    lines = (tmp_path / "res" / "results.csv").read_text().splitlines()
    assert lines[0].split(",") == ev.FIELDS and len(lines) == 1 + 6 and lines.count(lines[0]) == 1
    (tmp_path / "res" / "results.csv").write_text("task,accuracy\narith,0.5\n")
    with pytest.raises(ValueError, match="results.csv has other columns"):
        ev.main(argv)
    assert ev.labels(["a/run/adapter", "b/run/adapter"]) == ["a-run-adapter", "b-run-adapter"]


def test_a_whole_table_of_the_paper_is_one_command(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    save_pretrained(model, tmp_path / "m")
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    for name in ev.SUITES["math"]:   # the math table's six sets, two items each
        gold = "A" if name == "AQuA" else "3"
        (tmp_path / "d" / name).mkdir(parents=True)
        items = [{"instruction": "What is 1 plus 2?", "answer": gold}] * 2
        (tmp_path / "d" / name / "test.json").write_text(json.dumps(items))
    monkeypatch.chdir(tmp_path)
    ev.main(["--model", "m", "--task", "math", "--data", "d", "--out", "res",
             "--gen-length", "8", "--steps", "8",
             "--block-length", "8", "--adapter", "none"])
    table = (tmp_path / "res" / "math-table.md").read_text().splitlines()
    assert table[0] == "| model | AddSub | AQuA | gsm8k | MultiArith | SingleEq | SVAMP | avg |"
    assert table[2].startswith("| base |")
    assert len((tmp_path / "res" / "results.csv").read_text().splitlines()) == 1 + 6
    with pytest.raises(ValueError, match="d/boolq/test.json: test file not found"):
        ev.main(["--model", "m", "--task", "commonsense", "--data", "d", "--out", "res", "--adapter", "none"])


def test_download_says_where_to_put_what_it_cannot_fetch(tmp_path):
    import subprocess
    import sys
    script = Path(ev.__file__).parent / "data" / "download.py"
    res = subprocess.run([sys.executable, str(script), "--only", "mbpp", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode == 0:                                               # a machine with a network
        assert (tmp_path / "code" / "mbpp_test.jsonl").read_text().count("\n") == 500
    else:
        assert "Fetch it elsewhere and copy it to" in res.stderr
        assert str(tmp_path / "code" / "mbpp_test.jsonl") in res.stderr


def test_update_size_of_a_density_conditioned_nara_uses_density_lambda(tiny):
    model, _ = tiny
    nara.add_adapters(model, "nara", r=2, signal="density", init="kaiming", verbose=False).eval()
    net = model.noise_nets["nara"]
    sizes = figures.update_magnitude(model, [0.2, 0.8])
    for lam in (0.2, 0.8):
        C = net(None, density=torch.tensor([lam]))[0]
        assert sizes[lam][0] == pytest.approx((C - torch.eye(2)).norm().item(), rel=1e-6)
    assert sizes[0.2][0] != pytest.approx(sizes[0.8][0])


def test_prompt_tuning_has_no_core_and_no_weight_update_in_the_noise_table(tiny, tmp_path, capsys):
    model, tok = tiny
    nara.add_adapters(model, "prompt-tuning", virtual_tokens=2, verbose=False)
    sizes = figures.update_magnitude(model, figures.LAMS)
    assert sizes[0.5] == (None, None)                                    # printed "-", never 0.0000
    curve = {lam: 1.0 for lam in figures.LAMS}
    figures.write_noise({"base": curve, "pt": curve}, {"pt": sizes}, tmp_path, "t")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("0.5"))
    assert row.split()[-2:] == ["-", "-"] and (tmp_path / "t-noise_curve.csv").exists()
