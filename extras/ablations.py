"""The authors' ablation switches: what C is conditioned on (λ, the input's noise density, or both), the
λ embedding, the hypernetwork's widths and init, one hypernetwork per group of layers, two-stage
training, freezing parts, and a warm start from a saved LoRA.

The hypernetwork switches (and `groups`) become options of the "nara" and "nara-dora" entries of
nara.METHODS at the end of this file (nara.add_adapters(model, "nara", embedding="mlp")); with their
defaults the hypernetwork is the paper's, nara.Hypernetwork. The training switches are train.py's:
--freeze and --warm-start call `freeze` and `warm_start` once; --stage1 (two-stage training: C = I and
the hypernetwork frozen for a first fraction of updates) drops the cores' gradients in its loop.
"""
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import nara
from extras import baselines  # noqa: F401  (registers nara-dora, whose hypernetwork the switches extend)
from extras.adapters import load_state
from extras.files import read_safetensors


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
    """nara.Hypernetwork with the ablation switches, overriding its embedding (add_embedding, encode)
    and its inputs (forward). signal: "lambda" (the paper), "density" (the input's noise density,
    mask_density, from the `masked` and `attention_mask` signals of LLaDA.conditioning, or `density`
    when given) or "both" (the two embeddings concatenated); embedding: the fixed Gaussian "fourier"
    [sin(vW), cos(vW)], W ~ N(0, 16²), a learnable "mlp" Linear(1, width) + SiLU, or the "raw" value;
    init: "zero_last" (the paper: C = I at step 0), "kaiming" (the last layer too) or "zero_all". Key
    names stay those of the authors' switches: W / embed for λ, W_density / embed_density."""
    INPUTS = {"lambda": ("lam",), "density": ("density",), "both": ("lam", "density")}

    def __init__(self, r, eta=0.1, embedding="fourier", width=64, hidden=(256, 512), init="zero_last",
                 signal="lambda", radius=5):
        if embedding == "fourier" and width % 2:
            raise ValueError(f"width={width}: a Fourier embedding needs an even width (sin and cos halves)")
        self.embedding, self.inputs, self.radius = embedding, self.INPUTS[signal], radius
        self.reads = ("lam", "masked", "attention_mask", "density") if "density" in self.inputs else ("lam",)
        super().__init__(r, eta, width, hidden)                            # e's tensors, then the same F_φ
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.net[-1].weight, a=math.sqrt(5))
        elif init == "zero_all":
            for layer in self.net[::2]:
                nn.init.zeros_(layer.weight)

    def add_embedding(self, width):
        """e_v's tensors for each input, in the authors' order; returns the width of e."""
        for name in self.inputs:
            suffix = "" if name == "lam" else "_density"
            if self.embedding == "fourier":
                self.register_buffer("W" + suffix, torch.randn(1, width // 2) * 16.0)
            elif self.embedding == "mlp":
                setattr(self, "embed" + suffix, nn.Sequential(nn.Linear(1, width), nn.SiLU()))
        return (1 if self.embedding == "raw" else width) * len(self.inputs)

    def encode(self, v, name="lam"):
        """e_v for one conditioning value per sequence, in fp32: (n,) -> (n, width)."""
        v, suffix = v.float()[:, None], "" if name == "lam" else "_density"          # (n, 1)
        if self.embedding == "fourier":
            proj = v @ getattr(self, "W" + suffix).float()                  # (n, width/2)
            return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        return getattr(self, "embed" + suffix)(v) if self.embedding == "mlp" else v

    def forward(self, lam=None, masked=None, attention_mask=None, density=None):
        """C from λ and/or the noise density: `density` when given, else the input's (masked, padding)."""
        if "lam" in self.inputs:
            nara.need_lambda(lam)
        if "density" in self.inputs and density is None:
            if masked is None:
                raise ValueError("density-conditioned NaRA needs the input ids (or a density)")
            density = mask_density(masked, attention_mask, self.radius)      # (B,)
        values = {"lam": lam, "density": density}
        with torch.autocast(self.net[0].weight.device.type, enabled=False):
            e = torch.cat([self.encode(values[n], n) for n in self.inputs], dim=-1)   # (n, inputs x width)
            return self.core_of(e)                                                 # (n, r, r)


SWITCHES = dict(embedding="fourier", width=64, hidden=[256, 512], init="zero_last", signal="lambda",
                radius=5)


def hypernetwork(r, eta=0.1, **switches):
    """The paper's hypernetwork, or, when a switch differs from its default, the ablation's."""
    if switches == SWITCHES:
        return nara.Hypernetwork(r, eta)
    return Hypernetwork(r, eta, **{**switches, "hidden": tuple(switches["hidden"])})


# ---------------------------------------------------------------- their place in nara.METHODS
CHOICES = dict(embedding=("fourier", "mlp", "raw"), init=("zero_last", "kaiming", "zero_all"),
               signal=("lambda", "density", "both"))
for method in ("nara", "nara-dora"):                        # options of the hypernetwork these two share
    entry = nara.METHODS[method]
    nara.METHODS[method] = replace(entry, core=hypernetwork, core_options={**entry.core_options, **SWITCHES},
                                   choices=CHOICES, groups=True)


# ---------------------------------------------------------------- the training switches
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
    directory = Path(directory)
    names = ("adapter.safetensors", "adapter_model.safetensors")
    file = next((directory / f for f in names if (directory / f).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{directory}: no {' or '.join(names)} to warm-start from")
    saved = {k.removeprefix("base_model.model.model.").removesuffix(".weight"): v
             for k, v in read_safetensors(file).items()}
    low_rank = {k: v for k, v in saved.items() if k.endswith((".lora_A", ".lora_B"))}
    load_state(model, low_rank, file, only=lambda k: k.endswith((".lora_A", ".lora_B")))
