"""The LLaDA backbone: a Llama-style pre-norm transformer without the causal mask.

Read with LLaDA (arXiv 2502.09992) §2 and Appendix B. It reproduces the released LLaDA-8B checkpoint
(`GSAI-ML/LLaDA-8B-Base`, `-Instruct`): same module and key names, same numerics, so
`LLaDA.from_pretrained(dir)` loads the downloaded files unchanged (docs/architecture.md: the facts).

Glossary (code -> paper / checkpoint)
    wte, lm_head              token embedding and the *untied* LM head (126464 x 4096), whose checkpoint
                              name transformer.ff_out each block's down projection has too
    attn_norm, ff_norm, ln_f  RMSNorm before attention, before the MLP, and at the end
    q_proj k_proj v_proj      attention projections, attn_out = W_o (the four layers NaRA adapts)
    ff_proj, up_proj, ff_out  SwiGLU MLP: ff_out(silu(ff_proj(h)) * up_proj(h)); ff_proj is the gate
    B, L, d                   batch, sequence length, d_model in shape comments
    noise_level (λ), cond     the noise level of each sequence (B,); cond = what every linear layer
                              receives: {"lam": λ, name: output of each net in `noise_nets`}
Two hooks, empty in the bare model: `noise_nets` (networks run once per forward on λ and the signals they
read, `conditioning`; nara.py adds NaRA's hypernetwork) and `prompt` (a module that adds input positions;
extras/baselines.py). The released files (config.json, the index, safetensors shards) are read at the
end of this file.

Departures from the official `modeling_llada.py`, on purpose: one block type (llama: RoPE, RMSNorm,
SiLU, no biases), every other config switch refused; no ALiBi, flash-attn path or dropout;
`attention_mask` masks keys only (the official code also adds a causal bias when a mask has zeros);
the K/V of a sequence can go in and out of the forward (`kv=`, `keep_kv=`) for the sampler's block
cache, which is an approximation: a bidirectional model's K/V change whenever any token does, and
with NaRA whenever λ does (diffusion.BlockCache says which and by how much);
`logits_at=` computes the LM head only where it is read; training on CUDA recomputes norms and SiLU
in backward (`recompute`: the same gradients, half the activations).
"""
import contextvars
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# config.json switches this architecture implements, with the only value it implements
SUPPORTED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
             "alibi": False, "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
             "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
             "block_group_size": 1, "rope_full_precision": True, "layer_norm_with_affine": True,
             "bias_for_layer_norm": (None, False),
             "multi_query_attention": (None, False), "embedding_dropout": 0.0, "attention_dropout": 0.0,
             "residual_dropout": 0.0, "flash_attention": (False, None)}
BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class LLaDAConfig:
    """Defaults are LLaDA-8B's `config.json`. `LLaDAConfig.tiny()` is the preset for tests."""
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081

    @classmethod
    def tiny(cls, **overrides):
        """A 2-layer model for tests: same architecture, small numbers, ids inside a 128 vocab."""
        kw = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128, vocab_size=128,
                  embedding_size=128, max_sequence_length=256, mask_token_id=126, eos_token_id=125,
                  pad_token_id=125)
        return cls(**{**kw, **overrides})

    @classmethod
    def from_json(cls, path):
        """Read a real LLaDA `config.json`. A switch this architecture does not implement (SUPPORTED), a
        missing key or an impossible value is a one-line error naming the file."""
        path, names = Path(path), [f.name for f in fields(cls)]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        raw = dict(read_json(path))
        raw["n_kv_heads"] = raw.get("n_kv_heads") or raw.get("n_heads")            # null means MHA
        raw["embedding_size"] = raw.get("embedding_size") or raw.get("vocab_size")
        bad = [f"{k}={raw[k]!r} is not supported by this LLaDA implementation (only {ok!r})"
               for k, ok in SUPPORTED.items()
               if k in raw and raw[k] not in (ok if isinstance(ok, tuple) else (ok,))]
        bad += [f"required key {n!r} is missing" for n in names if n not in raw]
        sizes = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size")
        bad = bad or [f"{n} must be a positive integer, got {raw[n]!r}" for n in sizes
                      if not isinstance(raw[n], int) or raw[n] <= 0]
        if bad:
            raise ValueError(f"{path}: {bad[0]}")
        d, h, kv, emb = raw["d_model"], raw["n_heads"], raw["n_kv_heads"], raw["embedding_size"]
        bad = [why for ok, why in (
            (d % h == 0, f"d_model={d} is not divisible by n_heads={h}"),
            (h % kv == 0, f"n_heads={h} is not divisible by n_kv_heads={kv}"),
            (emb >= raw["vocab_size"], f"embedding_size={emb} < vocab_size={raw['vocab_size']}"),
            *((isinstance(raw[n], int) and 0 <= raw[n] < emb, f"{n}={raw[n]} is outside the embedding table")
              for n in ("mask_token_id", "eos_token_id", "pad_token_id"))) if not ok]
        if bad:
            raise ValueError(f"{path}: {bad[0]}")
        return cls(**{n: raw[n] for n in names})


