"""NaRA: Noise-Aware LoRA (arXiv 2605.29716), and the methods the paper compares it with.

Read with the paper: §3 (masked diffusion, the noise level), §4 (NaRA, Eq. ΔW(λ) = B C(λ) A),
Theorem 4.1 (representation), §5 and Appendix M (baselines, NaRA on DoRA), the ablations.

Glossary (code -> paper)
    W0 = weight          frozen pretrained weight of an adapted linear layer, (d_out, d_in)
    A = lora_A           down-projection, (r, d_in), kaiming-uniform(a=sqrt 5)
    B = lora_B           up-projection, (d_out, r), zero at init, so ΔW = 0 at step 0
    C(λ)                 the r x r core: C(λ) = I + η unvec F_φ(e_λ) (read column-major, see `core`);
                         one per sequence, (batch, r, r)
    F_φ = Hypernetwork   64 -> 256 -> 512 -> r², SiLU, last layer zero: shared by ALL adapted layers
    e_λ                  Gaussian Fourier features [sin(λW), cos(λW)], W ~ N(0, 16²) of shape (1, 32)
    lam (λ)              the noise level of each sequence: t in training, the masked fraction in sampling
    eta (η), s           core scale 0.1 and update scale alpha/r (NaRA: s = 1)

Every method is a drop-in for model.Linear that keeps the base `weight` key where it was, so a
pretrained checkpoint loads unchanged and only adapter keys are new. The noise level travels as an
argument: LLaDA.forward computes `cond = {"lam": λ, name: net(λ) for each shared noise net}` once and
hands it to every adapted layer; a noise-aware layer without λ raises instead of reusing an old one.
The prompt methods (Prompt Tuning, P-Tuning) add input embeddings instead (`VirtualTokens`); the
adapter files (this project's, PEFT's, the authors') are read and written by interop.py.

Departure from the authors' code, on purpose: under bf16 autocast their layer computes the rank-r
product ((x Aᵀ) M) Bᵀ in bf16, where 1 + δ rounds to 1 for |δ| < 2⁻⁸, so a core C(λ) = I + η F near I
(the paper's init, and ‖C − I‖ ~ 0.02 in the small-hypernetwork ablation) mostly never reaches the
output. Here A x runs in the activations' dtype and the rank-r rest, s·((A x) Cᵀ) Bᵀ, in fp32, with
one rounding where it joins W0 x (`LoRALinear.update`): in bf16 the layer applies ~100 % of
C − I = 1e-3·D instead of 0 % (tests/test_gpu_path.py). Cost: an fp32 (tokens x r)(r x d_out)
product and an fp32 (tokens x d_out) sum per adapted layer, 2·r·d_out FLOPs per token (0.8 % of the
layer's own at r = 32, d = 4096); the measured ratio is in BENCHMARKS.md (CPU) and in the report of
benchmarks/gpu_check.py (GPU). In fp32 nothing changes: the same operations in the same order.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear, recompute

METHODS = ("lora", "nara", "nara-c", "multi-lora", "hira", "dora", "nara-dora", "prompt-tuning", "p-tuning")
NOISE_AWARE = ("nara", "multi-lora", "nara-dora")
PROMPT = ("prompt-tuning", "p-tuning")


# ---------------------------------------------------------------- the shared noise networks
def core(raw, r, eta):
    """C = I_r + η · unvec(raw): the r² numbers are read column-major (the mathematical vec
    convention), so C = Mᵀ for M = raw.view(r, r). The authors' layer computes ((x Aᵀ) M) Bᵀ, i.e.
    ΔW = B Mᵀ A: with this reading ΔW(λ) = B C(λ) A holds as the paper writes it, and the authors'
    tensors give the authors' numbers. (..., r²) -> (..., r, r)."""
    M = raw.float().unflatten(-1, (r, r))                                   # row-major view: the authors' M
    return torch.eye(r, device=raw.device) + eta * M.transpose(-1, -2)      # fp32 whatever F's dtype


