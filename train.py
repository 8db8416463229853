"""Fine-tune a LLaDA model with NaRA (or a baseline) by the masked-diffusion SFT loss.

    python train.py                                  # the small default run on CPU: bundled base + task
    python train.py --model ~/LLaDA-8B-Instruct --data commonsense_170k.json --lr 1e-4
    torchrun --nproc_per_node=4 train.py --model ... --data ...      # DistributedDataParallel

One update = grad_accum micro-batches of batch_size sequences (per process). Each sequence gets its
own t, and λ = t reaches every adapter (diffusion.sft_loss). With --model given, every default is the
NaRA authors' recipe (SPEC §4): chat template on `instruction`, answer = `output` + EOS padded to 512,
longer examples skipped and counted, 128 held out, validation every 64 updates with the best adapter
kept, AdamW (0.9, 0.95) wd 0.05, 5 % warm-up then linear decay, clip 1.0, r = 32, η = 0.1, batch 32
sequences per update. Without --model, the preset DEFAULT_RUN in train.py replaces the recipe's sizes.

The run directory holds: metrics.jsonl (one line per update), checkpoint.pt (adapter, optimizer,
schedule, step, RNG: --resume continues from it bit for bit), best/ and adapter/ (nara.save_adapter).
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import nara
from checkpoint import atomic_write, read_json
from diffusion import pad_sft, sft_loss
from eval import read_records
from model import LLaDA, load_tokenizer, sft_pair

HERE = Path(__file__).resolve().parent
RECIPE = dict(max_length=512, val_size=128, eval_every=64, lr=1e-4, epochs=1, batch_size=32, grad_accum=1,
              r=32, max_updates=None)
DEFAULT_RUN = dict(model=str(HERE / "data" / "base"), data=str(HERE / "data" / "arith" / "train.json"),
                   test=str(HERE / "data" / "arith" / "test.json"), max_length=64,
                   val_size=30, eval_every=20, lr=2e-3, epochs=60, batch_size=16, grad_accum=1, r=8, max_updates=None)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="LLaDA directory (or a hub id, with huggingface_hub and a network)")
    ap.add_argument("--data", help="LLM-Adapters .json, GSM8K-style .jsonl (question/answer) or CodeFeedback-style (query/answer)")
    ap.add_argument("--test", help="held-out LLM-Adapters .json scored by generation at the end (math scoring)")
    ap.add_argument("--out", help="run directory (default runs/<data name>-<method>)")
    ap.add_argument("--method", default="nara", choices=nara.METHODS, help="adapter method")
    ap.add_argument("--adapter-rank", dest="r", type=int, help="adapter rank r (recipe: 32)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha, s = alpha/r (default: s = 1)")
    ap.add_argument("--eta", type=float, default=0.1, help="NaRA core scale η")
    ap.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapters' input")
    ap.add_argument("--embedding", default="fourier", choices=("fourier", "mlp", "raw"), help="NaRA λ embedding")
    ap.add_argument("--embedding-width", type=int, default=64, help="NaRA: width of the λ (and density) embedding")
    ap.add_argument("--hyper-hidden", default="256,512", help="NaRA: the hypernetwork's hidden widths, comma-separated")
    ap.add_argument("--hyper-init", default="zero_last", choices=("zero_last", "kaiming", "zero_all"),
                    help="NaRA: hypernetwork init (zero_last: C = I at step 0)")
    ap.add_argument("--condition", default="lambda", choices=("lambda", "density", "both"),
                    help="NaRA: condition C on λ, on the input's noise density, or both")
    ap.add_argument("--density-radius", type=int, default=5, help="NaRA: neighbours on each side for the noise density")
    ap.add_argument("--groups", default=None, help="NaRA: one hypernetwork per group, e.g. qk=q_proj+k_proj,vo=v_proj+attn_out")
    ap.add_argument("--stage1", type=float, default=0.0, help="NaRA: fraction of updates trained with C = I and the hypernetwork frozen")
    ap.add_argument("--freeze", default="", help="adapter parts kept at their init: any of A,B,hypernetwork")
    ap.add_argument("--warm-start", default=None, help="adapter directory of a saved LoRA: start A and B from it")
    ap.add_argument("--bins", type=int, default=5, help="Multi-LoRA noise bins K")
    ap.add_argument("--virtual-tokens", type=int, default=20, help="prompt-tuning / p-tuning: number of virtual tokens")
    ap.add_argument("--prompt-init-text", default=None, help="prompt-tuning: initial text (default: random vocabulary rows)")
    ap.add_argument("--encoder-hidden", type=int, default=None, help="p-tuning: prompt encoder width (default d_model)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,attn_out", help="comma-separated layer names")
    ap.add_argument("--max-length", type=int, help="prompt + answer tokens (recipe: 512)")
    ap.add_argument("--val-size", type=int, help="examples held out for the validation loss (recipe: 128)")
    ap.add_argument("--eval-every", type=int, help="validate (and keep the best adapter) every N updates (recipe: 64)")
    ap.add_argument("--lr", type=float, help="peak learning rate (recipe: 1e-4)")
    ap.add_argument("--epochs", type=float, help="passes over the training data (recipe: 1)")
    ap.add_argument("--max-updates", type=int, help="stop after this many updates (overrides --epochs)")
    ap.add_argument("--batch-size", type=int, help="sequences per micro-batch and process (recipe: 32)")
    ap.add_argument("--grad-accum", type=int, help="micro-batches per update (authors: batch 1 x 32 accumulation)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (data split, order, masks, init)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="base weights; bfloat16 also computes under bf16 autocast, adapters stay float32 "
                         "(default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this update, as if killed (time-boxed jobs)")
    args = ap.parse_args(argv)
    default_run = args.model is None
    preset = DEFAULT_RUN if default_run else RECIPE
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.data is None:
        ap.error("--data is required with --model")
    check_args(args)
    if args.out is None and args.resume:
        raise ValueError("--resume needs --out RUN_DIR: the run to continue")
    if args.resume and not Path(args.out).is_dir():
        raise ValueError(f"--resume --out {args.out}: no such run directory (nothing to continue)")
    if args.out is None:                                  # a fresh directory: runs/<name>, runs/<name>-2, ...
        name = "default" if default_run else f"{Path(args.data).stem}-{args.method}"
        args.out = next(f"runs/{name}{'' if k == 1 else f'-{k}'}" for k in range(1, 10**6)
                        if not Path(f"runs/{name}{'' if k == 1 else f'-{k}'}").exists())
    return args


def check_args(args):
    """A one-line error for every impossible value, before anything is loaded."""
    flag = lambda name: "--" + {"r": "adapter-rank"}.get(name, name.replace("_", "-"))  # noqa: E731
    for name in ("r", "batch_size", "grad_accum", "eval_every", "max_length", "bins", "virtual_tokens", "density_radius",
                 "embedding_width", "max_updates", "stop_at", "encoder_hidden", "val_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {value}")
    for name, ok, what in (("lr", args.lr > 0, "positive"), ("epochs", args.epochs > 0, "positive"),
                           ("dropout", 0 <= args.dropout < 1, "in [0, 1)"), ("stage1", 0 <= args.stage1 <= 1, "in [0, 1]"),
                           ("eta", math.isfinite(args.eta), "finite")):
        if not ok:
            raise ValueError(f"{flag(name)} must be {what}, got {getattr(args, name)}")
    try:
        hidden = [int(h) for h in args.hyper_hidden.split(",")]
        assert hidden and min(hidden) >= 1
    except (ValueError, AssertionError):
        raise ValueError(f"--hyper-hidden {args.hyper_hidden!r}: give positive widths, e.g. 256,512") from None
    if args.groups and not all(item.count("=") == 1 and all(item.split("=")) for item in args.groups.split(",")):
        raise ValueError(f"--groups {args.groups!r}: write name=layer+layer,..., e.g. qk=q_proj+k_proj,vo=v_proj+attn_out")
    frozen = {p for p in args.freeze.split(",") if p}
    bad = sorted(frozen - {"A", "B", "hypernetwork"})
    if bad:
        raise ValueError(f"--freeze {bad[0]!r}: choose among A, B, hypernetwork")
    parts = {"A", "B"} | ({"hypernetwork"} if args.method in ("nara", "nara-c") else set())
    if args.method in ("lora", "nara", "nara-c", "multi-lora", "hira") and parts <= frozen:
        raise ValueError(f"--freeze {args.freeze}: leaves nothing of {args.method} to train")
    if args.device is not None:
        try:
            kind = torch.device(args.device).type
        except RuntimeError:
            raise ValueError(f"--device {args.device!r}: choose cuda, cuda:N or cpu") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here (this torch "
                             f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); use --device cpu")
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"--device {args.device!r}: choose cuda, cuda:N or cpu")
        index = torch.device(args.device).index
        if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if not all(args.targets.split(",")):
        raise ValueError(f"--targets {args.targets!r}: give comma-separated layer names")


def load_examples(path):
    """[(instruction, output)] from an LLM-Adapters .json, a GSM8K-style or CodeFeedback-style file."""
    out = []
    for i, row in enumerate(read_records(path)):
        fields = next((f for f in (("instruction", "output"), ("question", "answer"), ("query", "answer"))
                       if f[0] in row), ("instruction", "output"))
        for f in fields:
            if not isinstance(row.get(f), str):
                raise ValueError(f"{path}: item {i} has no string field {f!r}")
        prompt = row[fields[0]] + (f"\n\n{row['input']}" if row.get("input") else "")
        out.append((prompt, row[fields[1]]))
    return out


def resolve_model(name):
    """A local model directory, or a hub id ("org/name") fetched with huggingface_hub."""
    if Path(name).is_dir():
        return name
    local = name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()
    if not local:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ValueError(f"--model {name}: not a directory, and huggingface_hub is not installed to fetch it") from None
        try:
            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
        except Exception as e:
            raise ValueError(f"--model {name}: could not download it ({type(e).__name__}); download it on a "
                             "machine with a network and pass the directory") from None
    raise ValueError(f"--model {name}: no such model directory")


def adapter_options(args, tok):
    """add_adapters' keyword arguments from the command line."""
    groups = None
    if args.groups:
        groups = {g: tuple(members.split("+")) for g, members in (item.split("=", 1) for item in args.groups.split(","))}
    return dict(r=args.r, targets=args.targets.split(","), alpha=args.alpha, dropout=args.dropout, eta=args.eta,
                embedding=args.embedding, bins=args.bins, width=args.embedding_width, groups=groups,
                hidden=tuple(int(h) for h in args.hyper_hidden.split(",")), init=args.hyper_init,
                condition=args.condition, radius=args.density_radius, virtual_tokens=args.virtual_tokens,
                prompt_init=tok.encode(args.prompt_init_text, add_special_tokens=False).ids if args.prompt_init_text else None,
                encoder_hidden=args.encoder_hidden)


