"""Fine-tune a LLaDA model with NaRA (or a baseline) by the masked-diffusion SFT loss.

    python train.py                                    # the bundled miniature on a CPU (DEFAULT)
    python train.py --model ~/LLaDA-8B-Instruct --data math_14k.json --epochs 10        # the recipe, one GPU
    torchrun --nproc_per_node=4 train.py --model ... --data ...                         # several GPUs (DDP)

With --model the defaults are RECIPE, the NaRA authors' released recipe (docs/recipe.md); without it,
DEFAULT. On CUDA the base is bf16 and the loss runs under bf16 autocast with fp32 adapters. Every flag
is defined here (`parse_args`, checked by `check_args`); the adapters come from nara.add_adapters, by
method name; extras/runs.py keeps the run directory (run.json, metrics.jsonl, checkpoint.pt for
--resume, best/ and adapter/) and extras/interop.py writes the adapter files.

Glossary (code -> paper / recipe)
    t = λ            each sequence's diffusion time, handed to every adapter as its noise level (sft_loss)
    update, step     one AdamW step over batch_size x grad_accum sequences per process; `step` counts them
    total, warmup    updates in the run (--epochs or --max-updates); the first 5 % raise the rate linearly
    ids, answer      the training rows (N, L): prompt + answer + EOS padding, and the answer's mask
    rank, world      this process and the number of processes (DDP); rank 0 writes the run directory
    best             the lowest validation loss so far; its adapter is kept in best/
    stage1           two-stage training (the authors' ablation): for the first updates every core C = I
"""
import argparse
import contextlib
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import nara
from diffusion import sft_loss
from extras import ablations, interop, runs
from extras.tasks import gen_defaults, load_items, load_tokenizer, sampler_flags, sampler_options
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
    adapter_rank: int      # the adapters' rank r
    max_updates: int = None    # the run's length in updates, when not set by epochs
    model: str = None
    data: str = None
    test: str = None


RECIPE = Config(max_length=512, val_size=128, eval_every=64, lr=1e-4, epochs=1, batch_size=32,
                adapter_rank=32)
# The bundled run: group a's NaRA arm of docs/miniature.md (1,200 updates of 16 at 1e-2, rank 8), where
# NaRA answered 99-100 % of the test at every seed.
DEFAULT = Config(max_length=48, val_size=30, eval_every=60, lr=1e-2, epochs=60, batch_size=16, adapter_rank=8,
                 max_updates=1200, model=str(HERE / "data" / "base"),
                 data=str(HERE / "data" / "arith" / "train.json"),
                 test=str(HERE / "data" / "arith" / "test.json"))

