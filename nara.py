"""NaRA: Noise-Aware LoRA (arXiv 2605.29716) §3, §4 and Theorem 4.1, with LoRA and Multi-LoRA beside it,
in the paper's order: ΔW(λ) = s·B C(λ) A, then C(λ) and F_φ, Multi-LoRA, putting them on a model
(`add_adapters`, the one factory, and METHODS, the table every method registers in), Theorem 4.1.
The paper's other baselines and its ablation switches register in the same table from extras/.

Glossary (code -> paper)
    W0 = weight      frozen pretrained weight of an adapted linear layer, (d_out, d_in)
    A, B             lora_A (r, d_in), kaiming-uniform(a=√5); lora_B (d_out, r), zero: ΔW = 0 at step 0
    C(λ), F_φ, e_λ   the r x r core I + η unvec F_φ(e_λ), one per sequence; F_φ = `Hypernetwork`, ONE
                     shared by every adapted layer, reached through cond = {"lam": λ, "nara": C(λ)}
    lam (λ), eta, s  noise level of each sequence (t in training); core scale η = 0.1; s = alpha/r, or 1
                     when alpha is None (the authors' default)
    n, L             sequences and tokens, in shape comments
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear, recomputable

TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out")


# ---------------------------------------------------------------- ΔW(λ) = s·B C(λ) A, layer by layer
class LoRALinear(nn.Module):
    """LoRA: h = W0 x + s · B A x. The skeleton every other method changes in one place (`factors`)."""
    def __init__(self, base, r, s=1.0, dropout=0.05):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)                   # the base key, unchanged
        d_out, d_in = self.weight.shape
        self.r, self.s = r, s
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=self.weight.device))    # fp32 adapters
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)                                # on the input of A only

    def factors(self, cond):
        """(A, C, B) of this forward; C = None means the identity."""
        return self.lora_A, None, self.lora_B

    def forward(self, x, cond=None):
        """h = W0 x + s · B C A x, rounded once to x's dtype."""
        return F.linear(x, self.weight) + self.update(x, cond or {})     # (n, L, d_out)

    def update(self, x, cond):
        """s · B C A x: (n, L, d_in) -> (n, L, d_out) in x's dtype; C (n, r, r) per sequence, or shared."""
        A, C, B = self.factors(cond)
        a = recomputable(self.down, x, A.to(x.dtype))                     # A dropout(x): (n, L, r)
        if a.dtype == torch.bfloat16 or a.dtype == torch.float16:
            return up_in_half(a, C, B, self.s)
        with torch.autocast(x.device.type, enabled=False):
            if C is not None:
                a = a @ C.to(a.dtype).transpose(-1, -2)                   # C a: (n, L, r) @ (n, r, r)
            return (self.s * a) @ B.to(a.dtype).transpose(-1, -2)         # s B (C a); s on the r side

    def down(self, x, A):
        """A dropout(x); recomputed in backward where the model recomputes: q, k, v keep one input."""
        return self.dropout(x) @ A.transpose(-1, -2)

    def merged_weight(self, cond):
        """W0 + s · B C A in fp32 for the first sequence of `cond`: the layer merged at that noise level
        (NaRA's update depends on λ, so it merges only at a fixed one)."""
        A, C, B = (None if t is None else t.reshape(-1, *t.shape[-2:])[0] for t in self.factors(cond))
        return self.weight.float() + self.s * ((B if C is None else B @ C) @ A)