def mask_density(masked, valid=None, radius=5):
    """Noise density (the paper's conditioning-signal ablation; the authors' input_mode "nd"): for
    each masked position, the fraction of masked tokens among its ±radius neighbours (itself
    excluded, padding and positions outside the sequence not counted), averaged over the masked
    positions of the sequence; 0 for a sequence without masks. masked, valid (B, L) bool -> (B,)."""
    valid = torch.ones_like(masked) if valid is None else valid.bool()
    m, v = (masked & valid).float()[:, None], valid.float()[:, None]        # (B, 1, L)
    kernel = torch.ones(1, 1, 2 * radius + 1, device=masked.device)
    kernel[..., radius] = 0.0                                             # the position itself is not a neighbour
    near = F.conv1d(m, kernel, padding=radius) / F.conv1d(v, kernel, padding=radius).clamp(min=1.0)
    return (near * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1.0)


class Hypernetwork(nn.Module):
    """C(λ) = I_r + η · unvec F_φ(e_λ), computed once per forward pass for the whole batch: (B,) -> (B, r, r).
    condition: "lambda" (the paper), "density" (the noise density of the input) or "both" (their two
    embeddings concatenated); embedding: fixed Gaussian "fourier" [sin(vW), cos(vW)], W ~ N(0, 16²),
    learnable "mlp" Linear(1 -> width) + SiLU, or the "raw" value; init: "zero_last" (the paper: C = I
    at step 0), "kaiming" (every layer kaiming-uniform, biases zero) or "zero_all"."""
    INPUTS = {"lambda": ("lam",), "density": ("density",), "both": ("lam", "density")}

    def __init__(self, r, eta=0.1, embedding="fourier", width=64, hidden=(256, 512), init="zero_last",
                 condition="lambda", radius=5):
        super().__init__()
        if embedding not in ("fourier", "mlp", "raw") or condition not in self.INPUTS or init not in ("zero_last", "kaiming", "zero_all"):
            raise ValueError(f"embedding={embedding!r}, condition={condition!r}, init={init!r}: choose embedding "
                             "fourier|mlp|raw, condition lambda|density|both, init zero_last|kaiming|zero_all")
        if embedding == "fourier" and width % 2:
            raise ValueError(f"width={width}: a Fourier embedding needs an even width (sin and cos halves)")
        self.r, self.eta, self.embedding, self.radius = r, eta, embedding, radius
        self.inputs, self.bypass = self.INPUTS[condition], False            # bypass: see identity_cores
        for name in self.inputs:                    # one embedding per input: W / embed for λ, *_density
            suffix = "" if name == "lam" else "_density"
            if embedding == "fourier":              # fixed, saved, not trained; no 2π factor (authors' code)
                self.register_buffer("W" + suffix, torch.randn(1, width // 2) * 16.0)
            elif embedding == "mlp":
                setattr(self, "embed" + suffix, nn.Sequential(nn.Linear(1, width), nn.SiLU()))
        sizes = [(1 if embedding == "raw" else width) * len(self.inputs), *hidden, r * r]
        layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.SiLU())][:-1]
        self.net = nn.Sequential(*layers)                                   # Linear, SiLU, ..., Linear
        for layer in self.net[::2]:                 # hidden weights keep PyTorch's kaiming-uniform(a=√5)
            nn.init.zeros_(layer.bias)
            if init == "zero_all":
                nn.init.zeros_(layer.weight)
        if init == "zero_last":
            nn.init.zeros_(self.net[-1].weight)     # F_φ = 0 at init: C = I and NaRA starts exactly as LoRA
        elif init == "kaiming":
            nn.init.kaiming_uniform_(self.net[-1].weight, a=math.sqrt(5))

    def encode(self, v, name="lam"):
        """e_v for one conditioning value per sequence, in fp32: (B,) -> (B, width)."""
        v = v.float()[:, None]                                              # (B, 1)
        suffix = "" if name == "lam" else "_density"
        if self.embedding == "fourier":
            proj = v @ getattr(self, "W" + suffix).float()                  # (B, width/2)
            return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)    # (B, width)
        return getattr(self, "embed" + suffix)(v) if self.embedding == "mlp" else v

    def forward(self, lam, masked=None, valid=None, density=None):
        if "density" in self.inputs and density is None and masked is not None:
            with torch.autocast(masked.device.type, enabled=False):        # fp32, as in validation and eval
                density = mask_density(masked, valid, self.radius)          # (B,) from the input itself
        values = {"lam": lam, "density": density}
        for name in self.inputs:
            if values[name] is None:
                raise ValueError("this model has noise-aware adapters: call it with noise_level=λ (one per sequence)"
                                 if name == "lam" else "density-conditioned NaRA needs the input ids (or density=)")
        B = values[self.inputs[0]].shape[0]
        device = values[self.inputs[0]].device
        if self.bypass:                                                     # stage 1 of two-stage training
            return torch.eye(self.r, device=device).expand(B, self.r, self.r)
        with torch.autocast(device.type, enabled=False):
            e = torch.cat([self.encode(values[n], n) for n in self.inputs], dim=-1)                 # (B, inputs x width)
            F_phi = self.net(e.to(self.net[0].weight.dtype))                                       # (B, r²)
            return core(F_phi, self.r, self.eta)                            # (B, r, r)