class Linear(nn.Linear):
    """A bias-free nn.Linear whose forward also takes `cond`; the bare layer ignores it."""
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x, cond=None):
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    """y = w * cast(x / sqrt(mean(x^2) + eps)): normalise in fp32, cast back, then scale (LLaDA order)."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            h = at_least_fp32(x)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def at_least_fp32(x):
    """x in fp32, or unchanged when wider: norms and RoPE compute in fp32 (LLaDA), a float64 model (the
    tests' comparisons of computations that differ in shape) all in float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rope_table(seq_len, head_dim, theta, device, dtype=torch.float32):
    """sin, cos of shape (1, 1, L, hs) in fp32 (float64 for a float64 model), frequencies repeated over
    both halves (NeoX layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=dtype), inv_freq)        # (L, hs/2)
    angles = torch.cat((angles, angles), dim=-1)                                              # (L, hs)
    return angles.sin()[None, None], angles.cos()[None, None]


def apply_rope(x, sin, cos):
    """Rotate-half RoPE on x (B, nh, L, hs), computed in fp32 and cast back to x's dtype."""
    h = at_least_fp32(x)
    h1, h2 = h.view(*h.shape[:-1], 2, h.shape[-1] // 2).unbind(-2)
    return (h * cos + torch.cat((-h2, h1), dim=-1) * sin).to(x.dtype)


RECOMPUTING = contextvars.ContextVar("recomputing", default=False)       # set by run_block alone


def recomputable(fn, *args):
    """fn(*args), keeping for backward only its inputs while the model's forward recomputes (LLaDA's
    `recompute`): norms, SiLU and the adapters' dropout are then redone in backward (the same kernels on
    the same values and RNG: bit-identical gradients on any one machine) instead of keeping their fp32
    or per-layer copies, half the activations (BENCHMARKS.md)."""
    if RECOMPUTING.get() and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def run_block(block, recompute, *args):
    """block(*args) with `recomputable` recomputing (or not) inside it; the flag goes with the call, so a
    whole block recomputed in backward (gradient checkpointing) recomputes the same way."""
    token = RECOMPUTING.set(recompute)
    try:
        return block(*args)
    finally:
        RECOMPUTING.reset(token)


def swiglu(gate, up):
    return F.silu(gate) * up


class Block(nn.Module):
    """x + Attn(attn_norm(x)), then + MLP(ff_norm(.)): one LLaDA 'llama' block."""
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        hs = config.d_model // config.n_heads
        d, kv, mlp = config.d_model, config.n_kv_heads * hs, config.mlp_hidden_size
        self.attn_norm, self.ff_norm = RMSNorm(d, config.rms_norm_eps), RMSNorm(d, config.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = Linear(d, d), Linear(d, kv), Linear(d, kv)
        self.attn_out = Linear(d, d)
        self.ff_proj, self.up_proj = Linear(d, mlp), Linear(d, mlp)          # gate and up
        self.ff_out = Linear(mlp, d)                                          # the MLP's down projection

    def forward(self, x, sin, cos, key_pad, cond, kv=None, start=0):
        """x (B, L, d) -> (x', (k, v) of these L positions). kv: the (K, V) of every position of the
        sequence (B, nkv, S, hs) from an earlier forward, whose rows start..start+L this input replaces;
        the queries then attend to all S (a KV cache, diffusion.BlockCache)."""
        B, L, d = x.shape
        h = recomputable(self.attn_norm, x)                                   # keeps x, not its fp32 copy
        q = self.q_proj(h, cond).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, nh, L, hs)
        k = self.k_proj(h, cond).view(B, L, self.n_kv_heads, -1).transpose(1, 2)   # (B, nkv, L, hs)
        v = self.v_proj(h, cond).view(B, L, self.n_kv_heads, -1).transpose(1, 2)   # (B, nkv, L, hs)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        mine = (k, v)
        if kv is not None:                                                     # (B, nkv, S, hs) each
            k, v = (torch.cat([t[:, :, :start], new, t[:, :, start + L:]], dim=2) for t, new in zip(kv, mine))
        if self.n_kv_heads != self.n_heads:                                    # grouped-query attention
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        bias = None
        if key_pad is not None:                     # (B, 1, 1, L): finfo.min on padded keys, 0 elsewhere
            bias = torch.zeros(key_pad.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(key_pad, torch.finfo(q.dtype).min)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)   # (B, nh, L, hs)
        x = x + self.attn_out(att.transpose(1, 2).contiguous().view(B, L, d), cond)
        h = recomputable(self.ff_norm, x)
        gated = recomputable(swiglu, self.ff_proj(h, cond), self.up_proj(h, cond))   # (B, L, mlp)
        return x + self.ff_out(gated, cond), mine


def check_shape(name, t, shape, dtype=None):
    """A one-line error when an argument of the forward has another shape (or dtype) than it must."""
    if t is not None and (tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype)):
        want = f"shape {shape}" + (f" and dtype {dtype}" if dtype is not None else "")
        raise ValueError(f"{name} must have {want}, got {t.dtype} {tuple(t.shape)}")


class LLaDA(nn.Module):
    """logits = lm_head(ln_f(blocks(wte(ids)))) with bidirectional attention."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),   # the LM head
        ))
        self.noise_nets = nn.ModuleDict()        # conditioning hook: run once per forward (`conditioning`)
        self.prompt = None                       # input hook: (x, pad) -> (x', pad', where the L tokens went)
        self.gradient_checkpointing = False      # whole blocks recomputed in backward (--grad-checkpointing)
        self.recompute = None                    # norms, SiLU, dropout redone in backward; None: CUDA only

    @property
    def lm_head(self):
        """The untied LM head: transformer.ff_out in the checkpoint, a name each block's down projection has
        too."""
        return self.transformer.ff_out

    def conditioning(self, noise_level, input_ids=None, attention_mask=None, **signals):
        """What every linear layer receives, computed once per forward: the noise level and each noise
        network's output (NaRA's C(λ), (B, r, r)). A network gets, as keyword arguments, the signals its
        `reads` names: lam, the noise level (B,); masked, where the input holds the mask token (B, L);
        attention_mask; or any other signal given here by name (e.g. one to evaluate a core at)."""
        masked = None if input_ids is None else input_ids == self.config.mask_token_id
        signals = {"lam": noise_level, "masked": masked, "attention_mask": attention_mask, **signals}
        return {"lam": noise_level, **{name: net(**{k: signals.get(k) for k in net.reads})
                                       for name, net in self.noise_nets.items()}}

    def forward(self, input_ids, attention_mask=None, noise_level=None, logits_at=None, kv=None, start=0,
                keep_kv=False):
        """input_ids (B, L) long; attention_mask (B, L) of 1 = token, 0 = padding (keys only);
        noise_level (B,) float, one λ per sequence. logits_at: where to compute the LM head, which costs
        d_model x vocab per position: None = everywhere, logits (B, L, V); a bool (B, L) mask = only
        there, (N, V) in the order of logits[mask]; a slice of the L positions = (B, len, V).
        A KV cache (diffusion.BlockCache): keep_kv=True also returns each block's (K, V) of these
        positions, [(B, nkv, L, hs) x 2 per block]; kv= such a list over a whole sequence of S positions,
        of which input_ids are positions start..start+L (attention_mask then covers all S)."""
        B, L = input_ids.shape
        S = L if kv is None else kv[0][0].shape[2]
        if noise_level is not None:
            noise_level = torch.as_tensor(noise_level, dtype=torch.float, device=input_ids.device)
        check_shape("noise_level", noise_level, (B,))
        check_shape("attention_mask", attention_mask, (B, S))
        if isinstance(logits_at, torch.Tensor):
            check_shape("logits_at", logits_at, (B, L), torch.bool)
        if kv is not None and (self.prompt is not None or any("masked" in net.reads for net in
                                                                 self.noise_nets.values())):
            raise ValueError("a KV cache needs every input position to be the sequence's: not with virtual "
                             "tokens, nor with a core that reads the whole input (noise density)")
        pad = None if attention_mask is None or attention_mask.all() else attention_mask == 0   # 1s: none
        x = self.transformer.wte(input_ids)                                     # (B, L, d)
        cond = self.conditioning(noise_level, input_ids, attention_mask)       # once for every layer
        if self.prompt is not None:                                             # extra input positions
            x, pad, where = self.prompt(x, pad)                                 # (B, n + L, d)
        key_pad = None if pad is None else pad.view(B, 1, 1, -1)
        c = self.config
        sin, cos = rope_table(start + x.shape[1], c.d_model // c.n_heads, c.rope_theta, x.device,
                              torch.promote_types(x.dtype, torch.float32))
        sin, cos = sin[:, :, start:], cos[:, :, start:]                        # positions start..start+L
        recompute = self.training and (x.is_cuda if self.recompute is None else self.recompute)
        kept = []
        for i, block in enumerate(self.transformer.blocks):
            args = (block, recompute, x, sin, cos, key_pad, cond, None if kv is None else kv[i], start)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, mine = checkpoint(run_block, *args, use_reentrant=False)
            else:
                x, mine = run_block(*args)
            if keep_kv:
                kept.append(mine)
        if self.prompt is not None:                                             # back to the L real positions
            x = x.gather(1, where[..., None].expand(-1, -1, x.shape[-1]))       # (B, L, d)
        if logits_at is not None:
            x = x[logits_at] if isinstance(logits_at, torch.Tensor) else x[:, logits_at]
        logits = self.lm_head(self.transformer.ln_f(x))                        # (B, L, V) or (N, V)
        return (logits, kept) if keep_kv else logits

    def base_shapes(self):
        """{checkpoint key: shape} of the backbone, the table the loader checks every file against."""
        with torch.device("meta"):
            ref = LLaDA(self.config)
        return {"model." + k: tuple(v.shape) for k, v in ref.state_dict().items()}

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Load a LLaDA directory (config.json + model.safetensors, or an index + shards) straight onto
        `device`, shard by shard, every key, shape and byte checked first. Default: CUDA in bf16 when
        available, else CPU in fp32."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory not found")
        config = LLaDAConfig.from_json(path / "config.json")
        why = "as asked" if device and dtype else "default: bf16 on CUDA, fp32 on CPU"
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        print(f"loading {path} onto {device} as {str(dtype).replace('torch.', '')} ({why})")
        with torch.device("meta"):
            model = cls(config)
        state = read_weights(path, model.base_shapes(), device, dtype)            # {"model.<key>": tensor}
        model.load_state_dict({k[6:]: v for k, v in state.items()}, strict=True, assign=True)
        model.source = str(path.resolve())     # files.save_pretrained copies the code and tokenizer from here
        return model.eval()


# ---------------------------------------------------------------- the released checkpoint's files
def read_weights(path, expected, device, dtype):
    """{key: tensor} of a checkpoint directory: model.safetensors.index.json and its shards (the released
    ones group tensors by kind, not by layer, so the index is the only map) or one model.safetensors.
    Every key and shape (against `expected`, {key: shape}) and the index's total_size are checked in
    the file headers before any tensor loads; then shard by shard, straight onto device in dtype."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if not index.is_file() and not single.is_file():
        raise FileNotFoundError(f"{path}: neither {index.name} nor {single.name} found")
    body = read_json(index) if index.is_file() else {"weight_map": dict.fromkeys(expected, single.name)}
    if not isinstance(body.get("weight_map"), dict):
        raise ValueError(f"{index}: no 'weight_map' object")
    check_keys(index, body["weight_map"], expected)
    shards, total = {}, 0
    for key, name in body["weight_map"].items():
        shards.setdefault(path / name, []).append(key)
    for file, keys in shards.items():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shard listed in {index.name} not found")
        with open_safetensors(file) as f:
            check_keys(file, f.keys(), keys)
            for key in keys:
                part = f.get_slice(key)
                shape = tuple(part.get_shape())
                if shape != expected[key]:
                    raise ValueError(f"{file}: {key} has shape {shape}, expected {expected[key]}")
                total += math.prod(shape) * BYTES[part.get_dtype()]
    declared = body.get("metadata", {}).get("total_size")
    if declared is not None and declared != total:
        raise ValueError(f"{index}: metadata.total_size={declared} but the shards hold {total} bytes of "
                         "tensors")
    state = {}
    for file, keys in shards.items():
        with open_safetensors(file) as f:
            state.update({key: f.get_tensor(key).to(device=device, dtype=dtype) for key in keys})
    return state


def read_json(file):
    """A JSON file's content, or a one-line error naming the file."""
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def open_safetensors(file):
    """safe_open on the host, or a one-line error naming the file: truncated, empty or not safetensors."""
    from safetensors import safe_open
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:   # SafetensorError, OSError: the file, not the caller, is at fault
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def check_keys(file, keys, expected):
    """A one-line error naming `file` and its first missing or unexpected key."""
    missing, unexpected = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
    for found, what in ((missing, "key {!r} is missing"), (unexpected, "unexpected key {!r}")):
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ValueError(f"{file}: {what.format(found[0])}{more}")
