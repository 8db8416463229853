"""The LLaDA backbone: a Llama-style pre-norm transformer without the causal mask.

Read with: LLaDA (Nie et al., arXiv 2502.09992) §2 and Appendix B; NaRA (arXiv 2605.29716) §3, which
adapts the attention projections of this model. Everything below reproduces the released
LLaDA-8B checkpoint (`GSAI-ML/LLaDA-8B-Base`, `-Instruct`): same module names, same key names, same
numerics, so `LLaDA.from_pretrained(dir)` loads the downloaded files unchanged.

Glossary (code -> paper / checkpoint)
    wte, ff_out (top level)   token embedding and the *untied* LM head (126464 x 4096)
    attn_norm, ff_norm, ln_f  RMSNorm before attention, before the MLP, and at the end
    q_proj k_proj v_proj      attention projections (the layers NaRA adapts), attn_out = W_o
    ff_proj, up_proj, ff_out  SwiGLU MLP: ff_out(silu(ff_proj(h)) * up_proj(h)); ff_proj is the gate
    noise_level (lam)         the diffusion noise level of each sequence, (B,); ignored by the bare
                              model, handed to adapters (nara.py) through `cond`
    mask_token_id             the [MASK] id of masked diffusion (126336), read from config.json

Departures from the official `modeling_llada.py`, all on purpose:
    - one block type (`llama`), RoPE, RMSNorm, SiLU, no biases: every other switch of the official
      config class is refused with an error instead of being half-supported;
    - no KV cache, no ALiBi, no flash-attn path, no dropout (LLaDA-8B has 0 everywhere);
    - `attention_mask` masks keys only: an additive (B,1,1,L) bias of finfo(dtype).min at padding.
      (The official code also merges in a causal bias when a mask has zeros; with no mask or an
      all-ones mask the two are bit-identical.)
    - each linear layer takes an extra `cond` argument so adapters receive the noise level
      explicitly (no setter, no stale state); the bare layers ignore it;
    - `forward(..., positions=)` computes the LM head only where the caller reads it (the same numbers
      at those positions); training on CUDA recomputes norms and SiLU in backward (`recompute`: the
      same gradients, half the activations); Prompt/P-Tuning tokens are inserted here (nara.py).
"""
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import atomic_write, checkpoint_files, open_safetensors, read_json, write_shards


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

    # config.json switches this architecture implements, with the only value it implements
    SUPPORTED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
                 "rope": True, "alibi": False, "weight_tying": False, "include_bias": False,
                 "include_qkv_bias": False, "attention_layer_norm": False, "scale_logits": False,
                 "input_emb_norm": False, "block_group_size": 1, "rope_full_precision": True,
                 "layer_norm_with_affine": True, "bias_for_layer_norm": (None, False),
                 "multi_query_attention": (None, False), "embedding_dropout": 0.0,
                 "attention_dropout": 0.0, "residual_dropout": 0.0, "flash_attention": (False, None)}

    @classmethod
    def tiny(cls, **overrides):
        """A 2-layer model for tests: same architecture, small numbers, ids inside a 128 vocab."""
        kw = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128,
                  vocab_size=128, embedding_size=128, max_sequence_length=256,
                  mask_token_id=126, eos_token_id=125, pad_token_id=125)
        return cls(**{**kw, **overrides})

    def __post_init__(self):
        for name in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"config: embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.embedding_size:
                raise ValueError(f"config: {name}={getattr(self, name)} is outside the embedding table")

    @classmethod
    def from_json(cls, path):
        """Read a real LLaDA `config.json`; refuse any switch this architecture does not implement."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        raw = dict(read_json(path))
        for key, ok in cls.SUPPORTED.items():
            if key in raw and raw[key] not in (ok if isinstance(ok, tuple) else (ok,)):
                raise ValueError(f"{path}: {key}={raw[key]!r} is not supported by this LLaDA "
                                 f"implementation (only {ok!r})")
        raw["n_kv_heads"] = raw.get("n_kv_heads") or raw.get("n_heads")            # null means MHA
        raw["embedding_size"] = raw.get("embedding_size") or raw.get("vocab_size")
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise ValueError(f"{path}: required key {missing[0]!r} is missing")
        try:
            return cls(**{f.name: raw[f.name] for f in fields(cls)})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json_dict(self, base=None, local_code=False):
        """config.json as the released checkpoints have it. `base` (the source's config.json) keeps its
        other keys; transformers' AutoModel(..., trust_remote_code=True) needs `architectures` and an
        `auto_map` to the official code: the files beside it (local_code) or the hub repository's."""
        out = {k: (v[0] if isinstance(v, tuple) else v) for k, v in self.SUPPORTED.items()}
        code = "" if local_code else f"{HUB_CODE}--"
        auto = {"AutoConfig": f"{code}configuration_llada.LLaDAConfig", "AutoModel": f"{code}modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": f"{code}modeling_llada.LLaDAModelLM"}
        return {**out, **(base or {}), "model_type": "llada", "architectures": ["LLaDAModelLM"], "auto_map": auto,
                **asdict(self)}


HUB_CODE = "GSAI-ML/LLaDA-8B-Instruct"                  # where the official remote code lives
CODE_FILES = ("configuration_llada.py", "modeling_llada.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class Linear(nn.Linear):
    """A bias-free nn.Linear whose forward also accepts `cond` (the noise level and whatever the
    shared noise networks computed from it). The bare layer ignores it; adapters in nara.py use it."""
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
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_table(seq_len, head_dim, theta, device):
    """sin, cos of shape (1, 1, L, hs) in fp32, frequencies repeated over both halves (NeoX layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float)
    freqs = torch.outer(pos, inv_freq)                       # (L, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)               # (L, hs)
    return angles.sin()[None, None], angles.cos()[None, None]


def apply_rope(x, sin, cos):
    """Rotate-half RoPE on x (B, nh, L, hs), computed in fp32 and cast back to x's dtype."""
    h = x.float()
    h1, h2 = h.view(*h.shape[:-1], 2, h.shape[-1] // 2).unbind(-2)
    rotated = torch.cat((-h2, h1), dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    """x + Attn(attn_norm(x)), then + MLP(ff_norm(.)): one LLaDA 'llama' block."""
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        hs = cfg.d_model // cfg.n_heads
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = Linear(cfg.d_model, cfg.d_model)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_heads * hs)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_heads * hs)
        self.attn_out = Linear(cfg.d_model, cfg.d_model)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = Linear(cfg.d_model, cfg.mlp_hidden_size)
        self.up_proj = Linear(cfg.d_model, cfg.mlp_hidden_size)
        self.ff_out = Linear(cfg.mlp_hidden_size, cfg.d_model)

    def forward(self, x, sin, cos, key_pad, cond):
        B, L, C = x.shape
        h = recompute(cond, self.attn_norm, x)                       # keeps x, not its fp32 copy
        q = self.q_proj(h, cond).view(B, L, self.n_heads, -1).transpose(1, 2)      # (B, nh, L, hs)
        k = self.k_proj(h, cond).view(B, L, self.n_kv_heads, -1).transpose(1, 2)   # (B, nkv, L, hs)
        v = self.v_proj(h, cond).view(B, L, self.n_kv_heads, -1).transpose(1, 2)   # (B, nkv, L, hs)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        if self.n_kv_heads != self.n_heads:                                        # grouped-query attention
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        bias = None
        if key_pad is not None:                     # (B, 1, 1, L): finfo.min on padded keys, 0 elsewhere
            bias = torch.zeros(key_pad.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(key_pad, torch.finfo(q.dtype).min)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).contiguous().view(B, L, C), cond)
        h = recompute(cond, self.ff_norm, x)
        return x + self.ff_out(recompute(cond, swiglu, self.ff_proj(h, cond), self.up_proj(h, cond)), cond)


def swiglu(gate, up):
    return F.silu(gate) * up


def recompute(cond, fn, *args):
    """fn(*args), keeping for backward only its inputs when cond["recompute"] (training): norms, SiLU
    and the adapters' dropout are recomputed in backward (same values, same RNG: gradients are bit
    for bit the same) instead of keeping their fp32 or per-layer copies: half the activations, see
    BENCHMARKS.md. model.recompute = None (default) does it on CUDA, where memory is what binds; on
    a CPU with small models its Python overhead costs more than the memory is worth. True/False force it."""
    if cond.get("recompute") and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class LLaDA(nn.Module):
    """logits = ff_out(ln_f(blocks(wte(ids)))) with bidirectional attention."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
        ))
        # Shared noise networks (NaRA's hypernetwork F_phi); nara.add_adapters registers them here.
        self.noise_nets = nn.ModuleDict()
        self.prompt = None                       # Prompt Tuning / P-Tuning virtual tokens (nara.py)
        self.adapter_config = None               # set by nara.add_adapters
        self.gradient_checkpointing = False      # whole blocks recomputed in backward (--grad-checkpointing)
        self.recompute = None                    # cheap ops recomputed in backward: None = on CUDA only (`recompute`)

    def condition(self, noise_level, input_ids=None, attention_mask=None, density=None):
        """What every adapted layer receives, computed once per forward: the noise level itself and
        the output of each shared noise network (NaRA's C(λ), shape (B, r, r)). A network conditioned
        on the noise density reads it from the masked positions of input_ids (or `density` as given)."""
        masked = None if input_ids is None else input_ids == self.config.mask_token_id
        on = self.transformer.wte.weight.is_cuda if self.recompute is None else self.recompute
        return {"lam": noise_level, "recompute": on and self.training,
                **{name: net(noise_level, masked, attention_mask, density) for name, net in self.noise_nets.items()}}

    def forward(self, input_ids, attention_mask=None, noise_level=None, positions=None):
        """input_ids (B, L) long; attention_mask (B, L) of 1 = token, 0 = padding (keys only);
        noise_level (B,) float, one λ per sequence. positions: where to compute the LM head, which
        costs d_model x vocab per position (4096 x 126464 in LLaDA-8B): None = everywhere, logits
        (B, L, V); a bool (B, L) mask = only there, (N, V) in the order of logits[mask]; a slice of
        the L positions = (B, len, V). Logits come out in the parameter dtype."""
        B, L = input_ids.shape
        if noise_level is not None:
            noise_level = torch.as_tensor(noise_level, dtype=torch.float, device=input_ids.device)
            if noise_level.shape != (B,):
                raise ValueError(f"noise_level must have shape ({B},), one per sequence, got {tuple(noise_level.shape)}")
        pad = None
        if attention_mask is not None:
            if attention_mask.shape != (B, L):
                raise ValueError(f"attention_mask must have shape {(B, L)}, got {tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):          # an all-ones mask is exactly no mask
                pad = attention_mask == 0
        if isinstance(positions, torch.Tensor) and (positions.dtype != torch.bool or positions.shape != (B, L)):
            raise ValueError(f"positions must be a bool mask of shape {(B, L)}, got {positions.dtype} {tuple(positions.shape)}")
        x = self.transformer.wte(input_ids)                                     # (B, L, d)
        cond = self.condition(noise_level, input_ids, attention_mask)
        if self.prompt is not None:                     # Prompt/P-Tuning: n virtual tokens join the input
            x, pad, real = self.prompt.insert(x, pad)                           # (B, n + L, d)
        key_pad = None if pad is None else pad.view(B, 1, 1, -1)
        sin, cos = rope_table(x.shape[1], self.config.d_model // self.config.n_heads, self.config.rope_theta, x.device)
        for block in self.transformer.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, sin, cos, key_pad, cond, use_reentrant=False)
            else:
                x = block(x, sin, cos, key_pad, cond)
        if self.prompt is not None:                     # back to the L real positions, in their order
            x = x.gather(1, real[..., None].expand(-1, -1, x.shape[-1]))           # (B, L, d)
        if positions is not None:
            x = x[positions] if isinstance(positions, torch.Tensor) else x[:, positions]
        return self.transformer.ff_out(self.transformer.ln_f(x))                 # (B, L, V) or (N, V)

    def base_shapes(self):
        """{checkpoint key: shape} of the backbone, the table the loader checks every file against."""
        with torch.device("meta"):
            ref = LLaDA(self.config)
        return {"model." + k: tuple(v.shape) for k, v in ref.state_dict().items()}

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Load a LLaDA directory (config.json + model.safetensors, or an index + shards) straight
        onto `device`, shard by shard. Default: CUDA in bf16 when available, else CPU in fp32."""
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
        expected = model.base_shapes()
        files = checkpoint_files(path, expected)          # every key, shape and byte checked first
        state = {}
        for file, keys in files.items():                    # then shard by shard onto the device
            with open_safetensors(file) as f:
                for key in keys:
                    state[key[len("model."):]] = f.get_tensor(key).to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.source = str(path.resolve())               # save_pretrained copies code and tokenizer from here
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30):
        """Write the backbone in the layout `from_pretrained` reads and transformers' AutoModel loads
        (with trust_remote_code=True): config.json and model.safetensors, or shards plus an index when
        larger than max_shard_bytes; from the directory the model was loaded from, the official code
        files and the tokenizer files come along. Each file is written to a temporary name, then
        renamed; adapters are not saved here (nara.merge folds them in first)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        source = Path(self.source) if getattr(self, "source", None) else None
        copied = []
        if source is not None and source.resolve() != path.resolve():
            for name in (*CODE_FILES, *TOKENIZER_FILES):
                if (source / name).is_file():
                    atomic_write(path / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
                    copied.append(name)
        base = read_json(source / "config.json") if source is not None and (source / "config.json").is_file() else None
        sd = self.state_dict()
        write_shards(path, {k: sd[k[len("model."):]].detach() for k in self.base_shapes()}, max_shard_bytes)
        body = self.config.to_json_dict(base, local_code=all(f in copied or (path / f).is_file() for f in CODE_FILES))
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(body, indent=2)))


# ---------------------------------------------------------------- tokenizer and chat template
def load_tokenizer(path):
    """The checkpoint's byte-level BPE `tokenizer.json` (a file or the model directory)."""
    from tokenizers import Tokenizer
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: tokenizer file not found")
    return Tokenizer.from_file(str(file))


BOS, HEADER_START, HEADER_END, EOT = "<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


def chat_text(messages):
    """LLaDA-Instruct's chat template: BOS, then per message
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>,
    then always the assistant header that the answer follows."""
    turns = "".join(f"{HEADER_START}{m['role']}{HEADER_END}\n\n{m['content'].strip()}{EOT}" for m in messages)
    return f"{BOS}{turns}{HEADER_START}assistant{HEADER_END}\n\n"


def chat_ids(tokenizer, messages):
    return tokenizer.encode(chat_text(messages), add_special_tokens=False).ids


def sft_pair(tokenizer, instruction, answer, eos_token_id):
    """(prompt ids, answer ids) for SFT: the prompt is one user turn through the chat template
    (ending in the assistant header), the answer is `answer` + EOS. Padding is the caller's job."""
    prompt = chat_ids(tokenizer, [{"role": "user", "content": instruction}])
    return prompt, tokenizer.encode(answer, add_special_tokens=False).ids + [eos_token_id]