class StaticCore(nn.Module):
    """NaRA-C: C = I + η·unvec(P) with one learnable r x r P (zero at init), shared by all layers,
    blind to λ; P is read column-major like F_φ's output, so the authors' `constant_c` loads as is."""
    def __init__(self, r, eta=0.1):
        super().__init__()
        self.eta, self.bypass = eta, False
        self.P = nn.Parameter(torch.zeros(r, r))

    def forward(self, lam, masked=None, valid=None, density=None):
        r = self.P.shape[0]
        return torch.eye(r, device=self.P.device) if self.bypass else core(self.P.flatten(), r, self.eta)   # (r, r)


@contextlib.contextmanager
def identity_cores(model):
    """Stage 1 of the authors' two-stage training: inside this block every shared core is C = I and
    its network gets no gradient (NaRA trains as LoRA); leaving the block always restores it."""
    nets = list(model.noise_nets.values())
    for net in nets:
        net.bypass = True
    try:
        yield model
    finally:
        for net in nets:
            net.bypass = False


@contextlib.contextmanager
def base_only(model):
    """Inside this block the model computes exactly as its base: every adapted layer skips its update
    and the virtual tokens are taken out (no second copy of the base is loaded); leaving restores them."""
    layers, prompt = [m for m in model.modules() if isinstance(m, LoRALinear)], model.prompt
    for m in layers:
        m.active = False
    model.prompt = None
    try:
        yield model
    finally:
        for m in layers:
            m.active = True
        model.prompt = prompt


