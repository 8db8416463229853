"""Adapters to and from other code: PEFT's LoRA layout, and the NaRA authors' own checkpoints.

    interop.export_peft(model, dir, lam=0.5)   # LoRA (NaRA at a fixed λ) that PEFT's PeftModel loads
    interop.load_peft(model, dir)              # a PEFT LoRA adapter onto a plain LLaDA, as method "lora"
    interop.load_authors(model, dir)           # a directory saved by the authors' NaRA code

The authors' code (github.com/wataeiei/NaRA, commits 7a11f2e-15718ac, `nara/tuners/nara.py` and
`nara/utils/save_and_load.py`) saves `adapter_model.bin` (a torch.save'd dict of tensors; read here
with weights_only=True, never unpickled) and an `adapter_config.json` with peft_type "NARA". Its keys,
after the authors strip the adapter name:
    base_model.model.model.transformer.blocks.{i}.{q_proj,...}.lora_A / .lora_B   A (r, d_in), B (d_out, r)
    base_model.global_mapper[.{group}].model.{0,2,4}.{weight,bias}                F_φ (one per group)
    base_model.embedding_layers.{NL,ND}_emb.W   (or .proj.weight/.bias)          e_λ / e_density
    base_model.constant_c                                                         NaRA-C's P (input_mode "constant")
and its layer computes W0 x + scale_ab · ((dropout(x) Aᵀ) M) Bᵀ with M = I + c_scale · F.view(r, r):
with nara.core's column-major reading C = Mᵀ, so the same tensors load unchanged and give the same
outputs. Departure: the authors share one embedding between mapper groups; here each group's
hypernetwork holds its own copy (identical after loading).
"""
import json
from pathlib import Path

import torch

import nara
from model import check_keys, read_json, read_safetensors

PEFT_PREFIX = "base_model.model.model."


# ---------------------------------------------------------------- PEFT's LoRA layout
def export_peft(model, directory, lam=None):
    """LoRA in PEFT's layout (adapter_model.safetensors + adapter_config.json). NaRA, NaRA-C and
    Multi-LoRA export "LoRA at a fixed λ": B' = B C(λ) (the bin's LoRA for Multi-LoRA)."""
    cfg = model.adapter_config
    if cfg["method"] not in ("lora", "nara", "nara-c", "multi-lora"):
        raise ValueError(f"{cfg['method']} is not a low-rank additive update: PEFT's LoRA layout cannot hold it")
    if cfg["method"] in nara.NOISE_AWARE and lam is None:
        raise ValueError(f"{cfg['method']} depends on λ: pass lam= to export LoRA at that noise level")
    cond = nara.cond_at(model, 0.0 if lam is None else lam)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, nara.LoRALinear):
            A, C, B = (None if t is None else nara._first(t) for t in m.factors(cond))
            B = B if C is None else B @ C
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = A, B
    s = 1.0 if cfg["alpha"] is None else cfg["alpha"] / cfg["r"]
    nara.write_adapter_files(directory, "adapter_model.safetensors", tensors, {
        "peft_type": "LORA", "r": cfg["r"], "lora_alpha": s * cfg["r"], "lora_dropout": cfg["dropout"],
        "target_modules": cfg["targets"], "bias": "none", "exported_from": cfg["method"], "noise_level": lam})


def load_peft(model, directory, verbose=True):
    """Load a PEFT-layout LoRA (ours or PEFT's own) onto a plain model as method 'lora'."""
    directory = Path(directory)
    body = read_json(directory / "adapter_config.json")
    nara.add_adapters(model, "lora", r=body["r"], targets=body["target_modules"], alpha=body["lora_alpha"],
                      dropout=body.get("lora_dropout", 0.0), verbose=verbose)
    file = directory / "adapter_model.safetensors"
    tensors = read_safetensors(file)
    names = {f"{PEFT_PREFIX}{n}.{ab}.weight": f"{n}.{ab}" for n, m in model.named_modules()
             if isinstance(m, nara.LoRALinear) for ab in ("lora_A", "lora_B")}
    check_keys(file, tensors, names)
    model.load_state_dict({names[k]: v for k, v in tensors.items()}, strict=False)
    return model


# ---------------------------------------------------------------- the authors' NaRA checkpoints
AUTHORS_MODES = {"nl": "lambda", "nd": "density", "both": "both"}
AUTHORS_INITS = {"zero_last": "zero_last", "kaiming_uniform_m": "kaiming", "zero_all": "zero_all"}