# The flags that become nara.add_adapters' options (flag's dest -> option): the only place one is named
# after the other. A flag not given leaves the option at the method's default (nara.METHODS).
ADAPTER_FLAGS = {"adapter_rank": "r", "alpha": "alpha", "eta": "eta", "dropout": "dropout",
                 "targets": "targets", "bins": "bins", "embedding": "embedding", "embedding_width": "width",
                 "hyper_hidden": "hidden", "hyper_init": "init", "condition": "signal",
                 "density_radius": "radius", "groups": "groups", "virtual_tokens": "virtual_tokens",
                 "prompt_init_text": "prompt_init", "encoder_hidden": "encoder_hidden"}


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one-line ValueErrors like every other error of train.py."""
    def error(self, message):
        raise ValueError(message)


def parser():
    """Every flag of train.py; --help shows what each is when not given."""
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    both = lambda k: f"(recipe: {getattr(RECIPE, k)}; bundled run: {getattr(DEFAULT, k)})"  # noqa: E731
    ap.add_argument("--model", help="LLaDA directory (or a hub id, with huggingface_hub and a network); "
                    "default: the bundled miniature data/base, with the bundled run's settings")
    ap.add_argument("--data", help="LLM-Adapters .json, GSM8K-style .jsonl or CodeFeedback-style .json "
                    "(required with --model; default: the bundled data/arith/train.json)")
    ap.add_argument("--test", help="held-out file scored by generation at the end, by its `answer` or else "
                    "its output: a numeric one by the last number, any other by normalised exact match "
                    "(default: data/arith/test.json with the bundled data, else none)")
    ap.add_argument("--max-length", type=int, help=f"prompt + answer tokens {both('max_length')}")
    ap.add_argument("--val-size", type=int, help="examples held out, written to RUN/val.json "
                    f"{both('val_size')}")
    ap.add_argument("--eval-every", type=int, help=f"validate every N updates {both('eval_every')}")
    ap.add_argument("--lr", type=float, help=f"peak learning rate {both('lr')}")
    ap.add_argument("--epochs", type=float, help=f"passes over the data {both('epochs')}")
    ap.add_argument("--max-updates", type=int, help="the run's length in updates, overriding --epochs "
                    f"{both('max_updates')}")
    ap.add_argument("--batch-size", type=int, help=f"sequences per micro-batch {both('batch_size')}")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (default: 1; "
                    "authors: 1 x 32)")
    ap.add_argument("--seed", type=int, default=0, help="random seed: data split, order, masks, init "
                    "(default: 0)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--out", help="run directory (default: runs/<data name>-<method>, or runs/default for "
                    "the bundled run; -2, -3, ... when taken)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    ap.add_argument("--stop-at", type=int, help="stop after this update, as if killed (time-boxed jobs; "
                    "default: run to the end)")
    ap.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="base weights; bfloat16 also computes "
                    "under bf16 autocast, adapters stay float32 (default: bfloat16 on CUDA, float32 on CPU)")
    sampler_flags(ap)                                     # the end-of-run report's sampler: --threshold ...
    # the adapters: nara.add_adapters' options (ADAPTER_FLAGS), and the training switches of the ablations
    ap.add_argument("--method", default="nara", choices=sorted(nara.METHODS), help="adapter method "
                    "(default: nara)")
    ap.add_argument("--adapter-rank", type=int, help=f"adapter rank r, of every method but the prompt ones "
                    f"{both('adapter_rank')}")
    ap.add_argument("--alpha", type=float, help="LoRA alpha, s = alpha/r (default: s = 1)")
    ap.add_argument("--eta", type=float, help="the core scale η of nara, nara-c, nara-dora (default: 0.1)")
    ap.add_argument("--dropout", type=float, help="dropout on the adapters' input (default: 0.05)")
    ap.add_argument("--targets", type=lambda s: s.split(","), help="comma-separated layer names (default: "
                    f"{','.join(nara.TARGETS)})")
    ap.add_argument("--bins", type=int, help="multi-lora: noise bins K (default: 5)")
    ap.add_argument("--embedding", choices=("fourier", "mlp", "raw"), help="nara: λ embedding "
                    "(default: fourier)")
    ap.add_argument("--embedding-width", type=int, help="nara: width of the λ (and density) embedding "
                    "(default: 64)")
    ap.add_argument("--hyper-hidden", type=widths, help="nara: the hypernetwork's hidden widths "
                    "(default: 256,512)")
    ap.add_argument("--hyper-init", choices=("zero_last", "kaiming", "zero_all"),
                    help="nara: hypernetwork init (default: zero_last, C = I at step 0)")
    ap.add_argument("--condition", choices=("lambda", "density", "both"), help="nara: condition C on λ, "
                    "on the input's noise density, or both (default: lambda)")
    ap.add_argument("--density-radius", type=int, help="nara: neighbours on each side for the density "
                    "(default: 5)")
    ap.add_argument("--groups", type=groups, help="nara: one hypernetwork per group, e.g. "
                    "qk=q_proj+k_proj,vo=v_proj+attn_out (default: one for all layers)")
    ap.add_argument("--stage1", type=float, default=0.0, help="nara: fraction of updates with C = I, the "
                    "hypernetwork frozen (two-stage training; default: 0)")
    ap.add_argument("--freeze", type=lambda s: [p for p in s.split(",") if p], default=[],
                    help="adapter parts kept at their init: any of A,B,hypernetwork (default: none)")
    ap.add_argument("--warm-start", help="adapter directory of a saved LoRA: start A and B from it (default: "
                    "A and B at their init)")
    ap.add_argument("--virtual-tokens", type=int, help="prompt-tuning / p-tuning: number of virtual tokens "
                    "(default: 20)")
    ap.add_argument("--prompt-init-text", help="prompt-tuning: initial text (default: random rows)")
    ap.add_argument("--encoder-hidden", type=int, help="p-tuning: prompt encoder width (default: d_model)")
    return ap


def parse_args(argv=None):
    """The flags, with RECIPE's values under --model and DEFAULT's without; then check_args."""
    args = parser().parse_args(argv)
    preset = DEFAULT if args.model is None else RECIPE
    default_data = args.data is None or Path(args.data).resolve() == Path(DEFAULT.data).resolve()
    given = {k for k, v in vars(args).items() if v is not None}
    for k, v in vars(preset).items():
        if k == "test" and not default_data:                        # the bundled test goes with its data
            continue
        if k == "max_updates" and "epochs" in given:                      # --epochs sets the length
            continue
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.data is None:
        raise ValueError("--data is required with --model")
    name = "default" if preset is DEFAULT and default_data else f"{Path(args.data).stem}-{args.method}"
    check_args(args, name)
    return args


def widths(text):
    """--hyper-hidden's text: [256, 512] from 256,512."""
    try:
        return [int(h) for h in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive widths, e.g. 256,512") from None


def groups(text):
    """--groups' text: {"qk": ["q_proj", "k_proj"], ...} from qk=q_proj+k_proj,..."""
    pairs = [item.split("=") for item in text.split(",")]
    if not all(len(p) == 2 and all(p) for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: write name=layer+layer,..., e.g. "
                                         "qk=q_proj+k_proj,vo=v_proj+attn_out")
    return {g: members.split("+") for g, members in pairs}


def check_args(args, name):
    """THE check of train.py's flags: a one-line error naming the flag for every impossible setting, before
    anything is loaded (the adapter options are nara.check_options', named here by their flags). The
    default --out is runs/<name>, runs/<name>-2, ..."""
    for key in ("batch_size", "grad_accum", "eval_every", "max_length", "max_updates", "val_size", "stop_at"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    for key in ("lr", "epochs"):
        if not getattr(args, key) > 0:
            raise ValueError(f"--{key} must be positive, got {getattr(args, key)}")
    if not 0 <= args.stage1 <= 1:
        raise ValueError(f"--stage1 must be in [0, 1], got {args.stage1}")
    try:
        nara.check_options(args.method, adapter_options(args))
    except ValueError as e:
        raise ValueError(in_flags(str(e), args.method)) from None
    if set(args.freeze) - {"A", "B", "hypernetwork"}:
        unknown = sorted(set(args.freeze) - {"A", "B", "hypernetwork"})[0]
        raise ValueError(f"--freeze {unknown!r}: choose among A, B, hypernetwork")
    if args.stage1 and args.hyper_init == "kaiming":
        raise ValueError("--stage1 with --hyper-init kaiming: stage 1 holds C = I by keeping the "
                         "hypernetwork at its init, which is the identity only with zero_last or zero_all")
    for path, what in ((args.data, "--data"), (args.test, "--test"), (args.warm_start, "--warm-start")):
        if path and not Path(path).exists():
            raise ValueError(f"{what} {path}: {what[2:]} file not found")
    if args.test:
        try:
            load_items("auto", args.test)                 # a bad test file fails now, not after training
        except ValueError as e:
            raise ValueError(f"--test {e}") from None
    runs.check_device(args.device)
    if args.out is None and args.resume:
        raise ValueError("--resume needs --out RUN_DIR: the run to continue")
    if args.resume and not Path(args.out).is_dir():
        raise ValueError(f"--resume --out {args.out}: no such run directory (nothing to continue)")
    if args.out is None:
        args.out = next(f"runs/{name}{'' if k == 1 else f'-{k}'}" for k in range(1, 10**6)
                        if not Path(f"runs/{name}{'' if k == 1 else f'-{k}'}").exists())
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a run directory")


def adapter_options(args, tok=None):
    """nara.add_adapters' options from the flags given (ADAPTER_FLAGS); --prompt-init-text as token ids.
    --adapter-rank, which the presets always give, is left out for the prompt methods (no rank)."""
    options = {option: getattr(args, flag) for flag, option in ADAPTER_FLAGS.items()
               if getattr(args, flag) is not None}
    if nara.METHODS[args.method].inputs:
        options.pop("r", None)
    if "prompt_init" in options and tok is not None:
        options["prompt_init"] = tok.encode(options["prompt_init"], add_special_tokens=False).ids
    return options


def in_flags(message, method):
    """nara.check_options' `option=value: why` as `--flag value: why` (ADAPTER_FLAGS in reverse)."""
    flag_of = {option: "--" + flag.replace("_", "-") for flag, option in ADAPTER_FLAGS.items()}
    m = re.match(r"(\w+)=(.*?): (.*)", message)
    if not m or m.group(1) not in flag_of:
        return message
    if m.group(3).startswith("not an option of"):
        return f"{flag_of[m.group(1)]} does not apply to --method {method}"
    return f"{flag_of[m.group(1)]} {m.group(2)}: {m.group(3)}"


def on_meta(config, args, tok):
    """The adapters and --freeze on a weightless copy of the model (the meta device): a --targets that
    matches nothing, or a --freeze that leaves nothing to train, fails in a second, before an 8B model
    loads. The random streams are left as they were. Returns add_adapters' options."""
    options = adapter_options(args, tok)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = LLaDA(config)
        try:
            nara.add_adapters(model, args.method, verbose=False, **options)
        except ValueError as e:
            raise ValueError(in_flags(str(e), args.method)) from None
        ablations.freeze(model, args.freeze)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--freeze {','.join(args.freeze)}: leaves nothing of {args.method} to train")
    return options


@torch.no_grad()
def validation_loss(model, ids, answer, batch_size, seed):
    """Mean SFT loss over the held-out rows with fixed masks: t and the masks come from a generator of
    their own on the rows' device, so the training stream (CPU and CUDA) is never touched."""
    g = torch.Generator(ids.device).manual_seed(seed)
    losses = [sft_loss(model, ids[i:i + batch_size], answer[i:i + batch_size], generator=g)[0].item()
              * len(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
    return sum(losses) / len(ids)


def main(argv=None):
    args = parse_args(argv)                      # RECIPE's defaults with --model, else DEFAULT's
    rank, world, device = runs.start(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    out, model_dir = Path(args.out), runs.resolve_model(args.model)
    settings = runs.settings(args, model_dir, world, device)
    resume = runs.prepare(out, args, settings, rank)
    torch.manual_seed(args.seed)

    dtype = getattr(torch, args.dtype) if args.dtype else None            # default: bf16 on CUDA, else fp32
    config, tok = LLaDAConfig.from_json(Path(model_dir) / "config.json"), load_tokenizer(model_dir)
    options = on_meta(config, args, tok)                                  # before any weight loads
    ids, answer, val_ids, val_answer = runs.split(tok, args, config.eos_token_id, out, rank)   # host memory

    per_update = args.batch_size * args.grad_accum * world
    total = args.max_updates or max(1, math.ceil(args.epochs * len(ids) / per_update))
    stage1 = round(args.stage1 * total)                   # two-stage training: C = I for these updates

    model = LLaDA.from_pretrained(model_dir, device=device, dtype=dtype)
    nara.add_adapters(model, args.method, verbose=rank == 0, **options)
    ablations.freeze(model, args.freeze)                  # --freeze: parts kept at their init
    if args.warm_start:
        ablations.warm_start(model, args.warm_start)      # --warm-start: A and B from a saved LoRA
    model.gradient_checkpointing = args.grad_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    cores = list(model.noise_nets.parameters())          # at their init C = I: stage 1 keeps them there
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)
    warmup = max(1, round(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              max(0.0, (total - s) / max(1, total - warmup)))
    g = torch.Generator().manual_seed(args.seed + 1)     # the order of every example the run will see
    passes = math.ceil(total * per_update / len(ids)) + 1
    order = torch.cat([torch.randperm(len(ids), generator=g) for _ in range(passes)])
    step, best, saved_at, before = 0, math.inf, None, 0.0
    if resume:
        step, best, before = runs.restore(out, model, opt, sched, device, rank)
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
                with autocast, (contextlib.nullcontext() if sync else ddp.no_sync()):
                    loss, _ = sft_loss(ddp, ids[idx].to(device), answer[idx].to(device))
                    (loss / args.grad_accum).backward()
                loss_sum += loss.item() / args.grad_accum
                tokens += idx.numel() * ids.shape[1] * world
            runs.check_finite(loss_sum, step, out, saved_at)
            if step < stage1:                             # stage 1: the cores stay at their init, C = I
                for p in cores:
                    p.grad = None
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
                with autocast:
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
    del ddp, opt, sched                 # DDP's reducer goes before its process group; the optimizer is done
    runs.finish(world, params, device, say)
    del params
    if rank == 0 and step == total:
        interop.save_adapter(model, out / "adapter")
        say(f"adapter saved to {out / 'adapter'} (best validation loss {best:.4f} in {out / 'best'})")
        if args.test:
            small = Path(model_dir).resolve() == Path(DEFAULT.model).resolve()     # the bundled model
            runs.report(model, tok, args, out / "adapter", {**gen_defaults(small), **sampler_options(args)})
    return model


if __name__ == "__main__":
    runs.cli(main)