# ---------------------------------------------------------------- adapted linear layers
class LoRALinear(nn.Module):
    """LoRA: h = W0 x + s · B A x. The skeleton every other method changes in one place."""
    def __init__(self, base, r, s=1.0, dropout=0.05):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)                   # the base key, unchanged
        d_out, d_in = self.weight.shape
        dev = self.weight.device
        self.r, self.s = r, s
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=dev))      # fp32 adapters
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)                                # on the input of A only
        self.active = True                                                # False inside base_only

    def factors(self, cond):
        """(A, C, B) of this forward: C = None means the identity."""
        return self.lora_A, None, self.lora_B

    def update(self, x, cond):
        """s · B C A x for x (B, L, d_in) -> (B, L, d_out) in fp32 (or x's dtype if wider). The wide
        product A x runs in x's dtype (A cast, r x d: cheap); the rank-r rest runs in fp32 with
        autocast off, so that C − I survives (in bf16, a·(1 + δ) rounds back to a for |δ| < 2⁻⁸)."""
        A, C, B = self.factors(cond)
        a = recompute(cond, self.down, x, A.to(x.dtype))                  # (B, L, r), x's dtype
        with torch.autocast(x.device.type, enabled=False):
            a = a.to(torch.promote_types(a.dtype, torch.float32))
            if C is not None:
                a = a @ C.to(a.dtype).transpose(-1, -2)                   # (B, L, r) @ (B, r, r)
            return (self.s * a) @ B.to(a.dtype).transpose(-1, -2)         # (B, L, d_out); s on the small side

    def down(self, x, A):
        """A dropout(x): (B, L, d_in) -> (B, L, r). Recomputed in backward when training, so q, k and v
        keep their one shared input instead of a dropped copy and a mask each."""
        return self.dropout(x) @ A.transpose(-1, -2)

    def forward(self, x, cond=None):
        h = F.linear(x, self.weight)                                      # W0 x, (B, L, d_out) in x's dtype
        if not self.active:
            return h
        return self.update(x, cond or {}).add_(h).to(h.dtype)             # one rounding, at the output

    def merged_weight(self, cond):
        """The weight this layer applies for a batch of one: W0 + s · B C A."""
        A, C, B = (None if t is None else _first(t) for t in self.factors(cond))
        BC = B if C is None else B @ C
        return self.weight.float() + self.s * (BC @ A)


def _first(t):
    """The first sequence's factor, whether it is shared (r, d) or per sequence (B, r, d)."""
    return t.reshape(-1, *t.shape[-2:])[0]


class NaRALinear(LoRALinear):
    """NaRA: h = W0 x + s · B C(λ) A x, with C(λ) from the shared hypernetwork (cond[key])."""
    def __init__(self, base, r, s=1.0, dropout=0.05, key="nara"):
        super().__init__(base, r, s, dropout)
        self.key = key

    def factors(self, cond):
        return self.lora_A, cond[self.key], self.lora_B                   # C: (B, r, r) or (r, r)


class MultiLoRALinear(LoRALinear):
    """Multi-LoRA: K separate LoRAs, one per noise bin k = clamp(ceil(λK), 1, K); per sequence."""
    def __init__(self, base, r, s=1.0, dropout=0.05, bins=5):
        super().__init__(base, r, s, dropout)
        self.lora_A = nn.Parameter(torch.stack([self.lora_A.data] + [
            nn.init.kaiming_uniform_(torch.empty_like(self.lora_A), a=math.sqrt(5)) for _ in range(bins - 1)]))
        self.lora_B = nn.Parameter(torch.zeros(bins, *self.lora_B.shape, device=self.lora_B.device))

    def factors(self, cond):
        lam = cond["lam"]
        if lam is None:
            raise ValueError("this model has Multi-LoRA adapters: call it with noise_level=λ (one per sequence)")
        K = self.lora_A.shape[0]
        k = torch.ceil(lam * K).long().clamp(1, K) - 1                    # (B,) bin of each sequence
        return self.lora_A[k], None, self.lora_B[k]                       # (B, r, d_in), (B, d_out, r)


class HiRALinear(LoRALinear):
    """HiRA: h = W0 x + (W0 ⊙ s·B A) x, a high-rank Hadamard update (A kaiming, B zero)."""
    def delta(self):
        return self.weight.float() * (self.s * self.lora_B @ self.lora_A)      # (d_out, d_in)

    def update(self, x, cond):
        return F.linear(self.dropout(x), self.delta().to(x.dtype))        # full rank: recomputing would not pay

    def merged_weight(self, cond):
        return self.weight.float() + self.delta()


