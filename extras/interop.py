"""Adapter files: this project's own, and PEFT's LoRA layout, both ways. Skip on a first read.

    interop.save_adapter(model, dir)           # adapter.safetensors + adapter_config.json
    interop.load_adapter(model, dir)           # ours, PEFT's or the authors' (interop.adapter_format)
    interop.export_peft(model, dir, lam=0.5)   # LoRA (NaRA at a fixed λ) that PEFT's PeftModel loads
    interop.load_peft(model, dir)              # a PEFT LoRA adapter onto a plain LLaDA, as method "lora"

The NaRA authors' checkpoints are read too (load_authors, at the end; load_adapter recognises them).
"""
import json
import re
from pathlib import Path

import torch

import nara
from extras import adapters, baselines
from extras.files import atomic_write, read_safetensors
from model import Linear, check_keys, open_safetensors, read_json

PEFT_PREFIX = "base_model.model.model."


# ---------------------------------------------------------------- this project's adapter files
def write_adapter_files(directory, tensor_file, tensors, body, metadata=None):
    """tensors as safetensors and body as adapter_config.json in `directory`, each written atomically."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": "pt", **(metadata or {})}
    atomic_write(directory / tensor_file, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    text = json.dumps(body, indent=2)
    atomic_write(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(text))


def save_adapter(model, directory):
    """adapter.safetensors (adapter tensors only) + adapter_config.json."""
    write_adapter_files(directory, "adapter.safetensors", adapters.adapter_state(model),
                        {**model.adapter_config, "base_shapes": shape_id(model)})


def adapter_format(directory):
    """Which adapter a directory holds, "ours" (save_adapter), "peft" (a PEFT LoRA/DoRA, export_peft's
    too) or "authors" (the NaRA authors' code), after checking that its files are there and readable:
    a one-line error naming the directory or file otherwise, before any model is loaded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--adapter {directory}: no such directory (run `python train.py` first)")
    cfg_file = directory / "adapter_config.json"
    if not cfg_file.is_file():
        inside = [d for d in ("adapter", "best") if (directory / d / "adapter_config.json").is_file()]
        hint = (f": it is a training run; pass {' or '.join(str(directory / d) for d in inside)}"
                " (the final adapter / the best validation one)") if inside else ": not an adapter directory"
        raise ValueError(f"--adapter {directory}: no adapter_config.json{hint}")
    body = read_json(cfg_file)
    kind = {"NARA": "authors", "LORA": "peft"}.get(body.get("peft_type")) if isinstance(body, dict) else None
    names = {"authors": ("adapter_model.safetensors", "adapter_model.bin"),
             "peft": ("adapter_model.safetensors",)}
    names = names.get(kind, ("adapter.safetensors",))
    file = next((directory / n for n in names if (directory / n).is_file()), None)
    if file is None:
        raise ValueError(f"{directory}: no {' or '.join(names)} beside adapter_config.json "
                         f"({kind or 'this project'}'s layout)")
    if file.suffix == ".bin":
        import zipfile
        if not zipfile.is_zipfile(file):
            raise ValueError(f"{file}: not a readable torch file (truncated or not written by torch.save)")
    else:
        with open_safetensors(file) as f:
            f.keys()
    return kind or "ours"


def load_adapter(model, directory, verbose=True):
    """Put the saved adapters onto a plain `model` and load their tensors, checking every key and shape.
    A PEFT LoRA/DoRA directory (load_peft) and one written by the NaRA authors' code (load_authors,
    adapter_model.bin, peft_type NARA) are read too."""
    directory = Path(directory)
    kind = adapter_format(directory)
    if kind != "ours":
        return (load_authors if kind == "authors" else load_peft)(model, directory, verbose)
    cfg_file, file = directory / "adapter_config.json", directory / "adapter.safetensors"
    config = read_json(cfg_file)
    if config.pop("base_shapes", None) != shape_id(model):
        raise ValueError(f"{cfg_file}: saved for a model with different shapes than this one")
    try:
        nara.add_adapters(model, verbose=verbose, **saved_options(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    return adapters.load_state(model, read_safetensors(file), f"{file} ({config['method']} adapters)")


def saved_options(body):
    """add_adapters' arguments from an adapter_config.json. Earlier releases also wrote every other
    method's options, at their defaults (left out here), and called `signal` "condition"."""
    body = dict(body)
    if "condition" in body:
        body["signal"] = body.pop("condition")
    spec = nara.METHODS.get(body.get("method"))
    if spec is None:
        return body                                                       # add_adapters names the method
    mine = nara.options_of(spec)
    others = {k: json.loads(json.dumps(v))                               # as JSON holds them: lists
              for m in nara.METHODS.values() for k, v in nara.options_of(m).items()}
    return {k: v for k, v in body.items() if k == "method" or k in mine or others.get(k, v) != v}


def shape_id(model):
    c = model.config
    return (f"d_model={c.d_model} n_layers={c.n_layers} n_heads={c.n_heads} n_kv_heads={c.n_kv_heads} "
            f"mlp={c.mlp_hidden_size}")


# ---------------------------------------------------------------- PEFT's LoRA layout
# Fields that every PEFT release from 0.13 on knows (LoraConfig); export writes no other.
PEFT_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r",
               "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out", "init_lora_weights",
               "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layers_to_transform", "layers_pattern")
# Read but without effect on the loaded model: provenance, how PEFT initialised A and B, settings of
# features that are off (qalora_group_size without use_qalora), and what load_peft honours.
PEFT_NEUTRAL = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                "auto_mapping", "runtime_config", "peft_version", "megatron_core", "qalora_group_size",
                "eva_config", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"}


def export_peft(model, directory, lam=None):
    """The adapter as a PEFT LoRA (adapter_model.safetensors + adapter_config.json) that PeftModel
    loads onto transformers' LLaDA, PEFT 0.13 and later: NaRA, NaRA-C and Multi-LoRA as "LoRA at a
    fixed λ" (B' = B C(λ), the bin's LoRA), DoRA and NaRA-DoRA as PEFT's DoRA. The method and λ go
    into the safetensors metadata (PEFT ignores it)."""
    cfg = model.adapter_config
    if cfg["method"] == "hira" or nara.METHODS[cfg["method"]].inputs:
        raise ValueError(f"{cfg['method']} is not a low-rank additive update: PEFT's LoRA layout cannot "
                         "hold it")
    if cfg["method"] in adapters.NOISE_AWARE and lam is None:
        raise ValueError(f"{cfg['method']} depends on λ: pass lam= to export LoRA at that noise level")
    cond, tensors, ranks, alphas = adapters.cond_at(model, 0.0 if lam is None else lam), {}, {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nara.LoRALinear):
            A, C, B = (None if t is None else t.reshape(-1, *t.shape[-2:])[0] for t in m.factors(cond))
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B if C is None else B @ C
            if isinstance(m, baselines.DoRALinear):
                tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.magnitude
            ranks[name], alphas[name] = m.r, m.s * m.r             # PEFT: s = lora_alpha / r
    r = cfg["r"]
    body = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": getattr(model, "source", None), "revision": None,
            "inference_mode": True, "r": r, "lora_alpha": alphas[next(iter(alphas))],
            "lora_dropout": cfg["dropout"], "target_modules": cfg["targets"], "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
            "use_dora": cfg["method"] in ("dora", "nara-dora"),
            "rank_pattern": {n: v for n, v in ranks.items() if v != r},
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}
    body["alpha_pattern"] = {n: v for n, v in alphas.items() if v != body["lora_alpha"]}
    write_adapter_files(directory, "adapter_model.safetensors", tensors, body,
                        metadata={"nara_method": cfg["method"], "nara_noise_level": str(lam)})


def peft_targets(body, names, where):
    """Our module names that PEFT's target_modules (and exclude_modules) select: a string is a
    regular expression that must match the whole name, a list matches a name or its last parts;
    names are PEFT's, i.e. transformers' LLaDA: model.transformer.blocks.{i}.{layer}."""
    def matches(spec, name):
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return nara.target_of(name, spec) is not None
    targets = body.get("target_modules")
    if not targets:
        raise ValueError(f"{where}: no target_modules")
    chosen = [n for n in names if matches(targets, "model." + n) and not
              (body.get("exclude_modules") and matches(body["exclude_modules"], "model." + n))]
    if not chosen:
        raise ValueError(f"{where}: target_modules={targets!r} matches no layer of this model")
    return chosen


def pattern_value(pattern, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that ends the module name."""
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)
    return default if key is None else pattern[key]


def load_peft(model, directory, verbose=True):
    """A LoRA adapter in PEFT's layout (PEFT's own or export_peft's) onto a plain model, as "lora"
    or, with use_dora, "dora" (the same formula as PEFT at inference). Honoured: r, lora_alpha,
    rsLoRA, rank_pattern, alpha_pattern, target_modules as a list or a regex, exclude_modules,
    lora_dropout. Anything else that would change the model is refused by name, never ignored."""
    directory = Path(directory)
    cfg_file, file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    body = read_json(cfg_file)
    if body.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type={body['peft_type']!r}: only LORA adapters load here")
    init = str(body.get("init_lora_weights", True)).lower()
    if not init.startswith(("true", "false", "gaussian")):
        raise ValueError(f"{cfg_file}: init_lora_weights={body['init_lora_weights']!r} changes the base "
                         "weights: convert it to a plain LoRA with PEFT first "
                         "(path_initial_model_for_weight_conversion)")
    for key, value in body.items():
        off = value in (None, False, "none", [], {}, "")
        if key not in PEFT_NEUTRAL and key != "init_lora_weights" and not off:
            raise ValueError(f"{cfg_file}: {key}={value!r} is not supported (it would change the model)")
    linears = [n for n, m in model.named_modules() if n.startswith("transformer.")
               and isinstance(m, (Linear, torch.nn.Linear))]
    chosen = peft_targets(body, linears, cfg_file)
    odd = [n for n in chosen if not n.startswith("transformer.blocks.")]
    if odd:
        raise ValueError(f"{cfg_file}: adapters on {odd[0]} (the LM head or embedding) are not supported")
    r, alpha = body["r"], body.get("lora_alpha", 8)
    rp, ap = body.get("rank_pattern") or {}, body.get("alpha_pattern") or {}
    for n in chosen:                                        # PEFT 0.13 took one key for both patterns
        kr, ka = (next((k for k in pat if re.match(rf"(.*\.)?({k})$", "model." + n)), None)
                  for pat in (rp, ap))
        if kr is not None and ka is not None and kr != ka:
            raise ValueError(f"{cfg_file}: rank_pattern key {kr!r} and alpha_pattern key {ka!r} both match "
                             f"{n}: PEFT releases disagree on what that means")
    nara.add_adapters(model, "dora" if body.get("use_dora") else "lora", r=r, targets=chosen, alpha=alpha,
                      dropout=body.get("lora_dropout", 0.0), rslora=bool(body.get("use_rslora")),
                      rank_pattern={n: pattern_value(rp, "model." + n, r) for n in chosen},
                      alpha_pattern={n: pattern_value(ap, "model." + n, alpha) for n in chosen},
                      verbose=verbose)
    tensors = read_safetensors(file)
    names = {}
    for n, m in model.named_modules():
        if isinstance(m, nara.LoRALinear):
            names.update({f"{PEFT_PREFIX}{n}.lora_A.weight": f"{n}.lora_A",
                          f"{PEFT_PREFIX}{n}.lora_B.weight": f"{n}.lora_B"})
            if isinstance(m, baselines.DoRALinear):              # PEFT >= 0.10 saves it as a module's .weight
                key = f"{PEFT_PREFIX}{n}.lora_magnitude_vector"
                names[key + ".weight" if key + ".weight" in tensors else key] = f"{n}.magnitude"
    check_keys(file, tensors, names)
    return adapters.load_state(model, {names[k]: v for k, v in tensors.items()}, file)


# ---------------------------------------------------------------- the NaRA authors' checkpoints
# The authors' code (github.com/wataeiei/NaRA, commits 7a11f2e-15718ac, `nara/tuners/nara.py` and
# `nara/utils/save_and_load.py`) saves `adapter_model.bin` (a torch.save'd dict of tensors; read here
# with weights_only=True, never unpickled) and an `adapter_config.json` with peft_type "NARA". Its keys,
# after the authors strip the adapter name:
#     base_model.model.model.transformer.blocks.{i}.{q_proj,...}.lora_A / .lora_B   A (r, d_in), B (d_out, r)
#     base_model.global_mapper[.{group}].model.{0,2,4}.{weight,bias}         F_φ (one per group)
#     base_model.embedding_layers.{NL,ND}_emb.W   (or .proj.weight/.bias)   e_λ / e_density
#     base_model.constant_c                                            NaRA-C's P (input_mode "constant")
# and its layer computes W0 x + scale_ab · ((dropout(x) Aᵀ) M) Bᵀ with M = I + c_scale · F.view(r, r):
# with nara.core's column-major reading C = Mᵀ, so the same tensors load unchanged and give the same
# outputs. Departure: the authors share one embedding between mapper groups; here each group's
# hypernetwork holds its own copy (identical after loading).
AUTHORS_MODES = {"nl": "lambda", "nd": "density", "both": "both"}
AUTHORS_INITS = {"zero_last": "zero_last", "kaiming_uniform_m": "kaiming", "zero_all": "zero_all"}


def authors_config(body, where):
    """attach arguments for the authors' NARAConfig fields; a one-line error for what the
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
    shared = dict(r=r, targets=targets, alpha=float(body.get("scale_ab", 1.0)) * r,
                  dropout=float(body.get("lora_dropout", 0.0)), eta=float(body.get("c_scale", 1.0)))
    if mode == "constant":
        return dict(method="nara-c", **shared)
    return dict(method="nara", **shared, embedding=body.get("embedding_type", "fourier"),
                groups=groups or None,
                width=int(body.get("embedding_dim", 64)),
                hidden=[int(body.get("fnn_hidden_size_1", 256)), int(body.get("fnn_hidden_size_2", 512))],
                init=AUTHORS_INITS.get(body.get("init_c", "zero_last"), "zero_last"),
                signal=AUTHORS_MODES.get(mode, "lambda"), radius=int(body.get("density_radius") or 5))


def authors_keys(model, groups):
    """{authors' key: our key} for every adapter tensor of `model` (built by authors_config)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nara.LoRALinear):
            for ab in ("lora_A", "lora_B"):
                out[f"{PEFT_PREFIX}{name}.{ab}"] = f"{name}.{ab}"
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
    nara.add_adapters(model, **authors_config(body, cfg_file), verbose=verbose)
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
