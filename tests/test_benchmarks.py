"""The benchmark scripts run end to end on CPU with tiny shapes (their figures are not checked here)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_a_tiny_config(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--dir", str(tmp_path / "ck"),
                    "--out", str(tmp_path / "gpu.md")], check=True, capture_output=True, timeout=600)
    text = (tmp_path / "gpu.md").read_text()
    for row in ("code of commit ", "from_pretrained time", "train step nara, checkpointing=True", "recipe update 32 = 1 x 32"):
        assert row in text


def test_ratio_benchmarks_run_quickly(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path / "b.md")],
                   check=True, capture_output=True, timeout=600)
    text = (tmp_path / "b.md").read_text()
    for section in ("## Adapted layer", "## Training step", "## Sampling step", "## Early termination", "## Size at LLaDA-8B",
                    "| nara | 34,227,968 | 0.4252 |", "NaRA / LoRA per training step", "## The LM head only where it is read",
                    "| attn_norm: float32 4096 | 16.0 KiB | 0.0 KiB |", "Expected activation memory"):
        assert section in text


def test_methods_comparison_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--smoke", "--runs", str(tmp_path / "runs"),
           "--results", str(tmp_path / "res")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    table = (tmp_path / "res" / "arith.md").read_text()
    assert "| lora | 16,384 |" in table and "| nara |" in table and "Figure 1" in table and "Figure 3" in table
    for name in ("arith_figure1.csv", "arith_figure3.csv", "arith.json"):
        assert (tmp_path / "res" / name).exists()
    results = sorted((tmp_path / "runs").rglob("result.json"))
    assert len(results) == 6                                              # 2 arms x (2 rates + 1 more seed)
    stamp = [r.stat().st_mtime for r in results]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)      # a second call reuses every run
    assert [r.stat().st_mtime for r in results] == stamp
    chosen = json.loads((tmp_path / "res" / "arith.json").read_text())["lr"]["nara"]
    ablation = cmd + ["--lr-from", "nara", "--seeds", "1", "--arm", "nara", "--arm", "nara --stage1 0.5", "--name", "abl"]
    subprocess.run(ablation, check=True, capture_output=True, timeout=600)
    table = (tmp_path / "res" / "abl.md").read_text()
    assert "(1 seeds; `python benchmarks/methods.py --smoke --lr-from nara --seeds 1 --arm nara" in table
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:3] for line in table.splitlines() if line.startswith("| nara")}
    assert rows["nara"] == rows["nara --stage1 0.5"] == [rows["nara"][0], f"{chosen:g}"] and "| lora |" not in table
    assert len(sorted((tmp_path / "runs").rglob("result.json"))) == 7     # nara's seed 0 reused, one new run
    bad = subprocess.run(cmd + ["--lr-from", "dora"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--lr-from dora" in bad.stderr and "arith.json" in bad.stderr
