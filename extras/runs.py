"""Run management for train.py: devices and ranks, the run directory, resuming, checkpoints, the log.
Skip on a first read: train.py's loop calls these at its edges.

A run directory holds run.json (the settings and the data file's sha256: --resume refuses any other
value and names the flag; and the machine, `machine()`: a resume on another one goes on with a note),
metrics.jsonl (one line per update), checkpoint.pt (adapter, optimizer, schedule, step, RNG states,
written atomically at each validation: --resume continues from it bit for bit on the same machine, kernel
path and thread count, on a CPU; on CUDA some reductions are not deterministic, so a resumed run is the
same run but not bit for bit), best/ (the best validation adapter) and adapter/ (the final one). A
finished run is never modified; a run killed before its first checkpoint starts again cleanly.
"""
import hashlib
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from extras import adapters
from extras.files import atomic_write
from extras.tasks import accuracy, load_items, read_records, sft_rows
from model import read_json

# what may change when a run is resumed
RESUMABLE = ("out", "resume", "stop_at", "test", "grad_checkpointing", "threshold", "cache", "refresh")


def check_device(device):
    """A one-line error for a --device that is no device of this machine."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device!r}: choose cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(f"--device {device}: no CUDA device here (this torch {why}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve_model(name):
    """A local model directory, or a hub id ("org/name") fetched with huggingface_hub."""
    if Path(name).is_dir():
        return name
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists():
        raise ValueError(f"--model {name}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"--model {name}: not a directory, and huggingface_hub is not installed to "
                         "fetch it") from None
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:   # noqa: BLE001 (any network failure)
        raise ValueError(f"--model {name}: could not download it ({type(e).__name__}); download it on a "
                         "machine with a network and pass the directory") from None


def machine():
    """What decides how a run's floats round, beside the code: the torch build, the vector kernels torch
    picked (ATEN_CPU_CAPABILITY can lower them), MKL's code path (MKL_CBWR), the CPU and the threads. Two
    runs agree bit for bit only where all of these are equal."""
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", ""), "cpu": cpu or platform.processor(),
            "threads": torch.get_num_threads()}


def start(args):
    """(rank, world size, device); under torchrun, the process group and this rank's GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    return rank, world, device


def settings(args, model_dir, world, device):
    """What makes a run this run: every flag but RESUMABLE, the data file's hash, model, devices."""
    digest = hashlib.sha256()
    with open(args.data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    kept = {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE}
    return {**kept, "model": str(Path(model_dir).resolve()), "data": str(Path(args.data).resolve()),
            "data_sha256": digest.hexdigest(), "world_size": world, "device": device.type}


def prepare(out, args, settings, rank):
    """A fresh run, a clean restart of a run killed before its first checkpoint, or a resume whose
    settings match the recorded ones; never a change to a finished run. True when resuming."""
    record, checkpoint = out / "run.json", out / "checkpoint.pt"
    if (out / "adapter").exists():
        raise ValueError(f"--out {out} holds a finished run (its adapter is in {out / 'adapter'}): "
                         "choose another --out")
    if not checkpoint.is_file():
        if args.resume and (out / "metrics.jsonl").exists():
            print(f"{out} has no checkpoint yet: starting it again from the beginning")
        if rank == 0:
            for stale in (out / "metrics.jsonl", record):
                stale.unlink(missing_ok=True)
            shutil.rmtree(out / "best", ignore_errors=True)
        return False
    if not args.resume:
        raise ValueError(f"--out {out} already holds a run: pass --resume to continue it, or another --out")
    if not record.is_file():
        raise ValueError(f"--resume: {record} not found, so the settings cannot be checked: start a new run")
    saved = read_json(record)
    if "machine" not in saved:
        raise ValueError(f"--resume: {out} was started by an earlier release of train.py, whose flags "
                         "differ: finish it with that release, or start a new run")
    if saved.pop("machine") != machine():
        print(f"--resume: {out} was started on another machine or kernel path than this one "
              "(run.json's machine): the run goes on, rounding as this one does")
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            what = {"data_sha256": "--data (the file changed since the run started)", "device": "--device",
                    "world_size": "the number of processes"}.get(key, flag(key))
            raise ValueError(f"--resume: {out} was run with {what} = {saved.get(key)!r}, not "
                             f"{settings.get(key)!r}; only {', '.join(map(flag, RESUMABLE[2:]))} may change "
                             "on resume")
    return True


def flag(key):
    return "--" + key.replace("_", "-")


def begin(out, settings, resume, rank):
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            body = json.dumps({**settings, "machine": machine()}, indent=1)   # what decides the rounding
            atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(body))


