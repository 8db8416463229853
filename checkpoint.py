"""The files of a LLaDA checkpoint, read and written: config.json, the index, safetensors shards.

The released LLaDA-8B directory holds config.json, model.safetensors.index.json and shards grouped
by tensor kind (not by layer), so the index is the only map from key to file. Everything here checks
before it loads (switches and values of the config, keys, shapes, the index's total_size) and names
the file at fault in a one-line error; every write goes to a temporary name first, then is renamed,
so a crash never leaves a half-written file. Used by model.py (the backbone), interop.py (adapters)
and runs.py (training runs).
"""
import json
import math
import os
import shutil
from pathlib import Path

# config.json switches this architecture implements, with the only value it implements
SUPPORTED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
             "alibi": False, "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
             "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
             "block_group_size": 1, "rope_full_precision": True, "layer_norm_with_affine": True,
             "bias_for_layer_norm": (None, False),
             "multi_query_attention": (None, False), "embedding_dropout": 0.0, "attention_dropout": 0.0,
             "residual_dropout": 0.0, "flash_attention": (False, None)}
HUB_CODE = "GSAI-ML/LLaDA-8B-Instruct"                  # where the official remote code lives
CODE_FILES = ("configuration_llada.py", "modeling_llada.py")
# The released checkpoint groups tensors by kind, not by layer (its model.safetensors.index.json): shard
# 1-6 of each kind; "head" is the top-level LM head, whose name ff_out is also each block's down projection.
RELEASED_SHARDS = {"attn_out": 1, "wte": 1, "ln_f": 1, "ff_out": 2, "head": 2, "attn_norm": 3, "ff_norm": 3,
                   "q_proj": 3, "k_proj": 3, "v_proj": 4, "ff_proj": 4, "up_proj": 5}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def released_shard(key):
    """The shard (1-6) that holds checkpoint key `key` in the released LLaDA-8B layout."""
    head = key.endswith("transformer.ff_out.weight") and ".blocks." not in key    # ff_out: also each block's
    kind = "head" if head else key.split(".")[-2]
    return RELEASED_SHARDS[kind]


def read_config(path, names):
    """config.json's values for `names` (LLaDAConfig's fields), after refusing every switch this
    architecture does not implement, a missing key and an impossible value, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    raw = dict(read_json(path))
    for key, ok in SUPPORTED.items():
        if key in raw and raw[key] not in (ok if isinstance(ok, tuple) else (ok,)):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported by this LLaDA implementation "
                             f"(only {ok!r})")
    raw["n_kv_heads"] = raw.get("n_kv_heads") or raw.get("n_heads")            # null means MHA
    raw["embedding_size"] = raw.get("embedding_size") or raw.get("vocab_size")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(f"{path}: required key {missing[0]!r} is missing")
    for name in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size"):
        if not isinstance(raw[name], int) or raw[name] <= 0:
            raise ValueError(f"{path}: {name} must be a positive integer, got {raw[name]!r}")
    if raw["d_model"] % raw["n_heads"]:
        raise ValueError(f"{path}: d_model={raw['d_model']} is not divisible by n_heads={raw['n_heads']}")
    if raw["n_heads"] % raw["n_kv_heads"]:
        raise ValueError(f"{path}: n_heads={raw['n_heads']} is not divisible by "
                         f"n_kv_heads={raw['n_kv_heads']}")
    if raw["embedding_size"] < raw["vocab_size"]:
        raise ValueError(f"{path}: embedding_size={raw['embedding_size']} < vocab_size={raw['vocab_size']}")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
        if not isinstance(raw[name], int) or not 0 <= raw[name] < raw["embedding_size"]:
            raise ValueError(f"{path}: {name}={raw[name]} is outside the embedding table")
    return {n: raw[n] for n in names}


def config_json(config, base=None, local_code=False):
    """config.json as the released checkpoints have it, for a LLaDAConfig. `base` (the source's
    config.json) keeps its other keys; transformers' AutoModel(..., trust_remote_code=True) needs
    `architectures` and an `auto_map` to the official code: the files beside it (local_code) or the hub's."""
    from dataclasses import asdict
    out = {k: (v[0] if isinstance(v, tuple) else v) for k, v in SUPPORTED.items()}
    code = "" if local_code else f"{HUB_CODE}--"
    auto = {"AutoConfig": f"{code}configuration_llada.LLaDAConfig",
            "AutoModel": f"{code}modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": f"{code}modeling_llada.LLaDAModelLM"}
    return {**out, **(base or {}), "model_type": "llada", "architectures": ["LLaDAModelLM"], "auto_map": auto,
            **asdict(config)}


