"""The NaRA authors' checkpoints, read into this project's NaRA (interop.load_adapter recognises them).
Skip on a first read.

The authors' code (github.com/wataeiei/NaRA, commits 7a11f2e-15718ac, `nara/tuners/nara.py` and
`nara/utils/save_and_load.py`) saves `adapter_model.bin` (a torch.save'd dict of tensors; read here
with weights_only=True, never unpickled) and an `adapter_config.json` with peft_type "NARA". Its keys,
after the authors strip the adapter name:
    base_model.model.model.transformer.blocks.{i}.{q_proj,...}.lora_A / .lora_B   A (r, d_in), B (d_out, r)
    base_model.global_mapper[.{group}].model.{0,2,4}.{weight,bias}         F_φ (one per group)
    base_model.embedding_layers.{NL,ND}_emb.W   (or .proj.weight/.bias)   e_λ / e_density
    base_model.constant_c                                                  NaRA-C's P (input_mode "constant")
and its layer computes W0 x + scale_ab · ((dropout(x) Aᵀ) M) Bᵀ with M = I + c_scale · F.view(r, r):
with nara.core's column-major reading C = Mᵀ, so the same tensors load unchanged and give the same
outputs. Departure: the authors share one embedding between mapper groups; here each group's
hypernetwork holds its own copy (identical after loading).
"""
from pathlib import Path

import torch

import adapters
import baselines
import nara
from checkpoint import check_keys, read_json, read_safetensors

PREFIX = "base_model.model.model."                       # PEFT's, which the authors' code keeps


AUTHORS_MODES = {"nl": "lambda", "nd": "density", "both": "both"}
AUTHORS_INITS = {"zero_last": "zero_last", "kaiming_uniform_m": "kaiming", "zero_all": "zero_all"}


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
                signal=AUTHORS_MODES.get(mode, "lambda"), radius=int(body.get("density_radius") or 5))


def authors_keys(model, groups):
    """{authors' key: our key} for every adapter tensor of `model` (built by authors_config)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nara.LoRALinear):
            for ab in ("lora_A", "lora_B"):
                out[f"{PREFIX}{name}.{ab}"] = f"{name}.{ab}"
    for key, net in model.noise_nets.items():
        if isinstance(net, baselines.StaticCore):
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
    adapters.add_adapters(model, **authors_config(body, cfg_file), verbose=verbose)
    names = ("adapter_model.safetensors", "adapter_model.bin")
    file = next((directory / f for f in names if (directory / f).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{directory}: neither {' nor '.join(names)} found")
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
                    rest = k.split(f"{short}_emb.", 1)[1]                # W, or proj.weight / proj.bias
                    ours = "W" + suffix if rest == "W" else f"embed{suffix}.0.{rest.split('.', 1)[1]}"
                    state[f"noise_nets.{key}.{ours}"] = v
    return adapters.load_state(model, state, f"{file} (the authors' NaRA)")