def save_checkpoint(file, model, opt, sched, step, best, device):
    """Everything --resume needs to continue bit for bit, written atomically."""
    ck = {"adapter": adapters.adapter_state(model), "optimizer": opt.state_dict(),
          "scheduler": sched.state_dict(),
          "step": step, "best": best, "rng": torch.get_rng_state(),
          "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0)}
    atomic_write(file, lambda tmp: torch.save(ck, tmp))


def restore(out, model, opt, sched, device, rank):
    """Load checkpoint.pt into the model, optimizer, schedule and RNG; forget later metrics. (step, best)."""
    file = out / "checkpoint.pt"
    try:
        # AdamW's steps stay there
        ck = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:   # noqa: BLE001 (the file is at fault)
        raise ValueError(f"{file}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    adapters.load_state(model, ck["adapter"], f"--resume: {file} (saved by another --method?)")
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"].cpu())
    if device.type == "cuda" and ck["cuda_rng"].numel():
        torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    lines = [line for line in lines if json.loads(line)["step"] <= ck["step"]]
    if rank == 0:                                     # forget the metrics of updates after the checkpoint
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return ck["step"], ck["best"], json.loads(lines[-1])["elapsed_s"] if lines else 0.0


def split(tok, args, eos, out, rank):
    """--data as padded SFT rows, the first --val-size rows of a permutation seeded by --seed held out:
    (train ids, train answer mask, held-out ids, held-out mask). The held-out records are written, as
    they are in --data, to RUN/val.json (`eval.py --data RUN/val.json` scores or plots them)."""
    rows = read_records(args.data)                                         # read once, also for val.json
    ids, answer, skipped, kept = sft_rows(tok, args.data, args.max_length, eos, rows)
    n = args.val_size
    if len(ids) <= n:
        raise ValueError(f"--data {args.data}: {len(ids)} usable examples ({skipped} longer than "
                         f"--max-length {args.max_length}), not more than --val-size {n}")
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(args.seed))
    if rank == 0:
        print(f"data: {len(ids) - n} train, {n} held out, {skipped} skipped (longer than {args.max_length} "
              "tokens)")
        out.mkdir(parents=True, exist_ok=True)
        held = [rows[kept[i]] for i in perm[:n].tolist()]
        atomic_write(out / "val.json", lambda tmp: Path(tmp).write_text(json.dumps(held, indent=1)))
    return ids[perm[n:]], answer[perm[n:]], ids[perm[:n]], answer[perm[:n]]


def log(out, record, line, show):
    """One metrics.jsonl line per update, and a dense line when stdout is a log file or a job's."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if show and not sys.stdout.isatty():
        print(f"update {line} | {record['elapsed_s']:.0f} s", flush=True)


def check_finite(loss, step, out, saved_at):
    if not math.isfinite(loss):
        kept = (f"the last checkpoint (update {saved_at}) in {out} is intact" if saved_at
                else "no checkpoint was written yet")
        raise FloatingPointError(f"update {step + 1}: loss is {loss}; stopped, {kept}")


class Interrupted(Exception):
    """Ctrl-C during training, with what was saved and how to continue."""
    def __init__(self, out, step, total, saved_at):
        where = (f"the last checkpoint (update {saved_at}) is in {out}: continue with the same command and "
                 f"--resume --out {out}" if saved_at
                 else f"no checkpoint was written yet: run the command again with --out {out}")
        super().__init__(f"interrupted at update {step}/{total}; {where}")


def finish(world, params, device, say):
    """After the last update the ranks compare their adapters, then leave: rank 0 saves and reports alone."""
    if world > 1:
        sums = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        torch.distributed.all_gather(sums, sum(p.double().sum() for p in params).reshape(1))
        same = all(torch.equal(s, sums[0]) for s in sums)
        say(f"adapter checksum on {world} ranks: {'identical' if same else 'DIFFERENT'}")
        # every rank has read all it was sent, so none closes a socket with a peer's bytes unread; then
        # the group goes, and no rank waits while rank 0 reports
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def report(model, tok, args, adapter, gen):
    """Held-out accuracy of the base model and of the fine-tuned one on --test (tasks.load_items' "auto"
    rule, as eval.py scores it): the same model in memory, with its adapters bypassed for the base
    (adapters.base_only), so no second copy is ever loaded."""
    items = load_items("auto", args.test)
    try:
        tuned, _ = accuracy(model.eval(), tok, items, **gen)
        with adapters.base_only(model):
            plain, _ = accuracy(model, tok, items, **gen)
    except torch.cuda.OutOfMemoryError:
        raise ValueError(f"out of GPU memory while scoring --test; the adapter is saved in {adapter}: "
                         f"score it with python eval.py --model {args.model} --adapter {adapter} --data "
                         f"{args.test} --batch-size 4") from None
    print(f"held-out accuracy on {len(items)} items of {Path(args.test).name}: base {100 * plain:.1f} % -> "
          f"{args.method} {100 * tuned:.1f} %")


def cli(main):
    """python train.py: one-line errors, and Ctrl-C says what was saved and how to continue."""
    try:
        main()
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit("\ninterrupted before training started; nothing was saved")
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --batch-size and raise --grad-accum by the same factor, "
                 "and/or add --grad-checkpointing (docs/memory.md: measured memory per setting)")
