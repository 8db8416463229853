"""A newcomer's first hour, as subprocesses: each mistake is one line and a non-zero exit before any
model loads, eval says what it scores, the output reads well in a terminal and in a log file, and
the files written are the user's to share."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from extras import interop
from model import LLaDA

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max-updates", "2", "--eval-every", "2", "--batch-size", "4", "--val-size", "4"]


def cli(cwd, script, *argv):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=cwd,
                          capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"})


def one_line_error(res, *words):
    assert res.returncode == 1, (res.returncode, res.stdout[-500:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "loading" not in res.stdout, "a model was loaded before the mistake was found"
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder holding one short default run, runs/default, as `python train.py` leaves it."""
    d = tmp_path_factory.mktemp("newcomer")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        train.main(["--out", "runs/default", *SHORT])
    finally:
        os.chdir(cwd)
    return d


@pytest.mark.parametrize("argv, words", [
    (["--device", "gpu"], ["--device 'gpu': choose cuda, cuda:N or cpu"]),
    (["--freeze", "A,B,hypernetwork"], ["--freeze A,B,hypernetwork: leaves nothing of nara to train"]),
    (["--method", "lora", "--freeze", "B,A"], ["--freeze B,A: leaves nothing of lora to train"]),
    (["--resume", "--out", "runs/never-ran"], ["--resume --out runs/never-ran: no such run directory"]),
])
def test_train_mistakes_are_one_line_before_any_model_loads(tmp_path, argv, words):
    one_line_error(cli(tmp_path, "train.py", *argv), *words)
    assert not (tmp_path / "runs").exists()


def test_a_cuda_device_that_is_not_there_is_one_line(tmp_path):
    if torch.cuda.is_available():                      # a GPU machine: ask for a device it does not have
        one_line_error(cli(tmp_path, "train.py", "--device", "cuda:99"), "--device cuda:99: this machine has")
    else:
        one_line_error(cli(tmp_path, "train.py", "--device", "cuda"), "--device cuda: no CUDA device here",
                       "use --device cpu")


def test_eval_without_a_finished_run_says_so(tmp_path):
    one_line_error(cli(tmp_path, "eval.py"), "no finished default run in runs/default*/adapter",
                   "run `python train.py` first", "--adapter none")


def test_adapter_directories_are_checked_before_any_model_loads(finished, tmp_path):
    one_line_error(cli(finished, "eval.py", "--adapter", "runs/default"),
                   "runs/default: no adapter_config.json: it is a training run; pass runs/default/adapter or "
                   "runs/default/best")
    one_line_error(cli(finished, "eval.py", "--adapter", "runs"),
                   "runs: no adapter_config.json: not an adapter directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("adapter_config.json", "adapter.safetensors"):
        (broken / f).write_bytes((finished / "runs" / "default" / "adapter" / f).read_bytes())
    data = (broken / "adapter.safetensors").read_bytes()
    (broken / "adapter.safetensors").write_bytes(data[:len(data) // 2])           # truncated
    one_line_error(cli(finished, "eval.py", "--adapter", str(broken)),
                   "adapter.safetensors: not a readable safetensors")
    (broken / "adapter.safetensors").unlink()
    one_line_error(cli(finished, "eval.py", "--adapter", str(broken)),
                   "no adapter.safetensors beside adapter_config.json")


def test_eval_names_what_it_scores_loads_each_model_once_and_explains_its_table(finished):
    res = cli(finished, "eval.py", "--limit", "4", "--out", "runs/e")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "scoring the loss per noise level (Figures 1, 3) and accuracy of the base" in out
    assert f"and of it with {Path('runs/default/adapter')} (ours adapter)" in out and "arith (4 items)" in out
    assert out.count("loading ") == 2 and "trainable" not in out                 # base, then base + adapter
    table = [line for line in out.splitlines() if line.lstrip().startswith(("λ", "0.", "1.0"))]
    assert len(table) == 11 and len({len(line) for line in table}) == 1         # aligned
    assert "‖C−I‖: NaRA's core C(λ) minus the identity" in out and "‖ΔW‖: each adapted layer's update" in out


def test_a_peft_directory_is_evaluated_through_load_peft(finished, tmp_path):
    model = interop.load_adapter(LLaDA.from_pretrained(ROOT / "data" / "base"),
                                 finished / "runs" / "default" / "adapter")
    interop.export_peft(model, tmp_path / "peft", lam=0.5)
    res = cli(finished, "eval.py", "--adapter", str(tmp_path / "peft"), "--limit", "2",
              "--out", str(tmp_path / "e"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(peft adapter)" in res.stdout and "arith: tmp" not in res.stdout and "accuracy" in res.stdout


def test_train_writes_a_dense_line_to_a_log_and_files_the_user_can_share(tmp_path):
    res = cli(tmp_path, "train.py", "--out", "runs/r", "--max-updates", "4", "--eval-every",
              "2", "--batch-size", "4",
              "--val-size", "4", "--test", str(ROOT / "data" / "arith" / "test.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("update ")]
    assert [line.split(" | ")[0] for line in lines] == ["update 2/4", "update 4/4"]
    assert all(" | loss " in line and " tok/s | val " in line for line in lines)
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "runs" / "r" / "adapter").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_the_readme_folders_are_ignored_and_the_license_is_named():
    paths = ["runs/x", "data/llm-adapters/x", "data/code/x"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert ignored == paths
    readme = (ROOT / "README.md").read_text()
    assert '"out/' not in readme                                           # every snippet writes under runs/
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "[MIT](LICENSE)" in readme