def up_in_half(a, C, B, s):
    """s · B C a with bf16 (or fp16) activations a (n, L, r), without rounding C − I away.

    Under autocast the authors' ((x Aᵀ) M) Bᵀ casts the core to bf16, whose spacing around 1 is 2⁻⁷
    above and 2⁻⁸ below: a diagonal entry 1 + δ with δ between -2⁻⁹ and 2⁻⁸ becomes 1, and NaRA's
    learned deviation of C from I is lost where it is small. Here, on purpose, the small term a (C − I)ᵀ
    is formed in fp32 and ONE half-precision matmul of rank 2r, [a, a (C − I)ᵀ] [sB, sB]ᵀ, adds it to
    B a in the matmul's fp32 accumulator. Its cost against LoRA: BENCHMARKS.md (benchmarks/run.py)."""
    with torch.autocast(a.device.type, enabled=False):
        sB = B.float() if s == 1 else s * B.float()                       # (d_out, r) or (n, d_out, r)
        if C is not None:
            D = C.float().clone()                                         # C − I, without building I
            D.diagonal(dim1=-2, dim2=-1).sub_(1)
            small = a.float() @ D.transpose(-1, -2)                       # a (C − I)ᵀ in fp32: (n, L, r)
            a, sB = torch.cat([a, small.to(a.dtype)], -1), torch.cat([sB, sB], -1)   # rank 2r
        return a @ sB.to(a.dtype).transpose(-1, -2)     # (n, L, d_out), a's dtype; B's gradient sums in fp32


class NaRALinear(LoRALinear):
    """NaRA: h = W0 x + s · B C(λ) A x, C(λ) from the shared hypernetwork: cond[key], key "nara" (or the
    hypernetwork of this layer's group, add_adapters' `groups`)."""
    def __init__(self, base, r, s=1.0, dropout=0.05, key="nara"):
        super().__init__(base, r, s, dropout)
        self.key = key

    def factors(self, cond):
        return self.lora_A, cond[self.key], self.lora_B                   # C: (n, r, r) or (r, r)


# ---------------------------------------------------------------- C(λ) and the hypernetwork F_φ
def core(raw, r, eta):
    """C = I_r + η · unvec(raw), (..., r²) -> (..., r, r) in fp32. The r² numbers are read column-major
    (C = Mᵀ for M = raw.view(r, r)): the authors' layer computes ((x Aᵀ) M) Bᵀ = (B Mᵀ A) x, so with
    this reading ΔW(λ) = B C(λ) A holds as the paper writes it, with the authors' numbers."""
    M = raw.float().unflatten(-1, (r, r))                                   # row-major view: the authors' M
    return torch.eye(r, device=raw.device) + eta * M.transpose(-1, -2)


def need_lambda(lam, who="noise-aware adapters"):
    if lam is None:
        raise ValueError(f"this model has {who}: call it with noise_level=λ (one per sequence)")