class DoRALinear(NaRALinear):
    """DoRA: W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row, the norm a constant in backward.
    With key set (NaRA-DoRA, Appendix M) the direction update is B C(λ) A, per sequence."""
    def __init__(self, base, r, s=1.0, dropout=0.05, key=None):
        super().__init__(base, r, s, dropout, key)
        self.register_buffer("w0_sq", self.weight.float().square().sum(1), persistent=False)   # ‖W0‖² per row, fixed
        self.magnitude = nn.Parameter(self.w0_sq.sqrt())                  # m = ‖W0‖_row

    def factors(self, cond):
        return LoRALinear.factors(self, cond) if self.key is None else super().factors(cond)

    def scale(self, cond):
        """m / ‖W0 + s·B C A‖ per row, (B or 1, d_out), without building W0 + s·B C A per sequence:
        ‖w + s u‖² = ‖w‖² + 2s w·u + s²‖u‖², with u_i = (BC)_i A, so w·u = (BC)_i·(W0 Aᵀ)_i and
        ‖u_i‖² = (BC)_i (A Aᵀ) (BC)_iᵀ."""
        A, C, B = (None if t is None else t.float() for t in self.factors(cond))
        W0 = self.weight.float()
        BC = B if C is None else B @ C                                    # (d_out, r) or (B, d_out, r)
        sq = (self.w0_sq + 2 * self.s * (BC * (W0 @ A.T)).sum(-1)
              + self.s ** 2 * ((BC @ (A @ A.T)) * BC).sum(-1))
        return (self.magnitude / sq.sqrt().detach()).reshape(-1, W0.shape[0])

    def forward(self, x, cond=None):
        cond = cond or {}
        h = F.linear(x, self.weight)
        if not self.active:
            return h
        scale = self.scale(cond)[:, None, :]                              # (B or 1, 1, d_out)
        return (scale * (h.to(scale.dtype) + self.update(x, cond))).to(h.dtype)

    def merged_weight(self, cond):
        return self.scale(cond)[0][:, None] * super().merged_weight(cond)


# ---------------------------------------------------------------- virtual tokens
class VirtualTokens(nn.Module):
    """Prompt Tuning (Lester et al., 2021) and P-Tuning (Liu et al., 2021), the paper's prompt-based
    baselines: n trainable input embeddings join every sequence. Prompt Tuning trains them directly,
    initialised from the embeddings of a text's tokens (`init_ids`, repeated to n) or of n random
    vocabulary rows; P-Tuning produces them with PEFT's MLP prompt encoder, Linear(d, h) -> ReLU ->
    Linear(h, h) -> ReLU -> Linear(h, d) applied to a free N(0, 1) table, h = encoder_hidden.

    They are never masked, scored or committed: LLaDA.forward inserts them and takes them out again
    before the LM head. Departure from PEFT (which puts them before everything): they go right before
    each row's first real token, after its left padding, so a left-padded batch gives each row what
    it gives alone. They are attended to from the first step, so unlike the low-rank methods the
    model does NOT start equal to the base; the real tokens' positions move by n, which RoPE's
    relative form leaves without effect on the real tokens among themselves."""
    def __init__(self, wte, n, vocab_size, init_ids=None, encoder_hidden=None):
        super().__init__()
        d, dev = wte.weight.shape[1], wte.weight.device
        if encoder_hidden is None:                                          # Prompt Tuning
            ids = (torch.tensor(init_ids).repeat(math.ceil(n / len(init_ids)))[:n] if init_ids
                   else torch.randint(0, vocab_size, (n,)))
            self.embedding = nn.Parameter(wte.weight.detach()[ids.to(dev)].float().clone())   # (n, d)
            self.encoder = None
        else:                                                               # P-Tuning
            self.embedding = nn.Parameter(torch.randn(n, d, device=dev))
            self.encoder = nn.Sequential(nn.Linear(d, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, encoder_hidden),
                                         nn.ReLU(), nn.Linear(encoder_hidden, d)).to(dev)

    def tokens(self):
        return self.embedding if self.encoder is None else self.encoder(self.embedding)   # (n, d)

    def insert(self, x, pad):
        """x (B, L, d), pad (B, L) bool or None -> (x' (B, n + L, d), pad' or None, real (B, L)):
        the n tokens sit after each row's leading padding; real[b, j] is where token j went."""
        B, L, d = x.shape
        n = self.embedding.shape[0]
        lead = torch.zeros(B, 1, dtype=torch.long, device=x.device) if pad is None else pad.long().cumprod(1).sum(1, keepdim=True)
        k = torch.arange(n + L, device=x.device)                                    # positions of x'
        order = torch.where(k < lead, n + k, torch.where(k < lead + n, k - lead, k))   # (B, n + L) into [tokens, x]
        both = torch.cat([self.tokens().to(x.dtype).expand(B, n, d), x], dim=1)
        x = both.gather(1, order[..., None].expand(-1, -1, d))
        if pad is not None:
            pad = torch.cat([torch.zeros_like(pad[:, :1]).expand(B, n), pad], dim=1).gather(1, order)
        j = torch.arange(L, device=x.device)
        return x, pad, j + n * (j >= lead)


