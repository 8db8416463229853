"""The files of a LLaDA checkpoint, read and written: config and index JSON, safetensors shards.

The released LLaDA-8B directory holds config.json, model.safetensors.index.json and shards grouped
by tensor kind (not by layer), so the index is the only map from key to file. Everything here checks
before it loads (keys, shapes, the index's total_size) and names the file at fault in a one-line
error; every write goes to a temporary name first, then is renamed, so a crash never leaves a
half-written file. Used by model.py (the backbone), interop.py (adapters) and train.py (runs).
"""
import json
import math
import os
from pathlib import Path


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
    except Exception as e:                      # SafetensorError, OSError: the file, not the caller, is at fault
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_safetensors(file):
    """All tensors of a safetensors file, or a one-line error naming the file when it is truncated,
    empty or not safetensors at all."""
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as e:                      # SafetensorError, OSError: the file, not the caller, is at fault
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
            raise FileNotFoundError(f"{path}: neither model.safetensors.index.json nor model.safetensors found")
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
            raise ValueError(f"{index}: metadata.total_size={declared} but the shards hold {total} bytes of tensors")
    return files


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_keys(file, keys, expected):
    missing, unexpected = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
    if missing:
        raise ValueError(f"{file}: key {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ValueError(f"{file}: unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


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
        atomic_write(path / name, lambda tmp, keys=keys: save_file({k: tensors[k].contiguous().cpu() for k in keys},
                                                                   tmp, metadata={"format": "pt"}))
    index = path / "model.safetensors.index.json"
    if len(shards) > 1:
        body = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
        atomic_write(index, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=2)))
    else:
        index.unlink(missing_ok=True)      # a stale index would shadow the new single file