class Hypernetwork(nn.Module):
    """C(λ) = I_r + η · unvec F_φ(e_λ), once per forward for the batch: (n,) -> (n, r, r).
    e_λ = [sin(λW), cos(λW)], W ~ N(0, 16²) fixed (no 2π); F_φ = Linear(64, 256) SiLU Linear(256, 512)
    SiLU Linear(512, r²), zero biases, the last layer zero: C = I at step 0, so NaRA starts as LoRA.
    `reads`: the signals it takes from LLaDA.conditioning (keyword arguments of forward)."""
    reads = ("lam",)

    def __init__(self, r, eta=0.1, width=64, hidden=(256, 512)):
        super().__init__()
        self.r, self.eta = r, eta
        size = self.add_embedding(width)                                  # e_λ's fixed matrix W
        self.net = mlp([size, *hidden, r * r])                            # F_φ

    def add_embedding(self, width):
        """e_λ's matrix W ~ N(0, 16²), (1, width/2): a saved buffer, not trained. Returns e_λ's width."""
        self.register_buffer("W", torch.randn(1, width // 2) * 16.0)
        return width

    def encode(self, lam):
        """e_λ = [sin(λW), cos(λW)] in fp32: (n,) -> (n, width)."""
        proj = lam.float()[:, None] @ self.W.float()                      # (n, width/2)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, lam):
        need_lambda(lam)
        with torch.autocast(self.W.device.type, enabled=False):              # fp32 throughout
            return self.core_of(self.encode(lam))                             # (n, r, r)

    def core_of(self, e):
        """C = I + η unvec F_φ(e): (n, width) -> (n, r, r), in fp32."""
        return core(self.net(e.to(self.net[0].weight.dtype)), self.r, self.eta)


def mlp(sizes):
    """F_φ: Linear, SiLU, ..., Linear through `sizes`, zero biases and the last layer zero (F_φ = 0)."""
    layers = []
    for d_in, d_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(d_in, d_out), nn.SiLU()]
    net = nn.Sequential(*layers[:-1])                                     # no SiLU after the last
    for layer in net[::2]:
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(net[-1].weight)
    return net


# ---------------------------------------------------------------- Multi-LoRA
class MultiLoRALinear(LoRALinear):
    """Multi-LoRA: K separate LoRAs, one per noise bin k = clamp(ceil(λK), 1, K); per sequence."""
    def __init__(self, base, r, s=1.0, dropout=0.05, bins=5):
        super().__init__(base, r, s, dropout)
        more = [nn.init.kaiming_uniform_(torch.empty_like(self.lora_A), a=math.sqrt(5))
                for _ in range(bins - 1)]
        self.lora_A = nn.Parameter(torch.stack([self.lora_A.data] + more))             # (K, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(bins, *self.lora_B.shape, device=self.lora_B.device))

    def factors(self, cond):
        need_lambda(cond.get("lam"), "Multi-LoRA adapters")
        K = self.lora_A.shape[0]
        k = torch.ceil(cond["lam"] * K).long().clamp(1, K) - 1            # (n,) bin of each sequence
        return self.lora_A[k], None, self.lora_B[k]                       # (n, r, d_in), (n, d_out, r)


# ---------------------------------------------------------------- putting adapters on a model
@dataclass(frozen=True)
class Method:
    """An entry of METHODS: how add_adapters builds one method.
        layer         replaces each target linear layer: layer(base, r, s, dropout, **options), and
                      key=<the core it reads> when the method has a core
        core          the network every layer shares, in model.noise_nets: core(r, **core_options)
        options, core_options   the method's own options and their defaults, handed to each
        choices       {option: allowed values} where only some are
        groups        one core per group of layers may be asked for (`groups`, an ablation)
        per_layer     PEFT's per-layer rank and scale may be asked for (rank_pattern, alpha_pattern,
                      rslora)
        inputs        instead of `layer`: a module of extra input positions, model.prompt =
                      inputs(model, **options), for the prompt methods"""
    layer: type = None
    core: object = None
    options: dict = field(default_factory=dict)
    core_options: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)
    groups: bool = False
    per_layer: bool = False
    inputs: object = None


# What every low-rank method takes (alpha None: s = 1, as NaRA's authors)
LOW_RANK = dict(r=32, targets=TARGETS, alpha=None, dropout=0.05)
METHODS = {
    "lora": Method(LoRALinear, per_layer=True),                    # per_layer: PEFT's files (interop)
    "nara": Method(NaRALinear, Hypernetwork, core_options=dict(eta=0.1)),
    "multi-lora": Method(MultiLoRALinear, options=dict(bins=5)),
}
# `import extras` adds the paper's other methods (extras/baselines.py) and the hypernetwork's ablation
# switches as options of nara (extras/ablations.py)


def options_of(spec):
    """{option: default} of a method."""
    shared = {} if spec.inputs else dict(LOW_RANK)
    extra = {"groups": None} if spec.groups else {}
    peft = dict(rank_pattern=None, alpha_pattern=None, rslora=False) if spec.per_layer else {}
    return {**shared, **spec.options, **spec.core_options, **extra, **peft}


