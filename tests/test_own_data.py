"""A user's own data with the bundled model, end to end and as typed: one prompt per record on every
path, the test set and the run name follow the data, empty data is one line, eval names its outputs
after the data, non-numeric answers are scored, and the held-out rows land in RUN/val.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev
import train
from extras import runs, tasks

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max-updates", "2", "--eval-every", "2", "--batch-size", "4", "--val-size", "4", "--max-length", "64"]
EVAL = ["--gen-length", "4", "--steps", "4", "--block-length", "4"]


def cli(cwd, script, *argv):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})


def times(a, b):
    return {"instruction": "Answer the question.", "input": f"What is {a} times {b}?",
            "output": f"{a} * {b} = {a * b}. The answer is {a * b}", "answer": str(a * b)}


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A folder with the user's files: multiplication in `input`, a true/false test, and empty data."""
    d = tmp_path_factory.mktemp("mine")
    (d / "mine.json").write_text(json.dumps([times(a, b) for a in range(2, 7) for b in range(2, 6)]))
    (d / "mine_test.json").write_text(json.dumps([times(7, b) for b in range(2, 5)]))
    (d / "tf.json").write_text(json.dumps([{"instruction": f"Is {k} even?", "input": "", "output": "true",
                                            "answer": ["false", "true"][k % 2 == 0]} for k in range(3)]))
    (d / "empty.json").write_text("[]")
    return d


def test_every_path_builds_the_same_prompt_from_a_record(mine, monkeypatch):
    record = times(3, 4)
    expected = "Answer the question.\n\nWhat is 3 times 4?"
    assert tasks.prompt_of(record) == expected
    assert tasks.load_examples(mine / "mine.json")[0][0] == tasks.prompt_of(json.loads(
        (mine / "mine.json").read_text())[0])                                    # training
    seen = {}

    def spy(label):
        def answer_all(model, tok, prompts, **gen):
            seen.setdefault(label, []).extend(prompts)
            return ["0"] * len(prompts)
        return answer_all
    monkeypatch.setattr(tasks, "answer_all", spy("report"))                    # train.py's end-of-run report
    args = type("Args", (), {"test": str(mine / "mine_test.json"), "method": "nara", "model": "m"})()
    model = type("M", (), {"eval": lambda self: self})()
    monkeypatch.setattr(runs.adapters, "base_only", lambda m: __import__("contextlib").nullcontext())
    runs.report(model, None, args, "a", {})
    monkeypatch.setattr(ev, "answer_all", spy("eval"))                         # eval.py
    (mine / "spy").mkdir()
    for task in ("auto", "arith"):
        items = tasks.load_items(task, mine / "mine_test.json")
        ev.score("x", "a", None, None, task, "d", items, ev.parse_args(["--adapter", "none", "--data",
                 str(mine / "mine_test.json"), "--out", str(mine / "spy")]), mine / "spy", "mine_test")
    report = [tasks.prompt_of(r) for r in json.loads((mine / "mine_test.json").read_text())]
    assert seen["report"] == report * 2 and seen["eval"] == report * 2        # base and tuned; auto and arith
    assert report[0] == "Answer the question.\n\nWhat is 7 times 2?"


def test_own_data_trains_scores_and_evaluates_without_a_wrong_number(mine):
    res = cli(mine, "train.py", "--data", "mine.json", *SHORT)
    assert res.returncode == 0, res.stderr[-2000:]
    run = mine / "runs" / "mine-nara"                                          # named after the data
    assert (run / "adapter").is_dir() and "held-out accuracy" not in res.stdout   # no bundled test
    held = json.loads((run / "val.json").read_text())
    rows = json.loads((mine / "mine.json").read_text())
    assert len(held) == 4 and all(r in rows for r in held)

    res = cli(mine, "eval.py")                           # a plain eval.py never picks up the user's run
    assert res.returncode == 1 and "no finished default run" in res.stderr

    res = cli(mine, "train.py", "--data", "mine.json", "--test", "mine_test.json", "--out", "runs/t",
              *SHORT)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines()
                if x.startswith("held-out accuracy on 3 items of mine_test.json"))
    tuned = float(line.split("-> nara ")[1].split()[0])
    res = cli(mine, "eval.py", "--adapter", "runs/t/adapter", "--data", "mine_test.json",
              "--gen-length", "16", "--steps", "16", "--block-length", "16")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((mine / "runs/eval/mine_test-t-adapter.summary.json").read_text())
    assert 100 * summary["accuracy"] == pytest.approx(tuned, abs=0.05)       # train.py and eval.py agree

    res = cli(mine, "eval.py", "--adapter", "runs/mine-nara/adapter", "--noise-curve", "--data",
              "runs/mine-nara/val.json")                                    # the documented command
    assert res.returncode == 0, res.stderr[-2000:]
    assert (mine / "runs/eval/val-mine-nara-adapter-noise_curve.csv").exists()     # the data, the adapter
    assert not list((mine / "runs/eval").glob("arith*")) and not (mine / "runs/eval/noise_curve.csv").exists()