RESUMABLE = ("out", "resume", "stop_at", "test", "grad_checkpointing")   # what may change when a run is resumed


def run_settings(args, model_dir, world, device):
    """What makes a run this run: every flag but RESUMABLE, the data file's hash, model, devices."""
    import hashlib
    digest = hashlib.sha256()
    with open(args.data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE}
    return {**settings, "model": str(Path(model_dir).resolve()), "data": str(Path(args.data).resolve()),
            "data_sha256": digest.hexdigest(), "world_size": world, "device": device.type}


def prepare_run_dir(out, args, settings, rank):
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
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            what = {"data_sha256": "--data (the file changed since the run started)", "world_size": "the number of processes",
                    "device": "--device"}.get(key, "--" + {"r": "adapter-rank"}.get(key, key.replace("_", "-")))
            raise ValueError(f"--resume: {out} was run with {what} = {saved.get(key)!r}, not {settings.get(key)!r}; "
                             f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE[2:])} may change on resume")
    return True


def lr_factor(step, total, warmup):
    """Linear warm-up over `warmup` updates, then linear decay to 0 at `total`."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def validation_loss(model, ids, answer, batch_size, seed):
    """Mean SFT loss over the held-out rows with fixed masks: t and the masks come from a generator of
    their own on the rows' device, so the training stream (CPU and CUDA) is never touched."""
    g = torch.Generator(ids.device).manual_seed(seed)
    losses = [sft_loss(model, ids[i:i + batch_size], answer[i:i + batch_size], generator=g)[0].item()
              * len(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
    return sum(losses) / len(ids)


def save_checkpoint(file, model, opt, sched, step, best, device):
    """Everything --resume needs to continue bit for bit, written atomically."""
    ck = {"adapter": nara.adapter_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
          "step": step, "best": best, "rng": torch.get_rng_state(),
          "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0)}
    atomic_write(file, lambda tmp: torch.save(ck, tmp))


class Interrupted(Exception):
    """Ctrl-C during training, with what was saved and how to continue."""


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    model_dir = resolve_model(args.model)
    for path, what in ((args.data, "--data"), (args.test, "--test"), (args.warm_start, "--warm-start")):
        if path and not Path(path).exists():
            raise ValueError(f"{what} {path}: {what[2:]} file not found")
    if args.test:
        from eval import load_items
        load_items("arith", args.test)                # a bad test file fails now, not after training
    settings = run_settings(args, model_dir, world, device)
    resume = prepare_run_dir(out, args, settings, rank)
    torch.manual_seed(args.seed)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = LLaDA.from_pretrained(model_dir, device=device, dtype=dtype)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    tok = load_tokenizer(model_dir)
    eos = model.config.eos_token_id
    rows, skipped = [], 0
    for prompt, answer in tqdm(load_examples(args.data), desc="tokenizing", disable=rank != 0 or None, leave=False):
        row = pad_sft(*sft_pair(tok, prompt, answer, eos), args.max_length, eos)
        skipped += row is None
        rows += [row] if row is not None else []
    if len(rows) <= args.val_size:
        raise ValueError(f"--data {args.data}: {len(rows)} usable examples ({skipped} longer than "
                         f"--max-length {args.max_length}), not more than --val-size {args.val_size}")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    ids = torch.stack([r[0] for r in rows])[perm]                                # (N, L), host memory
    answer = torch.stack([r[1] for r in rows])[perm]                              # (N, L) bool
    val_ids, val_answer, ids, answer = ids[:args.val_size], answer[:args.val_size], ids[args.val_size:], answer[args.val_size:]
    say(f"data: {len(ids)} train, {len(val_ids)} held out, {skipped} skipped (longer than {args.max_length} tokens)")

    nara.add_adapters(model, args.method, **adapter_options(args, tok), verbose=rank == 0)
    nara.freeze(model, [p for p in args.freeze.split(",") if p])
    if args.warm_start:
        nara.warm_start(model, args.warm_start)
    model.gradient_checkpointing = args.grad_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)
    per_update = args.batch_size * args.grad_accum * world
    total = args.max_updates or max(1, math.ceil(args.epochs * len(ids) / per_update))
    warmup = max(1, round(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    # the order of every example the run will see, fixed by the seed: a resumed run sees the same
    g = torch.Generator().manual_seed(args.seed + 1)
    order = torch.cat([torch.randperm(len(ids), generator=g) for _ in range(math.ceil(total * per_update / len(ids)) + 1)])
    step, best, saved_at = 0, math.inf, None
    if resume:
        try:
            ck = torch.load(out / "checkpoint.pt", weights_only=True, map_location="cpu")   # AdamW's steps stay there
        except Exception as e:
            raise ValueError(f"{out / 'checkpoint.pt'}: not a readable checkpoint ({type(e).__name__}: {e})") from None
        if set(ck["adapter"]) != set(nara.adapter_state(model)):
            raise ValueError(f"--resume: {out / 'checkpoint.pt'} holds other adapters than --method {args.method} builds")
        model.load_state_dict(ck["adapter"], strict=False)                      # exactly the adapter keys
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, best = saved_at, _ = ck["step"], ck["best"]
        torch.set_rng_state(ck["rng"].cpu())
        if device.type == "cuda" and ck["cuda_rng"].numel():
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), device)
        if rank == 0:                                 # forget the metrics of updates after the checkpoint
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            (out / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
        say(f"resumed {out} at update {step}/{total}")
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.stage1 > 0) if world > 1 else model
    ddp.config = model.config
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)   # bf16 weights: the recipe's mixed precision
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))
    if world > 1:                                         # decorrelate the ranks' masks and noise levels
        torch.manual_seed(args.seed + 7919 * rank + step)
    stage1 = round(args.stage1 * total)                   # updates trained with C = I (two-stage training)
    stage = lambda: nara.identity_cores(model) if step < stage1 else contextlib.nullcontext()  # noqa: E731
    model.train()
    bar = tqdm(total=total, initial=step, desc="training", disable=rank != 0 or None)
    t0, tokens = time.time(), 0
    try:
        while step < total and (args.stop_at is None or step < args.stop_at):
            loss_sum = 0.0
            for micro in range(args.grad_accum):
                start = ((step * args.grad_accum + micro) * world + rank) * args.batch_size
                idx = order[start:start + args.batch_size]
                sync = world == 1 or micro == args.grad_accum - 1     # all-reduce once per update
                with autocast, stage(), (contextlib.nullcontext() if sync else ddp.no_sync()):
                    loss, _ = sft_loss(ddp, ids[idx].to(device), answer[idx].to(device))
                    (loss / args.grad_accum).backward()
                loss_sum += loss.item() / args.grad_accum
                tokens += idx.numel() * ids.shape[1] * world
            if not math.isfinite(loss_sum):
                kept = f"the last checkpoint (update {saved_at}) in {out} is intact" if saved_at else "no checkpoint was written yet"
                raise FloatingPointError(f"update {step + 1}: loss is {loss_sum}; stopped, {kept}")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.time() - t0
            record = {"step": step, "loss": loss_sum, "lr": sched.get_last_lr()[0], "tokens_per_s": tokens / elapsed,
                      "elapsed_s": elapsed}
            if step % args.eval_every == 0 or step == total:
                model.eval()
                with autocast, stage():
                    record["val_loss"] = validation_loss(ddp, val_ids.to(device), val_answer.to(device), args.batch_size, args.seed)
                model.train()
                if record["val_loss"] < best and rank == 0:
                    best = record["val_loss"]
                    nara.save_adapter(model, out / "best")
            if rank == 0:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                line = (f"loss {loss_sum:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s"
                        + (f" | val {record['val_loss']:.3f}" if "val_loss" in record else ""))
                bar.update(1)
                bar.set_postfix_str(line)
                if not sys.stdout.isatty() and (step % args.eval_every == 0 or step == total):   # a log file, a job
                    print(f"update {step}/{total} | {line} | {elapsed:.0f} s", flush=True)
                if step % args.eval_every == 0 or step == total or step == args.stop_at:
                    save_checkpoint(out / "checkpoint.pt", model, opt, sched, step, best, device)
                    saved_at = step
    except KeyboardInterrupt:
        where = (f"the last checkpoint (update {saved_at}) is in {out}: continue with the same command and --resume "
                 f"--out {out}") if saved_at else f"no checkpoint was written yet: run the command again with --out {out}"
        raise Interrupted(f"interrupted at update {step}/{total}; {where}") from None
    bar.close()
    if world > 1:                                         # the last collective: then rank 0 works alone
        sums = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        torch.distributed.all_gather(sums, sum(p.double().sum() for p in params).reshape(1))
        say(f"adapter checksum on {world} ranks: {'identical' if all(torch.equal(s, sums[0]) for s in sums) else 'DIFFERENT'}")
        torch.distributed.destroy_process_group()         # no rank waits in a barrier while rank 0 reports
    del opt, sched, params, ddp                           # the optimizer's state is not needed any more
    if rank == 0 and step == total:
        nara.save_adapter(model, out / "adapter")
        say(f"adapter saved to {out / 'adapter'} (best validation loss {best:.4f} in {out / 'best'})")
        if args.test:
            report(model, tok, args, out / "adapter")
    return model


def report(model, tok, args, adapter):
    """Held-out accuracy of the base model and of the fine-tuned one: the same model in memory, with
    its adapters bypassed for the base (nara.base_only), so no second copy is ever loaded."""
    from eval import accuracy
    examples = json.loads(Path(args.test).read_text())
    try:
        tuned, _ = accuracy(model.eval(), tok, examples)
        with nara.base_only(model):
            plain, _ = accuracy(model, tok, examples)
    except torch.cuda.OutOfMemoryError:
        raise ValueError(f"out of GPU memory while scoring --test; the adapter is saved in {adapter}: score it with "
                         f"python eval.py --model {args.model} --adapter {adapter} --data {args.test} --batch-size 4") from None
    print(f"held-out accuracy on {len(examples)} items: base {100 * plain:.1f} % -> {args.method} {100 * tuned:.1f} %")


if __name__ == "__main__":
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
                 "and/or add --grad-checkpointing (README: measured memory per setting)")
