"""Fine-tune a LLaDA model with NaRA (or a baseline) by the masked-diffusion SFT loss.

    python train.py                                    # the bundled miniature on a CPU (DEFAULT)
    python train.py --model ~/LLaDA-8B-Instruct --data math_14k.json --epochs 10        # the recipe, one GPU
    torchrun --nproc_per_node=4 train.py --model ... --data ...                         # several GPUs (DDP)

With --model the defaults are RECIPE, the NaRA authors' released recipe (docs/recipe.md); without it,
DEFAULT. On CUDA the base is bf16 and the loss runs under bf16 autocast with fp32 adapters. The adapters
come from nara.add_adapters (lora, nara, multi-lora) through extras/adapters.py, which turns the method
flags into adapters and builds the other methods; extras/runs.py keeps the run directory (run.json,
metrics.jsonl, checkpoint.pt for --resume, best/ and adapter/); extras/ablations.py the switches.

Glossary (code -> paper / recipe)
    t = λ            each sequence's diffusion time, handed to every adapter as its noise level (sft_loss)
    update, step     one AdamW step over batch_size x grad_accum sequences per process; `step` counts them
    total, warmup    updates in the run (--epochs or --max-updates); the first 5 % raise the rate linearly
    ids, answer      the training rows (N, L): prompt + answer + EOS padding, and the answer's mask
    rank, world      this process and the number of processes (DDP); rank 0 writes the run directory
    best             the lowest validation loss so far; its adapter is kept in best/
"""
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion import sft_loss
from extras import ablations, adapters, interop, runs
from extras.tasks import gen_defaults, load_tokenizer
from model import LLaDA, LLaDAConfig

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Config:
    """The settings in which the paper's recipe and the bundled miniature differ (flags override them)."""
    max_length: int        # prompt + answer tokens; longer examples are skipped and counted
    val_size: int          # examples held out for the validation loss
    eval_every: int        # validate, keep the best adapter and checkpoint every N updates
    lr: float              # peak learning rate: 5 % linear warm-up, then linear decay to 0
    epochs: float          # passes over the training data (max_updates overrides)
    batch_size: int        # sequences per micro-batch and process
    r: int                 # adapter rank
    max_updates: int = None    # the run's length in updates, when not set by epochs
    model: str = None
    data: str = None
    test: str = None


RECIPE = Config(max_length=512, val_size=128, eval_every=64, lr=1e-4, epochs=1, batch_size=32, r=32)
# The bundled run: group a's NaRA arm of docs/miniature.md (1,200 updates of 16 at 1e-2, rank 8), where
# NaRA answered 99-100 % of the test at every seed.
DEFAULT = Config(max_length=48, val_size=30, eval_every=60, lr=1e-2, epochs=60, batch_size=16, r=8,
                 max_updates=1200, model=str(HERE / "data" / "base"),
                 data=str(HERE / "data" / "arith" / "train.json"), test=str(HERE / "data" / "arith" / "test.json"))


