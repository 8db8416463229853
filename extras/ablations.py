"""The authors' ablation switches: what C is conditioned on (λ, the input's noise density, or both), the
λ embedding, the hypernetwork's widths and init, two-stage training, freezing parts, and a warm start
from a saved LoRA. With its defaults, `Hypernetwork` is nara.Hypernetwork. train.py's flags reach the
hypernetwork's switches through adapters.AdapterConfig (--condition, --embedding, --hyper-init, ...), and
the training switches through one call, `apply` (--freeze, --warm-start, and --stage1 as a context).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import nara
from extras.files import read_safetensors
from model import check_keys


def mask_density(masked, valid=None, radius=5):
    """Noise density (the authors' input_mode "nd"): for each masked position, the fraction of masked
    tokens among its ±radius neighbours (itself excluded, padding and positions outside the sequence
    not counted), averaged over the masked positions of the sequence; 0 for a sequence without masks.
    masked, valid (B, L) bool -> (B,), in fp32."""
    valid = torch.ones_like(masked) if valid is None else valid.bool()
    m, v = (masked & valid).float()[:, None], valid.float()[:, None]        # (B, 1, L)
    kernel = torch.ones(1, 1, 2 * radius + 1, device=masked.device)
    kernel[..., radius] = 0.0   # the position is not its own neighbour
    with torch.autocast(masked.device.type, enabled=False):              # the same in training and evaluation
        near = F.conv1d(m, kernel, padding=radius) / F.conv1d(v, kernel, padding=radius).clamp(min=1.0)
    return (near * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1.0)


class Hypernetwork(nara.Hypernetwork):
    """nara.Hypernetwork with the ablation switches, overriding what they change: the embedding
    (__init__, encode) and what C is conditioned on (forward). signal: "lambda" (the paper), "density"
    (the input's noise density, see mask_density and watch_input) or "both" (the two embeddings
    concatenated); embedding: the fixed Gaussian "fourier" [sin(vW), cos(vW)], W ~ N(0, 16²), a learnable
    "mlp" Linear(1, width) + SiLU, or the "raw" value; init: "zero_last" (the paper: C = I at step 0),
    "kaiming" (the last layer too) or "zero_all". Key names stay those of the authors' switches: W / embed
    for λ, W_density / embed_density."""
    INPUTS = {"lambda": ("lam",), "density": ("density",), "both": ("lam", "density")}

    def __init__(self, r, eta=0.1, embedding="fourier", width=64, hidden=(256, 512), init="zero_last",
                 signal="lambda", radius=5):
        if embedding not in ("fourier", "mlp", "raw") or signal not in self.INPUTS or init not in (
                "zero_last", "kaiming", "zero_all"):
            raise ValueError(f"embedding={embedding!r}, signal={signal!r}, init={init!r}: choose embedding "
                             "fourier|mlp|raw, signal lambda|density|both, init zero_last|kaiming|zero_all")
        if embedding == "fourier" and width % 2:
            raise ValueError(f"width={width}: a Fourier embedding needs an even width (sin and cos halves)")
        nn.Module.__init__(self)                    # not nara's e_λ: this one's, then the same F_φ
        self.r, self.eta, self.radius = r, eta, radius
        self.embedding, self.inputs, self.density = embedding, self.INPUTS[signal], None
        for name in self.inputs:                    # e_v's tensors, in the authors' order
            suffix = "" if name == "lam" else "_density"
            if embedding == "fourier":
                self.register_buffer("W" + suffix, torch.randn(1, width // 2) * 16.0)
            elif embedding == "mlp":
                setattr(self, "embed" + suffix, nn.Sequential(nn.Linear(1, width), nn.SiLU()))
        self.net = nara.mlp([(1 if embedding == "raw" else width) * len(self.inputs), *hidden, r * r])
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.net[-1].weight, a=math.sqrt(5))
        elif init == "zero_all":
            for layer in self.net[::2]:
                nn.init.zeros_(layer.weight)

    def encode(self, v, name="lam"):
        """e_v for one conditioning value per sequence, in fp32: (n,) -> (n, width)."""
        v, suffix = v.float()[:, None], "" if name == "lam" else "_density"          # (n, 1)
        if self.embedding == "fourier":
            proj = v @ getattr(self, "W" + suffix).float()                  # (n, width/2)
            return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        return getattr(self, "embed" + suffix)(v) if self.embedding == "mlp" else v

    def forward(self, lam, density=None):
        """C from λ and/or the noise density: given, or the input's during a forward (watch_input)."""
        values = {"lam": lam, "density": self.density if density is None else density}
        for name in self.inputs:
            if values[name] is None:
                raise ValueError(nara.NEEDS_LAMBDA if name == "lam" else
                                 "density-conditioned NaRA needs the input ids (or density=)")
        with torch.autocast(self.net[0].weight.device.type, enabled=False):
            e = torch.cat([self.encode(values[n], n) for n in self.inputs], dim=-1)      # (n, inputs x width)
            return nara.core(self.net(e.to(self.net[0].weight.dtype)), self.r, self.eta)  # (n, r, r)


def watch_input(model):
    """Density-conditioned hypernetworks read the input: a forward pre-hook on `model` gives each the
    noise density of the batch's masked tokens (attention_mask's padding left out) for that forward, and
    a forward hook always clears it, so no value outlives its forward."""
    nets = [net for net in model.noise_nets.values() if "density" in getattr(net, "inputs", ())]

    def before(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        valid = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        for net in nets:
            net.density = mask_density(ids == module.config.mask_token_id, valid, net.radius)   # (B,)

    def after(module, args, kwargs, output):
        for net in nets:
            net.density = None
    if nets:
        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True, always_call=True)


PAPER = dict(embedding="fourier", width=64, hidden=(256, 512), init="zero_last", signal="lambda", radius=5)


def switches(cfg):
    """The hypernetwork switches of an adapters.AdapterConfig (PAPER: the paper's hypernetwork)."""
    return dict(embedding=cfg.embedding, width=cfg.width, hidden=tuple(cfg.hidden), init=cfg.init,
                signal=cfg.signal, radius=cfg.radius)


def hypernetwork(cfg):
    """The hypernetwork of an adapters.AdapterConfig: the paper's, or one with the ablation switches."""
    if switches(cfg) == PAPER:
        return nara.Hypernetwork(cfg.r, cfg.eta)
    return Hypernetwork(cfg.r, cfg.eta, **switches(cfg))


@contextlib.contextmanager
def identity_cores(model):
    """Stage 1 of the authors' two-stage training: inside this block every shared core is C = I and its
    network gets no gradient (NaRA trains as LoRA); leaving the block always restores it."""
    def identity(net):
        def forward(lam=None, density=None):
            if not isinstance(net, nara.Hypernetwork):                      # NaRA-C's one core
                return torch.eye(net.P.shape[0], device=net.P.device)
            values = {"lam": lam, "density": getattr(net, "density", None) if density is None else density}
            needed = [values[n] for n in getattr(net, "inputs", ("lam",))]
            if any(v is None for v in needed):
                raise ValueError(nara.NEEDS_LAMBDA)
            return torch.eye(net.r, device=needed[0].device).expand(needed[0].shape[0], net.r, net.r)
        return forward
    nets = list(model.noise_nets.values())
    for net in nets:
        net.forward = identity(net)
    try:
        yield model
    finally:
        for net in nets:
            del net.forward


def apply(model, args, total):
    """train.py's ablation switches on a model with adapters, in one call: --freeze and --warm-start now;
    returns stages(step), the context of update `step`: C = I for the first --stage1 x total updates
    (two-stage training, identity_cores), nothing after them."""
    freeze(model, [p for p in args.freeze.split(",") if p])
    if args.warm_start:
        warm_start(model, args.warm_start)
    first = round(args.stage1 * total)
    return lambda step: identity_cores(model) if step < first else contextlib.nullcontext()


def freeze(model, parts):
    """Freeze parts of the adapters (the authors' train_a / train_b / train_mapper): any of "A", "B",
    "hypernetwork"."""
    names = {"A": ".lora_A", "B": ".lora_B"}
    for part in parts:
        if part not in ("A", "B", "hypernetwork"):
            raise ValueError(f"freeze {part!r}: choose among A, B, hypernetwork")
        for n, p in model.named_parameters():
            if (part == "hypernetwork" and n.startswith("noise_nets.")) or (part in names
                                                                            and n.endswith(names[part])):
                p.requires_grad_(False)


def warm_start(model, directory):
    """Copy A and B from a saved LoRA adapter (ours, or PEFT's layout) into this model's adapters (the
    authors' warm start of NaRA from LoRA); every A and B must be found with its shape."""
    from pathlib import Path
    directory = Path(directory)
    names = ("adapter.safetensors", "adapter_model.safetensors")
    file = next((directory / f for f in names if (directory / f).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{directory}: no {' or '.join(names)} to warm-start from")
    saved = {k.removeprefix("base_model.model.model.").removesuffix(".weight"): v
             for k, v in read_safetensors(file).items()}
    want = {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    check_keys(file, [k for k in saved if k in want], want)
    for k, v in want.items():
        if saved[k].shape != v.shape:
            raise ValueError(f"{file}: {k} has shape {tuple(saved[k].shape)}, this model's is "
                             f"{tuple(v.shape)}")
        v.copy_(saved[k])
