"""The benchmark scripts run end to end on CPU with tiny shapes (their figures are not checked here)."""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_gpu_check_runs_the_real_commands_and_the_shapes_on_cpu_with_a_tiny_config(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--tiny", "--dir", str(tmp_path / "ck"),
                    "--work", str(tmp_path / "work"), "--out", str(tmp_path / "gpu.md")],
                   check=True, capture_output=True, timeout=900)
    text = (tmp_path / "gpu.md").read_text()
    assert "code of commit " in text.splitlines()[0]
    rows = dict(line.strip("| ").split(" | ", 1) for line in text.splitlines()[4:])
    commands = ("python train.py (short default run)",
                "same run killed after its first checkpoint, then --resume",
                "python eval.py (default: base vs the run's adapter)", "python eval.py --noise-curve",
                "python eval.py --task humaneval --limit 2", "torchrun --nproc_per_node=1 train.py")
    for command in commands:
        assert rows[command].startswith("exit 0, "), (command, rows[command])
    assert rows["resumed vs uninterrupted adapter, max abs difference"] == "0"       # bit for bit on a CPU
    share = rows["NaRA in bf16: share of C − I = 1e-3·D applied (fp32 rank-r path; 1 = all)"]
    assert 0.7 < float(share) < 1.3
    for row in ("from_pretrained time", "train step nara, checkpointing=True", "GSM8K sampling step",
                "recipe update 32 = 32 x 1, checkpointing=False, rank-r path in bf16 (authors')"):
        assert any(k.startswith(row) for k in rows), row


def test_ratio_benchmarks_run_quickly(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(tmp_path / "b.md")],
                   check=True, capture_output=True, timeout=600)
    text = (tmp_path / "b.md").read_text()
    for section in ("## Adapted layer", "## Training step", "## Sampling step", "## Early termination",
                    "## Size at LLaDA-8B", "| nara | 34,227,968 | 0.4252 |", "NaRA / LoRA per training step",
                    "## The LM head only where it is read",
                    "| attn_norm: float32 4096 | 16.0 KiB | 0.0 KiB |", "Expected activation memory"):
        assert section in text


def tracked_results():
    return {f: f.stat().st_mtime for f in (BENCH / "results").rglob("*") if f.is_file()}


def test_methods_comparison_runs_end_to_end_and_reuses_only_matching_records(tmp_path):
    tracked = tracked_results()
    smoke = subprocess.run([sys.executable, str(BENCH / "methods.py"), "--smoke"], capture_output=True,
                           text=True, timeout=600, check=True)
    scratch = Path(smoke.stdout.strip().splitlines()[-1].split()[3])       # "smoke results in DIR (...)"
    assert (scratch / "results" / "arith.md").exists() and str(scratch).startswith(tempfile.gettempdir())
    assert tracked_results() == tracked                                   # benchmarks/results/ untouched
    shutil.rmtree(scratch)

    cmd = [sys.executable, str(BENCH / "methods.py"), "--smoke", "--runs", str(tmp_path / "runs"),
           "--results", str(tmp_path / "res")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    table = (tmp_path / "res" / "arith.md").read_text()
    assert "| lora | 16,384 |" in table and "| nara |" in table and "The budget: LoRA" in table
    for part in ("Figure 1 (gain over the base", "Figure 1 (gain relative", "Figure 3",
                 "Learning-rate sweep"):
        assert part in table
    for name in ("arith_figure1.csv", "arith_figure1_relative.csv", "arith_figure3.csv", "arith.json"):
        assert (tmp_path / "res" / name).exists()
    records = sorted((tmp_path / "res" / "runs").rglob("*seed*.json"))
    assert len(records) == 7        # budget ladder 4, 8; sweep 2 arms x 2 rates (lora's 4 shared); seed 1
    stamp = [r.stat().st_mtime for r in records]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)      # a second call reuses every record
    assert [r.stat().st_mtime for r in records] == stamp
    seed1 = next(r for r in records if r.name.endswith("seed1.json") and r.parent.name == "nara")
    body = json.loads(seed1.read_text())
    body["settings"]["train"][1] = "3"                                     # recorded under other settings
    seed1.write_text(json.dumps(body))
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert json.loads(seed1.read_text())["settings"]["train"][1] == "4"    # so run again, not reused

    chosen = json.loads((tmp_path / "res" / "arith.json").read_text())["lr"]["nara"]
    arms = ["--arm", "nara", "--arm", "nara --stage1 0.5"]
    subprocess.run(cmd + ["--lr-from", "nara", "--seeds", "1", *arms, "--name", "abl"], check=True,
                   capture_output=True, timeout=600)
    table = (tmp_path / "res" / "abl.md").read_text()
    command = "python benchmarks/methods.py --task arith --name abl --lr-from nara --seeds 1 --smoke --arm"
    assert f"`{command}" in table
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:3] for line in table.splitlines()
            if line.startswith("| nara")}
    assert rows["nara"] == rows["nara --stage1 0.5"] == [rows["nara"][0], f"{chosen:g}"]
    assert "| lora |" not in table
    assert len(sorted((tmp_path / "res" / "runs").rglob("*seed*.json"))) == 8    # nara's seed 0 reused
    bad = subprocess.run(cmd + ["--lr-from", "dora"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "no learning rate for dora" in bad.stderr


def test_methods_refuses_a_protocol_that_would_skip_items(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import methods
    monkeypatch.setitem(methods.TASKS, "instruct", {**methods.TASKS["instruct"], "max_length": 64})
    with pytest.raises(SystemExit, match="72 tokens.*does not fit --max-length 64"):
        methods.check_lengths("instruct")
    methods.check_lengths("arith")                                         # 48 covers arith's longest item
