"""Writing a LLaDA checkpoint (reading one is model.py's: `LLaDA.from_pretrained`), and the small file
helpers of the extras.

    files.save_pretrained(model, dir)     # the layout from_pretrained reads and transformers loads

Every write goes to a temporary name first, then is renamed, so a crash never leaves a half-written
file; every read names the file at fault in a one-line error.
"""
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from model import SUPPORTED, read_json

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


def config_json(config, base=None, local_code=False):
    """config.json as the released checkpoints have it, for a LLaDAConfig. `base` (the source's
    config.json) keeps its other keys; transformers' AutoModel(..., trust_remote_code=True) needs
    `architectures` and an `auto_map` to the official code: the files beside it (local_code) or the hub's."""
    out = {k: (v[0] if isinstance(v, tuple) else v) for k, v in SUPPORTED.items()}
    code = "" if local_code else f"{HUB_CODE}--"
    auto = {"AutoConfig": f"{code}configuration_llada.LLaDAConfig",
            "AutoModel": f"{code}modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": f"{code}modeling_llada.LLaDAModelLM"}
    return {**out, **(base or {}), "model_type": "llada", "architectures": ["LLaDAModelLM"], "auto_map": auto,
            **asdict(config)}


def save_pretrained(model, path, max_shard_bytes=5 * 2**30):
    """Write the backbone of `model` in the layout LLaDA.from_pretrained reads and transformers' AutoModel
    loads (trust_remote_code=True): the weights, in shards with an index when larger than max_shard_bytes
    (one shard in host memory at a time), config.json, and the official code and tokenizer files copied
    from the directory the model came from. Adapters are not saved here: adapters.merge folds them in."""
    sd = model.state_dict()
    tensors = {k: sd[k[6:]].detach() for k in model.base_shapes()}          # "model.<key>": the backbone
    path, source, config = Path(path), getattr(model, "source", None), model.config
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


def read_safetensors(file):
    """All tensors of a safetensors file, or a one-line error naming the file when it is truncated,
    empty or not safetensors at all."""
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as e:   # SafetensorError, OSError: the file, not the caller, is at fault
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


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