def test_non_numeric_answers_are_scored_by_exact_match(mine):
    res = cli(mine, "train.py", "--data", "mine.json", "--test", "tf.json", "--out", "runs/tf", *SHORT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "held-out accuracy on 3 items of tf.json" in res.stdout
    res = cli(mine, "eval.py", "--adapter", "none", "--data", "tf.json", *EVAL)
    assert res.returncode == 0 and "tf: base: accuracy" in res.stdout, res.stderr[-2000:]
    assert tasks.is_correct("auto", tasks.extract("auto", " True."), "true")
    assert not tasks.is_correct("auto", tasks.extract("auto", "it is true"), "true")
    assert tasks.is_correct("auto", tasks.extract("auto", "so 3 * 4 = 12"), "12")


@pytest.mark.parametrize("argv, words", [
    (["--data", "empty.json"], ["empty.json: no usable examples (0 in the file)"]),
    (["--max-length", "10"], ["train.json: no usable examples (300 in the file, all longer than "
                              "--max-length 10"]),
    (["--eta", "-1"], ["--eta -1.0: must be finite and >= 0"]),
    (["--targets", "q_proj,foo"], ["target 'foo' matches no linear layer"]),
])
def test_bad_data_and_options_are_one_line_errors_before_the_model_loads(mine, argv, words):
    res = cli(mine, "train.py", *argv, "--out", "runs/bad")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "loading" not in res.stdout
    assert all(w in lines[0] for w in words), lines[0]


def test_help_says_what_is_used_when_a_flag_is_not_given():
    text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout
    text = " ".join(text.split())
    for words in ("(recipe: 512; bundled run: 48)", "(default: q_proj,k_proj,v_proj,attn_out)",
                  "data/arith/test.json with the bundled data, else none", "runs/<data name>-<method>",
                  "(default: nara)", "(default: 0.1)", "(default: 0.05)", "(default: 5)"):
        assert words in text, words
    for command in (train.parser(), ev.parser()):                       # every flag that takes a value
        for action in command._actions:
            if action.option_strings and action.nargs != 0:
                said = action.help or ""
                assert "default" in said or "recipe:" in said or "required" in said, action.option_strings


def test_logged_rate_is_the_one_each_update_used_and_time_continues_after_resume(tmp_path):
    out = tmp_path / "r"
    args = ["--out", str(out), "--max-updates", "4", "--eval-every", "2", "--batch-size", "4",
            "--val-size", "4", "--lr", "0.01"]
    train.main([*args, "--stop-at", "2"])
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train.main([*args, "--resume"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in lines] == pytest.approx([0.01, 0.01 * 3 / 3, 0.01 * 2 / 3, 0.01 * 1 / 3])
    assert lines[2]["elapsed_s"] >= first[-1]["elapsed_s"] and lines[:2] == first


# ------------------------------------------------------------------ the README's commands, as written
def readme_commands(heading):
    """The commands of the bash block under a README heading, comments left out."""
    import re
    import shlex
    section = (ROOT / "README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split(" #")[0]) for line in block.splitlines() if line.strip()]


FORMATS = {   # the documented training formats, and a test file of each (with and without `answer`)
    "llm-adapters": ("json", lambda a, b: {"instruction": "Answer the question.", "input": f"What is {a} times {b}?",
                                           "output": f"{a * b}", "answer": str(a * b)}),
    "llm-adapters, no answer": ("json", lambda a, b: {"instruction": f"What is {a} times {b}?", "input": "",
                                                      "output": f"{a * b}"}),
    "gsm8k": ("jsonl", lambda a, b: {"question": f"What is {a} times {b}?", "answer": f"{a} * {b}\n#### {a * b}"}),
    "codefeedback": ("json", lambda a, b: {"query": f"What is {a} times {b}?", "answer": f"{a * b}"}),
}
FAST = {"train.py": ["--max-updates", "2", "--eval-every", "2", "--batch-size", "4", "--val-size", "4"],
        "eval.py": ["--gen-length", "4", "--steps", "4", "--block-length", "4"]}


@pytest.mark.parametrize("name", FORMATS)
def test_the_readmes_own_data_commands_run_as_written_on_each_format(tmp_path, name):
    suffix, row = FORMATS[name]
    rows = [row(a, b) for a in range(2, 8) for b in range(2, 6)]
    for file, part in (("mine", rows[:20]), ("mine_test", rows[20:])):
        text = json.dumps(part) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in part)
        (tmp_path / f"{file}.{suffix}").write_text(text)
    said = ""
    for command in readme_commands("Your own data"):
        assert command[0] == "python"
        argv = [a.replace("mine.json", f"mine.{suffix}").replace("mine_test.json", f"mine_test.{suffix}")
                for a in command[2:]]
        res = cli(tmp_path, command[1], *argv, *FAST[command[1]])
        assert res.returncode == 0, (command, res.stderr[-2000:])
        said += res.stdout
    assert f"held-out accuracy on 4 items of mine_test.{suffix}" in said
    assert list((tmp_path / "runs" / "eval").glob("mine_test-mine-nara-adapter.summary.json"))
    assert list((tmp_path / "runs" / "eval").glob("val-mine-nara-adapter-noise_curve.csv"))


def test_the_readmes_evaluate_commands_run_as_written(tiny_task, tmp_path):
    """Each line of the README's Evaluate block on the tiny model: one item of every set of each table
    (LLM-Adapters files for math and commonsense, HumanEval and MBPP for code), on the adapters the lines
    name."""
    import re

    import nara
    from extras import interop
    from model import LLaDA
    data = tmp_path / "sets"
    for task in ev.SUITES["math"]:
        answer = "A" if task == "AQuA" else "7"
        (data / task).mkdir(parents=True)
        (data / task / "test.json").write_text(json.dumps([{"instruction": "What is 3 plus 4?", "input": "",
                                                            "output": "7", "answer": answer}]))
    for task, labels in tasks.LABELS.items():
        label = re.sub(r"\[(\d)-\d\]", r"\1", labels.split("|")[0])          # true, answer1, ending1, ...
        (data / task).mkdir(parents=True)
        (data / task / "test.json").write_text(json.dumps([{"instruction": "Pick one.", "input": "",
                                                            "output": label, "answer": label}]))
    (data / "mbpp_test.jsonl").write_text(json.dumps({"text": "Write add.", "test_list": ["assert add(1, 2) == 3"],
                                                      "code": "def add(a, b):\n    return a + b"}) + "\n")
    for run in ("math_14k-nara", "commonsense_170k-nara", "codefeedback_python-nara"):
        model = nara.add_adapters(LLaDA.from_pretrained(tiny_task / "model"), "nara", r=2, verbose=False)
        interop.save_adapter(model, tmp_path / "runs" / run / "adapter")
    for command in readme_commands("Evaluate"):
        argv = [str(tiny_task / "model") if a == "$M" else a for a in command[2:]]
        res = cli(tmp_path, "eval.py", *argv, "--data", str(data), "--limit", "1", *FAST["eval.py"])
        assert res.returncode == 0, (command, res.stderr[-2000:])
        task = argv[argv.index("--task") + 1]
        table = (tmp_path / "runs" / "eval" / f"{task}-table.md").read_text()
        assert all(s in table for s in ev.SUITES[task]) and "| base |" in table
