"""The benchmark scripts run end to end on CPU with tiny shapes (their figures are not checked here)."""
import json
import subprocess
import sys
import time
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
    for path in ("rank-2r path", "fp32 rank-r path, before"):
        share = rows[f"NaRA in bf16: share of C − I = 1e-3·D applied ({path}; 1 = all)"]
        assert 0.7 < float(share) < 1.3, (path, share)
    authors = rows["NaRA in bf16: share of C − I = 1e-3·D applied (rank-r in bf16, authors'; 1 = all)"]
    assert float(authors) < 0.3                                            # rounded away
    for row in ("from_pretrained time", "train step nara, checkpointing=True", "GSM8K sampling step",
                "GSM8K step with the block cache",
                "recipe update 32 = 32 x 1, checkpointing=False, rank-r path in bf16 (authors')",
                "recipe update 32 = 32 x 1, checkpointing=False, fp32 rank-r path (before)"):
        assert any(k.startswith(row) for k in rows), row


def test_ratio_benchmarks_run_quickly(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(tmp_path / "b.md")],
                   check=True, capture_output=True, timeout=600)
    text = (tmp_path / "b.md").read_text()
    for section in ("## Adapted layer", "## Training step", "## Sampling step", "## Early termination",
                    "## Size at LLaDA-8B", "| nara | 34,227,968 | 0.4252 |", "NaRA / LoRA per training step",
                    "## The LM head only where it is read",
                    "| attn_norm: float32 4096 | 16.0 KiB | 0.0 KiB |", "Expected activation memory",
                    "## NaRA / LoRA on two kernel paths", "| DEFAULT, MKL_CBWR COMPATIBLE |"):
        assert section in text


def tracked_results():
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "benchmarks/results"], capture_output=True,
                           text=True).stdout.split()
    return {f: (ROOT / f).stat().st_mtime for f in files if (ROOT / f).exists()}