def check_options(method, options):
    """THE check of adapter options: the method's options with their defaults filled in, or a one-line
    error that starts with the option at fault (`name=value: why`), so that a command can name its flag."""
    if method not in METHODS:
        here = ", ".join(METHODS)
        raise ValueError(f"method={method!r}: choose one of {here}" + ("" if "dora" in METHODS else
                         " (`import extras` registers the project's other methods)"))
    spec = METHODS[method]
    known = options_of(spec)
    for k in options:
        if k not in known:
            raise ValueError(f"{k}={options[k]!r}: not an option of {method} "
                             f"(its options: {', '.join(known)})")
    o = {**known, **options}
    for k in ("r", "bins", "virtual_tokens", "radius", "width", "encoder_hidden"):
        if k in o and o[k] is not None and (not isinstance(o[k], int) or isinstance(o[k], bool) or o[k] < 1):
            raise ValueError(f"{k}={o[k]!r}: must be a positive integer")
    if "dropout" in o and not (isinstance(o["dropout"], (int, float)) and 0 <= o["dropout"] < 1):
        raise ValueError(f"dropout={o['dropout']!r}: must be in [0, 1)")
    if "eta" in o and not (isinstance(o["eta"], (int, float)) and math.isfinite(o["eta"]) and o["eta"] >= 0):
        raise ValueError(f"eta={o['eta']!r}: must be finite and >= 0")
    if "targets" in o:
        if isinstance(o["targets"], str) or not o["targets"] or not all(isinstance(t, str) and t
                                                                        for t in o["targets"]):
            raise ValueError(f"targets={o['targets']!r}: give a list of layer names")
        o["targets"] = list(o["targets"])
    if "hidden" in o:
        if not (o["hidden"] and all(isinstance(h, int) and h >= 1 for h in o["hidden"])):
            raise ValueError(f"hidden={o['hidden']!r}: give positive widths, e.g. [256, 512]")
        o["hidden"] = list(o["hidden"])
    for k, allowed in spec.choices.items():
        if o[k] not in allowed:
            raise ValueError(f"{k}={o[k]!r}: choose one of {', '.join(allowed)}")
    if o.get("groups"):
        members = sorted(t for g in o["groups"].values() for t in g)
        if members != sorted(o["targets"]):
            raise ValueError(f"groups={o['groups']}: must cover the targets {o['targets']} exactly once")
        o["groups"] = {g: list(m) for g, m in o["groups"].items()}
    return o


def add_adapters(model, method="nara", verbose=True, **options):
    """Freeze `model` and add `method`'s adapters (a key of METHODS) with its options (check_options:
    r, targets, alpha, dropout, and the method's own, e.g. eta, bins): each linear layer of
    transformer.blocks whose name ends with a target (never the LM head) is replaced by the method's
    layer, with s = alpha / r (alpha None: s = 1, as NaRA's authors); a method with a core gets its one
    shared network, model.noise_nets["nara"]. The options are kept in model.adapter_config (what
    adapter_config.json holds, so a saved adapter rebuilds exactly)."""
    o = check_options(method, options)
    if getattr(model, "adapter_config", None):
        raise ValueError(f"this model already has {model.adapter_config['method']} adapters")
    spec = METHODS[method]
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.inputs is not None:                                           # extra input positions instead
        model.prompt = spec.inputs(model, **{k: o[k] for k in spec.options})
        what = f"{o['virtual_tokens']} virtual tokens"
    else:
        key_of = {t: "nara" for t in o["targets"]}                       # which core each target reads
        if o.get("groups"):
            key_of = {t: f"nara_{g}" for g, members in o["groups"].items() for t in members}
        device = model.transformer.wte.weight.device
        for key in sorted(set(key_of.values())) if spec.core else ():    # the cores first (RNG order)
            model.noise_nets[key] = spec.core(o["r"], **{k: o[k] for k in spec.core_options}).to(device)

        def make(name, base):
            r, alpha = o["r"], o["alpha"]
            if spec.per_layer:                                            # PEFT's per-layer rank and scale
                r, alpha = (o["rank_pattern"] or {}).get(name, r), (o["alpha_pattern"] or {}).get(name, alpha)
            s = 1.0 if alpha is None else alpha / (math.sqrt(r) if o.get("rslora") else r)
            mine = {k: o[k] for k in spec.options}
            if spec.core:
                mine["key"] = key_of[target_of(name, o["targets"])]
            return spec.layer(base, r, s, o["dropout"], **mine)
        count = replace_linears(model, o["targets"], make)
        what = f"adapted {count} layers ({', '.join(o['targets'])} in {len(model.transformer.blocks)} blocks)"
    model.adapter_config = {"method": method, **o}
    model.train(model.training)                               # new modules follow the model's mode
    if verbose:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"{method}: {what}; trainable {trained:,} of {total:,} parameters "
              f"({100 * trained / total:.3f} %)")
    return model