# ---------------------------------------------------------------- putting adapters on a model
def add_adapters(model, method, r=32, targets=("q_proj", "k_proj", "v_proj", "attn_out"), alpha=None,
                 dropout=0.05, eta=0.1, embedding="fourier", groups=None, bins=5, verbose=True, *,
                 width=64, hidden=(256, 512), init="zero_last", condition="lambda", radius=5,
                 virtual_tokens=20, prompt_init=None, encoder_hidden=None, rslora=False, rank_pattern=None,
                 alpha_pattern=None):
    """Freeze `model` and add the adapters of `method`.

    Low-rank methods replace each linear layer inside transformer.blocks whose name ends with a
    target; s = alpha / r (alpha=None: s = 1, as NaRA's authors). The LM head `transformer.ff_out`
    is never adapted (the block MLP's ff_out is). NaRA's switches (the authors' ablations): groups
    {"qk": ("q_proj", "k_proj"), ...} gives one hypernetwork per group instead of one global;
    embedding, width (of e_λ), hidden (the hypernetwork's widths), init, condition and radius: see
    Hypernetwork. Prompt methods add `virtual_tokens` input embeddings instead (see VirtualTokens;
    prompt_init: token ids of an initial text, else random vocabulary rows; encoder_hidden:
    P-Tuning's MLP width, default d_model). Per-layer ranks and scales as PEFT's LoRA has them (for
    lora, dora and hira): rank_pattern / alpha_pattern {module name: r / alpha}, rslora: s = alpha/√r."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if getattr(model, "adapter_config", None):
        raise ValueError(f"this model already has {model.adapter_config['method']} adapters")
    for name, value in (("r", r), ("bins", bins), ("virtual_tokens", virtual_tokens), ("radius", radius), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
    hidden = tuple(hidden)
    config = dict(method=method, r=r, targets=list(targets), alpha=alpha, dropout=dropout, eta=eta,
                  embedding=embedding, groups=groups, bins=bins, width=width, hidden=list(hidden), init=init,
                  condition=condition, radius=radius, virtual_tokens=virtual_tokens, prompt_init=prompt_init,
                  encoder_hidden=encoder_hidden, rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if (rank_pattern or alpha_pattern or rslora) and method not in ("lora", "dora", "hira"):
        raise ValueError(f"per-layer ranks and scales (rank_pattern, alpha_pattern, rslora) are for lora, dora and hira, "
                         f"not {method}: its core C is r x r in every layer")
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    if method in PROMPT:
        model.prompt = VirtualTokens(model.transformer.wte, virtual_tokens, model.config.vocab_size, prompt_init,
                                     (encoder_hidden or model.config.d_model) if method == "p-tuning" else None)
        what = f"{virtual_tokens} virtual tokens"
    else:
        def rank_scale(name):                           # PEFT's rules: s = alpha / r, or alpha / √r (rsLoRA)
            r_i = (rank_pattern or {}).get(name, r)
            a_i = (alpha_pattern or {}).get(name, alpha)
            return r_i, 1.0 if a_i is None else a_i / (math.sqrt(r_i) if rslora else r_i)
        what = _add_low_rank(model, method, r, targets, rank_scale, dropout, eta, groups, bins,
                             dict(embedding=embedding, width=width, hidden=hidden, init=init, condition=condition,
                                  radius=radius), device)
    model.adapter_config = config
    model.train(model.training)                           # new layers follow the model's mode (eval: no dropout)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"{method}: {what}; trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f} %)")
    return model


def _add_low_rank(model, method, r, targets, rank_scale, dropout, eta, groups, bins, hyper, device):
    linears = {n: m for n, m in model.named_modules() if n.startswith("transformer.blocks.") and isinstance(m, Linear)}
    hits = lambda n, t: n == t or n.endswith("." + t)  # noqa: E731   (a layer name, or a full module name)
    for t in targets:
        if not any(hits(n, t) for n in linears):
            names = sorted({n.rsplit(".", 1)[1] for n in linears})
            raise ValueError(f"target {t!r} matches no linear layer; available: {', '.join(names)}")
    group_of = {t: "nara" for t in targets}
    if groups and method in ("nara", "nara-dora"):
        group_of = {t: f"nara_{g}" for g, members in groups.items() for t in members}
        if set(group_of) != set(targets):
            raise ValueError(f"groups {groups} must cover the targets {list(targets)} exactly once")
    if method in ("nara", "nara-dora"):
        for key in sorted(set(group_of.values())):
            model.noise_nets[key] = Hypernetwork(r, eta, **hyper).to(device)
    elif method == "nara-c":
        model.noise_nets["nara"] = StaticCore(r, eta).to(device)
    matched = 0
    for name, base in linears.items():
        t = next((t for t in targets if hits(name, t)), None)
        if t is None:
            continue
        r, s = rank_scale(name)
        layer = {"lora": lambda: LoRALinear(base, r, s, dropout),
                 "nara": lambda: NaRALinear(base, r, s, dropout, group_of[t]),
                 "nara-c": lambda: NaRALinear(base, r, s, dropout, "nara"),
                 "multi-lora": lambda: MultiLoRALinear(base, r, s, dropout, bins),
                 "hira": lambda: HiRALinear(base, r, s, dropout),
                 "dora": lambda: DoRALinear(base, r, s, dropout),
                 "nara-dora": lambda: DoRALinear(base, r, s, dropout, group_of[t])}[method]()
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)
        matched += 1
    return f"adapted {matched} layers ({', '.join(targets)} in {len(model.transformer.blocks)} blocks)"


def freeze(model, parts):
    """Freeze parts of the adapters (the authors' train_a / train_b / train_mapper switches):
    any of "A", "B", "hypernetwork"."""
    names = {"A": ".lora_A", "B": ".lora_B"}
    for part in parts:
        if part not in ("A", "B", "hypernetwork"):
            raise ValueError(f"freeze {part!r}: choose among A, B, hypernetwork")
        for n, p in model.named_parameters():
            if (part == "hypernetwork" and n.startswith("noise_nets.")) or (part in names and n.endswith(names[part])):
                p.requires_grad_(False)


def adapter_state(model):
    """Only the adapter tensors (the base keys are left out): what training changes."""
    base = {k[len("model."):] for k in model.base_shapes()}
    return {k: v for k, v in model.state_dict().items() if k not in base}


def cond_at(model, lam, density=None):
    """What the adapted layers receive for a batch of one sequence at noise level `lam` (and, for a
    density-conditioned NaRA, noise density `density`)."""
    dev = next(model.parameters()).device
    return model.condition(torch.tensor([float(lam)], device=dev),
                           density=None if density is None else torch.tensor([float(density)], device=dev))


@torch.no_grad()
def merge(model, lam, density=None):
    """Fold every adapter into its base weight at one fixed λ: W0 <- W0 + ΔW(λ); the model becomes a
    plain LLaDA (only possible at a fixed λ, since NaRA's update depends on it). W0 + ΔW is computed
    in fp32 and stored in W0's dtype: with bf16 weights that rounding is the merged model's only
    difference from the adapted one, and a line says so."""
    if model.prompt is not None:
        raise ValueError(f"{model.adapter_config['method']} adds input tokens, not a weight update: nothing to merge")
    cond = cond_at(model, lam, density)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoRALinear):
            with torch.device("meta"):                                    # no throw-away init of a d x d weight
                plain = Linear(layer.weight.shape[1], layer.weight.shape[0])
            plain.weight = nn.Parameter(layer.merged_weight(cond).to(layer.weight.dtype), requires_grad=False)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, plain)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        print(f"merge: W0 + ΔW(λ={lam}) computed in float32 and stored in {str(dtype).replace('torch.', '')}, "
              "the base's dtype (the merged model differs from the adapted one by that rounding)")
    model.noise_nets.clear()
    model.adapter_config = None
    return model


@torch.no_grad()
def delta_weights(model, lam, density=None):
    """{layer name: ΔW(λ) = merged weight − W0} for every adapted layer, in fp32."""
    cond = cond_at(model, lam, density)
    return {n: m.merged_weight(cond) - m.weight.float() for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---------------------------------------------------------------- adapter files live in interop.py
def __getattr__(name):
    """nara.save_adapter, load_adapter, warm_start, export_peft and load_peft: see interop.py."""
    if name in ("save_adapter", "load_adapter", "warm_start", "export_peft", "load_peft"):
        import interop
        return getattr(interop, name)
    raise AttributeError(f"module 'nara' has no attribute {name!r}")


# ---------------------------------------------------------------- Theorem 4.1, constructively
def decompose(updates, r):
    """Theorem 4.1 (representation). Let ΔW_1, ..., ΔW_N be d_out x d_in matrices. If the sum of
    their column spaces and the sum of their row spaces each have dimension at most r, there exist
    static B (d_out x r), A (r x d_in) and cores C_1..C_N (r x r) with B C_i A = ΔW_i for every i.

    Construction: B = P, an orthonormal basis of the joint column space (left singular vectors of
    [ΔW_1 ... ΔW_N]); A = Qᵀ, Q an orthonormal basis of the joint row space (right singular vectors
    of [ΔW_1; ...; ΔW_N]); C_i = Pᵀ ΔW_i Q. Then B C_i A = P Pᵀ ΔW_i Q Qᵀ = ΔW_i, because P Pᵀ and
    Q Qᵀ project onto spaces that already contain every column and row of ΔW_i.
    Returns (B, A, [C_1..C_N]) in float64; raises ValueError when a joint rank exceeds r."""
    W = [torch.as_tensor(u, dtype=torch.float64) for u in updates]
    if not W or any(w.shape != W[0].shape or w.dim() != 2 for w in W):
        raise ValueError("decompose needs a non-empty list of matrices of one shape")
    bases = []
    for stacked, side in ((torch.cat(W, dim=1), "column"), (torch.cat(W, dim=0).T, "row")):
        U, S, _ = torch.linalg.svd(stacked, full_matrices=False)          # thin: (d, min(d, N·d')), spans `side` first
        tol = S.max() * max(stacked.shape) * torch.finfo(torch.float64).eps if S.numel() else 0.0
        rank = int((S > tol).sum())
        if rank > r:
            raise ValueError(f"the joint {side} space has dimension {rank} > r = {r}: "
                             f"no static B, A of rank {r} can represent these updates")
        # the first `rank` columns span the joint space; the next ones (up to r) are orthonormal but
        # arbitrary, and where r exceeds U's width the last columns are zero. P Pᵀ still projects onto
        # a space that holds the joint one, so B C_i A = ΔW_i either way.
        basis = torch.zeros(stacked.shape[0], r, dtype=torch.float64, device=stacked.device)
        basis[:, :min(r, U.shape[1])] = U[:, :r]
        bases.append(basis)
    P, Q = bases
    return P, Q.T, [P.T @ w @ Q for w in W]
