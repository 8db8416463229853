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
                    "| attn_norm: float32 4096 | 16.0 KiB | 0.0 KiB |", "Expected activation memory"):
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


def test_a_free_worker_goes_to_the_first_group_waiting():
    sys.path.insert(0, str(BENCH))
    import threading

    import methods
    slots, order, started = methods.Slots(1), [], []

    def job(key):
        started.append(key)
        with slots.take(key):
            order.append(key)
    with slots.take((0,)):                             # the only worker is busy while three jobs queue up
        threads = [threading.Thread(target=job, args=(k,)) for k in ((5, 1), (2, 0), (5, 0))]
        for t in threads:
            t.start()
        while len(started) < 3 or len(slots.waiting) < 3:
            threading.Event().wait(0.01)
    for t in threads:
        t.join()
    assert order == [(2, 0), (5, 0), (5, 1)]


@pytest.mark.parametrize("quiet", [0.0, 0.5])
def test_at_the_start_the_workers_wait_until_every_job_has_asked(quiet):
    """A later group asks first, an earlier one 0.1 s after it: the earlier runs first, also when nothing
    asked for longer than `settle` before (the fingerprints come first): the wait counts from a first ask."""
    sys.path.insert(0, str(BENCH))
    import threading

    import methods
    slots, order = methods.Slots(1, settle=0.3), []

    def job(key):
        with slots.take(key):
            order.append(key)
    threading.Event().wait(quiet)
    threads = [threading.Thread(target=job, args=((5, 0),))]
    threads[0].start()
    threading.Event().wait(0.1)
    threads.append(threading.Thread(target=job, args=((2, 0),)))
    threads[1].start()
    for t in threads:
        t.join()
    assert order == [(2, 0), (5, 0)]


def test_a_sweep_two_groups_need_runs_at_the_earlier_groups_priority(tmp_path):
    sys.path.insert(0, str(BENCH))
    import types

    import methods
    ex = methods.Experiment(types.SimpleNamespace(_max_workers=1), methods.PROTOCOL, tmp_path, tmp_path)
    asked = []
    ex.run = lambda task, arm, lr, seed, priority: asked.append(priority) or {"best_val_loss": abs(lr - 3e-3)}
    lr, _ = ex.rate("instruct", "lora", 5, 0)             # group f asks first; group b (1) also sweeps it
    assert lr == 3e-3 and {p[:3] for p in asked} == {(1, 0, 0)}


def test_a_run_two_groups_need_goes_at_the_earlier_groups_priority_and_blocks_no_one(tmp_path):
    """Group f asks for a run first, group b for the same run after it: b's priority is taken, and
    while b waits for f's job, a third run (another group's) still reaches the queue."""
    sys.path.insert(0, str(BENCH))
    import threading
    import types
    from concurrent.futures import Future

    import methods
    done = []

    def submit(fn, job):
        done.append(job["settings"]["arm"])
        f = Future()
        f.set_result({"train_s": 0, "score_s": 0, "best_val_loss": 1.0, "accuracy": 1.0})
        return f
    ex = methods.Experiment(types.SimpleNamespace(_max_workers=1, submit=submit), methods.PROTOCOL,
                            tmp_path, tmp_path)
    ex.slots = methods.Slots(1)
    ex.prints = {("arith", a): "fp" for a in ("lora", "nara", "dora")}
    run = lambda arm, key: threading.Thread(target=ex.run, args=("arith", arm, 1e-3, 1, key),  # noqa: E731
                                            daemon=True)
    with ex.slots.take((0,)):                          # the worker is busy while the three ask
        threads = [run("nara", (5, 1)), run("nara", (1, 1)), run("dora", (3, 1))]
        for t in threads:
            t.start()
            threading.Event().wait(0.1)
        for _ in range(300):
            if len(ex.slots.waiting) == 2:
                break
            threading.Event().wait(0.01)
        assert len(ex.slots.waiting) == 2, "a request waiting for a shared run held back another run"
    for t in threads:
        t.join()
    assert done == ["nara", "dora"]


def test_methods_refuses_a_protocol_that_would_skip_items(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import methods
    monkeypatch.setitem(methods.TASKS, "instruct", {**methods.TASKS["instruct"], "max_length": 64})
    with pytest.raises(SystemExit, match="72 tokens.*does not fit --max-length 64"):
        methods.check_lengths("instruct")
    methods.check_lengths("arith")                                         # 48 covers arith's longest item