@torch.no_grad()
def validation_loss(model, ids, answer, batch_size, seed):
    """Mean SFT loss over the held-out rows with fixed masks: t and the masks come from a generator of
    their own on the rows' device, so the training stream (CPU and CUDA) is never touched."""
    g = torch.Generator(ids.device).manual_seed(seed)
    losses = [sft_loss(model, ids[i:i + batch_size], answer[i:i + batch_size], generator=g)[0].item()
              * len(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
    return sum(losses) / len(ids)


def main(argv=None):
    args = runs.parse_args(argv, __doc__, RECIPE, DEFAULT)   # RECIPE's defaults with --model, else DEFAULT's
    rank, world, device = runs.start(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    out, model_dir = Path(args.out), runs.resolve_model(args.model)
    settings = runs.settings(args, model_dir, world, device)
    resume = runs.prepare(out, args, settings, rank)
    torch.manual_seed(args.seed)

    dtype = getattr(torch, args.dtype) if args.dtype else None            # default: bf16 on CUDA, else fp32
    config, tok = LLaDAConfig.from_json(Path(model_dir) / "config.json"), load_tokenizer(model_dir)
    options = adapters.check_on_meta(config, args.method, adapters.from_flags(args, tok))   # before loading
    ids, answer, val_ids, val_answer = runs.split(tok, args, config.eos_token_id, out, rank)   # host memory

    per_update = args.batch_size * args.grad_accum * world
    total = args.max_updates or max(1, math.ceil(args.epochs * len(ids) / per_update))

    model = LLaDA.from_pretrained(model_dir, device=device, dtype=dtype)
    adapters.attach(model, args.method, verbose=rank == 0, **options)   # lora, nara, multi-lora: nara.py
    stages = ablations.apply(model, args, total)          # --freeze, --warm-start; stages(step): --stage1
    model.gradient_checkpointing = args.grad_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)
    warmup = max(1, round(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              max(0.0, (total - s) / max(1, total - warmup)))
    g = torch.Generator().manual_seed(args.seed + 1)     # the order of every example the run will see
    epochs = math.ceil(total * per_update / len(ids)) + 1
    order = torch.cat([torch.randperm(len(ids), generator=g) for _ in range(epochs)])
    step, best, saved_at, before = 0, math.inf, None, 0.0
    if resume:
        step, best, before = runs.restore(out, model, opt, sched, device, rank, args.method)
        saved_at = step
        say(f"resumed {out} at update {step}/{total}")
    ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=True)     # a parameter may sit out an update; the check costs ms
    ddp.config = model.config
    bf16 = model.transformer.wte.weight.dtype == torch.bfloat16           # the recipe's mixed precision
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    runs.begin(out, settings, resume, rank)
    if world > 1:                                         # decorrelate the ranks' masks and noise levels
        torch.manual_seed(args.seed + 7919 * rank + step)

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
                with autocast, stages(step), (contextlib.nullcontext() if sync else ddp.no_sync()):
                    loss, _ = sft_loss(ddp, ids[idx].to(device), answer[idx].to(device))
                    (loss / args.grad_accum).backward()
                loss_sum += loss.item() / args.grad_accum
                tokens += idx.numel() * ids.shape[1] * world
            runs.check_finite(loss_sum, step, out, saved_at)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = sched.get_last_lr()[0]                   # the rate this update uses
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens / (time.time() - t0),
                      "elapsed_s": before + time.time() - t0}             # continued across --resume
            validate = step % args.eval_every == 0 or step == total
            if validate:
                model.eval()
                with autocast, stages(step):
                    record["val_loss"] = validation_loss(ddp, val_ids.to(device), val_answer.to(device),
                                                         args.batch_size, args.seed)
                model.train()
                if record["val_loss"] < best and rank == 0:
                    best = record["val_loss"]
                    interop.save_adapter(model, out / "best")
            if rank == 0:
                line = (f"loss {loss_sum:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s"
                        + (f" | val {record['val_loss']:.3f}" if validate else ""))
                runs.log(out, record, f"{step}/{total} | {line}", validate)
                bar.update(1)
                bar.set_postfix_str(line)
                if validate or step == args.stop_at:
                    runs.save_checkpoint(out / "checkpoint.pt", model, opt, sched, step, best, device)
                    saved_at = step
    except KeyboardInterrupt:
        raise runs.Interrupted(out, step, total, saved_at) from None
    bar.close()
    runs.finish(world, params, device, say)
    del opt, sched, params, ddp                           # the optimizer's state is not needed any more
    if rank == 0 and step == total:
        interop.save_adapter(model, out / "adapter")
        say(f"adapter saved to {out / 'adapter'} (best validation loss {best:.4f} in {out / 'best'})")
        if args.test:
            small = Path(model_dir).resolve() == Path(DEFAULT.model).resolve()     # the bundled model
            runs.report(model, tok, args, out / "adapter", gen_defaults(small))
    return model


if __name__ == "__main__":
    runs.cli(main)