def read_weights(path, expected, device, dtype):
    """{key: tensor} of a checkpoint directory, every key, shape and byte checked against `expected`
    ({key: shape}) before any tensor loads, then shard by shard straight onto device in dtype."""
    state = {}
    for file, keys in checkpoint_files(Path(path), expected).items():
        with open_safetensors(file) as f:
            for key in keys:
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    return state


def write_pretrained(path, config, tensors, source=None, max_shard_bytes=5 * 2**30):
    """A model directory that from_pretrained reads and transformers' AutoModel loads: the weights
    ({"model.<key>": tensor}, shards and an index when larger than max_shard_bytes), config.json, and
    the official code and tokenizer files copied from `source` (the directory the model came from)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = Path(source) if source else None
    copied = []
    if source is not None and source.resolve() != path.resolve():
        for name in (*CODE_FILES, *TOKENIZER_FILES):
            if (source / name).is_file():
                atomic_write(path / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
                copied.append(name)
    has_config = source is not None and (source / "config.json").is_file()
    base = read_json(source / "config.json") if has_config else None
    write_shards(path, tensors, max_shard_bytes)
    body = config_json(config, base, local_code=all(f in copied or (path / f).is_file() for f in CODE_FILES))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(body, indent=2)))


def read_json(file):
    """A JSON file's content, or a one-line error naming the file."""
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def open_safetensors(file):
    """safe_open, or a one-line error naming the file when it is truncated, empty or not safetensors."""
    from safetensors import safe_open
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:   # SafetensorError, OSError: the file, not the caller, is at fault
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_safetensors(file):
    """All tensors of a safetensors file, or a one-line error naming the file when it is truncated,
    empty or not safetensors at all."""
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as e:   # SafetensorError, OSError: the file, not the caller, is at fault
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def checkpoint_files(path, expected):
    """{file: [keys]} from model.safetensors.index.json (real shards are grouped by tensor kind, not
    by layer, so the index is the only map) or from a single model.safetensors. Reads only the file
    headers and checks keys, shapes and the index's total_size before any tensor is loaded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        check_keys(index, weight_map, expected)
        files = {}
        for key, name in weight_map.items():
            files.setdefault(path / name, []).append(key)
    else:
        index, single = None, path / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{path}: neither model.safetensors.index.json nor model.safetensors "
                                    "found")
        files = {single: list(expected)}                    # checked against the header below
    total = 0
    for file, keys in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shard listed in {index.name} not found")
        with open_safetensors(file) as f:
            check_keys(file, f.keys(), keys)
            for key in keys:
                sl = f.get_slice(key)
                shape = tuple(sl.get_shape())
                if shape != expected[key]:
                    raise ValueError(f"{file}: {key} has shape {shape}, expected {expected[key]}")
                total += math.prod(shape) * _DTYPE_BYTES[sl.get_dtype()]
    if index is not None:
        declared = read_json(index).get("metadata", {}).get("total_size")
        if declared is not None and declared != total:
            raise ValueError(f"{index}: metadata.total_size={declared} but the shards hold {total} bytes of "
                             "tensors")
    return files


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}


def check_keys(file, keys, expected):
    missing, unexpected = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
    if missing:
        raise ValueError(f"{file}: key {missing[0]!r} is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ValueError(f"{file}: unexpected key {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


_UMASK = os.umask(0o022)
os.umask(_UMASK)                                 # read once: the user's umask decides who may read our files


def atomic_write(target, write):
    """Call write(tmp) then rename tmp -> target, so a crash never leaves a half-written file. The file
    gets the user's usual permissions (some writers create their file 0600)."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(path, tensors, max_shard_bytes):
    """Write {key: tensor} as model.safetensors, or as numbered shards plus model.safetensors.index.json
    (with metadata.total_size) when larger than max_shard_bytes; each file atomically. Tensors may live
    on a GPU: only one shard at a time is copied to host memory."""
    from safetensors.torch import save_file
    shards, size = [[]], 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        def shard(tmp, keys=keys):                       # only this shard is copied to host memory
            save_file({k: tensors[k].contiguous().cpu() for k in keys}, tmp, metadata={"format": "pt"})
        atomic_write(path / name, shard)
    index = path / "model.safetensors.index.json"
    if len(shards) > 1:
        body = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
        atomic_write(index, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=2)))
    else:
        index.unlink(missing_ok=True)      # a stale index would shadow the new single file