def is_authors_checkpoint(directory):
    file = Path(directory) / "adapter_config.json"
    try:
        return json.loads(file.read_text()).get("peft_type") == "NARA"
    except (OSError, ValueError, AttributeError):
        return False


def authors_config(body, where):
    """add_adapters arguments for the authors' NARAConfig fields; a one-line error for what the
    project does not implement."""
    for key, ok in (("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None)):
        if body.get(key, ok) not in (ok, [] if ok is None else ok):
            raise ValueError(f"{where}: {key}={body[key]!r} is not supported (only {ok!r})")
    mode = body.get("input_mode", "nl")
    if mode not in (*AUTHORS_MODES, "constant"):
        raise ValueError(f"{where}: input_mode={mode!r} is not one of nl, nd, both, constant")
    targets = body.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"{where}: target_modules={targets!r}: only a list of module names is supported")
    r = int(body.get("r_ab", 8))
    if mode in ("nd", "both") and not body.get("density_radius"):
        raise ValueError(f"{where}: input_mode={mode!r} needs density_radius")
    groups = body.get("mapper_groups")
    if groups and sorted(t for g in groups.values() for t in g) != sorted(targets):
        raise ValueError(f"{where}: mapper_groups {groups} must list the target_modules exactly once")
    return dict(method="nara-c" if mode == "constant" else "nara", r=r, targets=targets,
                alpha=float(body.get("scale_ab", 1.0)) * r, dropout=float(body.get("lora_dropout", 0.0)),
                eta=float(body.get("c_scale", 1.0)), embedding=body.get("embedding_type", "fourier"),
                groups=groups or None, width=int(body.get("embedding_dim", 64)),
                hidden=(int(body.get("fnn_hidden_size_1", 256)), int(body.get("fnn_hidden_size_2", 512))),
                init=AUTHORS_INITS.get(body.get("init_c", "zero_last"), "zero_last"),
                condition=AUTHORS_MODES.get(mode, "lambda"), radius=int(body.get("density_radius") or 5))


def authors_keys(model, groups):
    """{authors' key: our key} for every adapter tensor of `model` (built by authors_config)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nara.LoRALinear):
            for ab in ("lora_A", "lora_B"):
                out[f"{PEFT_PREFIX}{name}.{ab}"] = f"{name}.{ab}"
    for key, net in model.noise_nets.items():
        if isinstance(net, nara.StaticCore):
            out["base_model.constant_c"] = f"noise_nets.{key}.P"
            continue
        mapper = "base_model.global_mapper." + (f"{key[len('nara_'):]}." if groups else "")
        for j in range(0, len(net.net), 2):
            for wb in ("weight", "bias"):
                out[f"{mapper}model.{j}.{wb}"] = f"noise_nets.{key}.net.{j}.{wb}"
    return out


def load_authors(model, directory, verbose=True):
    """Put a NaRA adapter saved by the authors' code onto a plain `model`, checking every key and shape."""
    directory = Path(directory)
    cfg_file = directory / "adapter_config.json"
    body = read_json(cfg_file)
    nara.add_adapters(model, **authors_config(body, cfg_file), verbose=verbose)
    file = next((directory / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (directory / f).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{directory}: neither adapter_model.safetensors nor adapter_model.bin found")
    if file.suffix == ".bin":
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{file}: not a readable tensor file ({type(e).__name__}: {e})") from None
    else:
        saved = read_safetensors(file)
    ours = authors_keys(model, body.get("mapper_groups"))
    emb = {k: v for k, v in saved.items() if k.startswith("base_model.embedding_layers.")}
    check_keys(file, {k: v for k, v in saved.items() if k not in emb}, ours)
    state = {ours[k]: v for k, v in saved.items() if k in ours}
    for key, net in model.noise_nets.items():           # the shared embeddings, into every hypernetwork
        for short, suffix in (("NL", ""), ("ND", "_density")):
            for k, v in emb.items():
                if k.startswith(f"base_model.embedding_layers.{short}_emb."):
                    rest = k.split(f"{short}_emb.", 1)[1]
                    state[f"noise_nets.{key}." + ("W" + suffix if rest == "W" else f"embed{suffix}.0.{rest.split('.', 1)[1]}")] = v
    expected = nara.adapter_state(model)
    check_keys(f"{file} (the authors' NaRA)", state, expected)
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{file}: the tensor for {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model
