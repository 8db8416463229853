"""What is done with a model's adapters once nara.add_adapters has put them on: merge them, bypass them,
read and load their tensors. Skip on a first read.

    adapters.merge(model, lam=0.5)                 # W0 <- W0 + ΔW(λ): a plain LLaDA again
    with adapters.base_only(model): ...            # the base model, adapters taken out for the block
    adapters.adapter_state(model)                  # the adapter tensors only
    adapters.load_state(model, state, where)       # load them back, every key and shape checked
"""
import contextlib

import torch
import torch.nn as nn

import nara
from model import Linear, check_keys

NOISE_AWARE = ("nara", "multi-lora", "nara-dora")      # their update depends on λ
attach = nara.add_adapters                             # the name earlier releases used


def cond_at(model, lam, **signals):
    """What the adapted layers receive for one sequence at noise level `lam` (and at any other signal a
    core reads, e.g. density= for a density-conditioned NaRA): model.conditioning of one-element tensors."""
    dev = model.transformer.wte.weight.device
    return model.conditioning(torch.tensor([float(lam)], device=dev),
                              **{k: torch.tensor([float(v)], device=dev) for k, v in signals.items()})


def plain_linear(weight):
    """A bare model.Linear holding `weight` (no throw-away d x d init)."""
    with torch.device("meta"):
        plain = Linear(weight.shape[1], weight.shape[0])
    plain.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return plain


def adapted_layers(model):
    """[(parent module, attribute name, adapted layer)] of every adapted linear layer."""
    return [(model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1], m)
            for name, m in model.named_modules() if isinstance(m, nara.LoRALinear)]


@torch.no_grad()
def merge(model, lam, **signals):
    """W0 <- W0 + ΔW(λ) in every adapted layer at one fixed λ (NaRA's update depends on it): a plain LLaDA
    again. The sum is taken in fp32 and stored in W0's dtype (with bf16, a line says so). `signals`: any
    other a core reads (cond_at)."""
    if model.prompt is not None:
        raise ValueError(f"{model.adapter_config['method']} adds input tokens, not a weight update: "
                         "nothing to merge")
    wte = model.transformer.wte.weight
    cond = cond_at(model, lam, **signals)
    for parent, child, layer in adapted_layers(model):
        setattr(parent, child, plain_linear(layer.merged_weight(cond).to(layer.weight.dtype)))
    model.noise_nets.clear()
    model.adapter_config = None
    if wte.dtype != torch.float32:
        print(f"merge: W0 + ΔW(λ={lam}) summed in float32, stored in {str(wte.dtype)[6:]} (that rounding is "
              "the merged model's only difference)")
    return model


@contextlib.contextmanager
def base_only(model):
    """Inside this block the model computes exactly as its base: each adapted layer is swapped for a bare
    layer holding the same W0, and the noise networks and virtual tokens are taken out (no second copy of
    the base is loaded); leaving puts every one back."""
    layers, nets, prompt = adapted_layers(model), model.noise_nets, model.prompt
    for parent, child, layer in layers:
        setattr(parent, child, plain_linear(layer.weight))
    model.noise_nets, model.prompt = nn.ModuleDict(), None
    try:
        yield model
    finally:
        for parent, child, layer in layers:
            setattr(parent, child, layer)
        model.noise_nets, model.prompt = nets, prompt


def adapter_state(model):
    """Only the adapter tensors (the base keys are left out): what training changes."""
    base = {k[len("model."):] for k in model.base_shapes()}
    return {k: v for k, v in model.state_dict().items() if k not in base}


def load_state(model, state, where, only=None):
    """THE loader of adapter tensors: exactly the adapter keys of `model` (or those that `only(key)`
    selects) from `state`, every key and shape checked first, each error naming `where`."""
    expected = {k: v for k, v in adapter_state(model).items() if only is None or only(k)}
    check_keys(where, state, expected)
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)                        # exactly the keys checked above
    return model