def test_methods_comparison_runs_end_to_end_and_reuses_only_matching_records(tmp_path):
    tracked = tracked_results()
    cmd = [sys.executable, str(BENCH / "methods.py"), "--smoke", "--runs", str(tmp_path / "runs"),
           "--results", str(tmp_path / "res")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    table = (tmp_path / "res" / "arith.md").read_text()
    assert "| lora | 16,384 |" in table and "| nara |" in table and "Learning-rate sweep" in table
    for part in ("Figure 1 on the validation rows (gain over the base", "(gain relative", "Figure 3",
                 "per-token CE | − lora's", "on commit(s) "):
        assert part in table
    ablations = (tmp_path / "res" / "arith-ablations.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in ablations.split("\n\n")[3].splitlines()[2:]]
    assert rows == ["lora", "nara", "nara --stage1 0.5"]               # paired with group a's LoRA
    chosen = json.loads((tmp_path / "res" / "arith.json").read_text())["lr"]
    assert f"| nara --stage1 0.5 | 166,660 | {chosen['nara']:g} |" in ablations
    records = sorted((tmp_path / "res" / "runs").rglob("*seed*.json"))
    assert len(records) >= 7            # sweep 2 arms x 2 rates (+ widening), seed 1 x 2, the ablation arm
    body = json.loads(records[0].read_text())
    assert len(body["fingerprint"]) == 16 and body["commit"] and set(body["base_curve"]) == set(body["curve"])
    assert tracked_results() == tracked                                   # benchmarks/results/ untouched

    stamp = {r: r.stat().st_mtime for r in records}
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)      # a second call reuses every record
    assert {r: r.stat().st_mtime for r in records} == stamp
    seed1 = next(r for r in records if r.name.endswith("seed1.json") and r.parent.name == "nara")
    kept = json.loads(seed1.read_text())
    seed1.write_text(json.dumps({**kept, "fingerprint": "0" * 16}))      # the numerics changed since
    subprocess.run(cmd + ["--groups", "a"], check=True, capture_output=True, timeout=900)
    assert json.loads(seed1.read_text())["fingerprint"] == kept["fingerprint"]
    assert [r for r in records if r.stat().st_mtime != stamp[r]] == [seed1]   # only that one ran again

    seed1.unlink()
    before = time.time()
    report = subprocess.run(cmd + ["--report"], capture_output=True, text=True, timeout=900, check=True)
    assert "group a (arith): not complete, no record for arith nara lr" in report.stdout
    assert "group e" not in report.stdout                                # its own runs are all in
    assert (tmp_path / "res" / "arith-ablations.md").stat().st_mtime >= before          # rewritten
    bad = subprocess.run(cmd + ["--groups", "az"], capture_output=True, text=True, timeout=900)
    assert bad.returncode != 0 and "no group 'z'" in bad.stderr


def test_the_runs_go_in_the_protocols_order(tmp_path):
    """Every sweep first, group by group, then every group's seeds; a run two groups share once."""
    sys.path.insert(0, str(BENCH))
    import math
    from concurrent.futures import Future

    import methods
    asked = []

    class Pool:                                       # runs nothing: 3e-3 comes out best, no widening
        def submit(self, fn, job):
            s = job["settings"]
            asked.append((s["task"], s["arm"], s["lr"], s["seed"]))
            done = Future()
            done.set_result({"settings": s, "train_s": 0, "score_s": 0, "accuracy": 1.0,
                             "best_val_loss": abs(math.log10(s["lr"]) + 2.5)})
            return done
    runs = methods.Runs(Pool(), methods.PROTOCOL, tmp_path, tmp_path)
    runs.prints = __import__("collections").defaultdict(dict)           # no fingerprints: nothing to reuse
    methods.plan(runs, "abe")
    sweeps = [(t, a, lr, 0) for t, arms in (("arith", methods.CENTRAL), ("instruct", ("lora", "nara")))
              for a in arms for lr in (1e-3, 3e-3, 1e-2)]
    assert asked[:len(sweeps)] == sweeps                                 # e takes NaRA's rate: no sweep
    seeds = [("arith", a, 3e-3, s) for s in range(1, 5) for a in methods.CENTRAL]
    seeds += [("instruct", a, 3e-3, s) for s in (1, 2) for a in ("lora", "nara")]
    seeds += [("arith", a, 3e-3, s) for s in range(3) for a in ("nara-c", *methods.ABLATIONS)
              if ("arith", a, 3e-3, s) not in seeds + sweeps]
    assert asked[len(sweeps):] == seeds
    lr_of, sweep, records = methods.group(runs, "e")
    assert list(records) == ["lora", "nara", "nara-c", *methods.ABLATIONS] and not sweep   # paired with LoRA
    assert all(len(r) == 3 for r in records.values())


def test_methods_refuses_a_protocol_that_would_skip_items(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import methods
    monkeypatch.setitem(methods.TASKS, "instruct", {**methods.TASKS["instruct"], "max_length": 64})
    with pytest.raises(SystemExit, match="72 tokens.*does not fit --max-length 64"):
        methods.check_lengths("instruct")
    methods.check_lengths("arith")                                         # 48 covers arith's longest item


def test_a_record_is_reused_where_its_numerics_are_todays_on_either_machine():
    """Same machine: the 2-update hash decides. Another kernel path or CPU: the values, within 1e-4 (9 paths
    of one CPU differ by 8e-6 at most); a change of the code's numerics moves them far more."""
    sys.path.insert(0, str(BENCH))
    import methods
    here = {"torch": "2.14.1", "cpu_capability": "AVX512", "mkl_cbwr": "", "cpu": "AMD EPYC", "threads": 1}
    there = {**here, "cpu_capability": "DEFAULT", "mkl_cbwr": "COMPATIBLE"}
    values = [18.7827, 12.3988, 91.07, 0.0, 9.2358]
    today = {"hash": "a" * 16, "values": values, "machine": here}
    record = {"fingerprint": "a" * 16, "fingerprint_values": values, "machine": here}
    assert methods.same_numerics(record, today)
    assert not methods.same_numerics({**record, "fingerprint": "b" * 16}, today)          # same machine: bits
    drifted = [v * (1 + 8e-6) for v in values]
    assert methods.same_numerics({**record, "fingerprint": "b" * 16, "fingerprint_values": drifted,
                                  "machine": there}, today)                            # another path: values
    changed = [v * (1 + 1e-3) for v in values]
    assert not methods.same_numerics({**record, "fingerprint_values": changed, "machine": there}, today)
    assert not methods.same_numerics({**record, "fingerprint_values": None, "machine": there}, today)


def test_the_paths_table_pools_what_each_path_has_so_far(tmp_path):
    """A second kernel path counts with the seeds both arms have finished, and the table says so."""
    sys.path.insert(0, str(BENCH))
    import methods
    (tmp_path / "arith.json").write_text(json.dumps({"lr": {"lora": 0.003, "nara": 0.01}}))
    here = {"cpu": "CPU X", "cpu_capability": "AVX2", "mkl_cbwr": ""}
    done = {"native": (tmp_path / "runs", {"lora": [80, 90, 85, 95, 90], "nara": [90, 95, 95, 95, 100]}),
            "default-compatible": (tmp_path / "paths" / "default-compatible" / "runs",
                                   {"lora": [70, 80, 75], "nara": [90, 85]})}          # lora's seed 2: no pair
    for root, arms in done.values():
        for arm, accuracies in arms.items():
            lr = 0.003 if arm == "lora" else 0.01
            for seed, acc in enumerate(accuracies):
                f = root / "arith" / arm / f"lr{lr:g}-u{methods.PROTOCOL['updates']['arith']}-seed{seed}.json"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps({"accuracy": acc / 100, "machine": here}))
    methods.paths_report(tmp_path, methods.PROTOCOL)
    text = (tmp_path / "arith-paths.md").read_text()
    assert "Not complete: default-compatible has seeds 0–1 of seeds 0–4 so far." in text
    assert "| lora | 80.0, 90.0, 85.0, 95.0, 90.0 | 88.0 ± 5.7 | 70.0, 80.0 | 75.0 ± 7.1 | 84.3 ± 8.4 |" in text
    assert "pooled (7 runs)" in text
    assert "native +7.0 ± 4.5; default-compatible +12.5 ± 10.6; all 7 pairs +8.6 ± 6.3" in text
    assert not (tmp_path / "instruct-paths.md").exists()                  # no chosen rates: no table