def target_of(name, targets):
    """The target a layer's name matches (the name itself, or its last parts after a dot), or None."""
    return next((t for t in targets if name == t or name.endswith("." + t)), None)


def replace_linears(model, targets, make):
    """Swap each model.Linear in transformer.blocks whose name matches a target for make(name, layer); a
    target that matches nothing is an error naming the layers there are."""
    linears = {name: m for name, m in model.named_modules()
               if name.startswith("transformer.blocks.") and isinstance(m, Linear)}
    chosen = [name for name in linears if target_of(name, targets)]
    for t in targets:
        if not any(target_of(name, [t]) for name in chosen):
            names = ", ".join(sorted({name.rsplit(".", 1)[1] for name in linears}))
            raise ValueError(f"target {t!r} matches no linear layer; available: {names}")
    for name in chosen:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, make(name, linears[name]))
    return len(chosen)


# ---------------------------------------------------------------- Theorem 4.1, constructively
def decompose(updates, r):
    """Theorem 4.1 (representation). Let ΔW_1, ..., ΔW_N be d_out x d_in matrices. If the sum of their
    column spaces and the sum of their row spaces each have dimension at most r, there exist static
    B (d_out x r), A (r x d_in) and cores C_1..C_N (r x r) with B C_i A = ΔW_i for every i.

    Construction: B = U, an orthonormal basis of the joint column space (left singular vectors of
    [ΔW_1 ... ΔW_N]); A = Vᵀ, V one of the joint row space (of [ΔW_1; ...; ΔW_N]); C_i = Uᵀ ΔW_i V.
    Then B C_i A = U Uᵀ ΔW_i V Vᵀ = ΔW_i: U Uᵀ and V Vᵀ project onto spaces holding every column and
    row of ΔW_i. Returns (B, A, [C_1..C_N]) in float64; raises ValueError when a joint rank exceeds r."""
    dW = [torch.as_tensor(u, dtype=torch.float64) for u in updates]
    if not dW or any(w.shape != dW[0].shape or w.dim() != 2 or not w.numel() for w in dW):
        raise ValueError("decompose needs a non-empty list of matrices of one shape")
    bases = []
    for stacked, side in ((torch.cat(dW, dim=1), "column"), (torch.cat(dW, dim=0).T, "row")):
        left, S, _ = torch.linalg.svd(stacked, full_matrices=False)       # thin: (d, min(d, N·d'))
        dim = int((S > S.max() * max(stacked.shape) * torch.finfo(torch.float64).eps).sum())
        if dim > r:
            raise ValueError(f"the joint {side} space has dimension {dim} > r = {r}: "
                             f"no static B, A of rank {r} can represent these updates")
        # the first `dim` singular vectors span the joint space, the next ones up to r are orthonormal
        # but arbitrary, and zero where r exceeds their number: U Uᵀ still projects onto a space holding it
        basis = torch.zeros(stacked.shape[0], r, dtype=torch.float64, device=stacked.device)
        basis[:, :min(r, left.shape[1])] = left[:, :r]
        bases.append(basis)
    U, V = bases
    return U, V.T, [U.T @ w @ V for w in dW]
