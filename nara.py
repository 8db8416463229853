"""NaRA: Noise-Aware LoRA (arXiv 2605.29716) §3, §4 and Theorem 4.1, with LoRA and Multi-LoRA beside it,
in the paper's order: ΔW(λ) = s·B C(λ) A, then C(λ) and F_φ, Multi-LoRA, `add_adapters`, Theorem 4.1.
Other methods and the ablation switches: extras/ (adapters.py builds every method by name).

Glossary (code -> paper)
    W0 = weight      frozen pretrained weight of an adapted linear layer, (d_out, d_in)
    A, B             lora_A (r, d_in), kaiming-uniform(a=√5); lora_B (d_out, r), zero: ΔW = 0 at step 0
    C(λ), F_φ, e_λ   the r x r core I + η unvec F_φ(e_λ), one per sequence; F_φ = `Hypernetwork`, ONE
                     shared by every adapted layer, reached through cond = {"lam": λ, "nara": C(λ)}
    lam (λ), eta, s  noise level of each sequence (t in training); core scale η = 0.1; s = alpha/r, or 1
                     when alpha is None (the authors' default)
    n, L             sequences and tokens, in shape comments

Departure from the authors' code, on purpose: under bf16 autocast their ((x Aᵀ) M) Bᵀ casts the core to
bf16. A diagonal entry 1 + δ then keeps only bf16's resolution around 1 (spacing 2⁻⁷ above 1, 2⁻⁸
below: a δ between -2⁻⁹ and 2⁻⁸ becomes 0); off-diagonal entries near 0 keep their precision. What is
lost is the deviation of C's diagonal from 1 below that resolution. Here, with bf16 activations,
`LoRALinear.update` forms the small term a (C − I)ᵀ in fp32 and runs ONE bf16 matmul of rank 2r,
[a, a (C − I)ᵀ] [B, B]ᵀ: the term meets B a in the matmul's fp32 accumulator. Measured cost against
LoRA in BENCHMARKS.md (`python benchmarks/run.py`). In fp32 nothing is rounded and the path is the
plain one.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear, checkpointed

TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out")
NEEDS_LAMBDA = "this model has noise-aware adapters: call it with noise_level=λ (one per sequence)"


# ---------------------------------------------------------------- ΔW(λ) = s·B C(λ) A, layer by layer
class LoRALinear(nn.Module):
    """LoRA: h = W0 x + s · B A x. The skeleton every other method changes in one place (`factors`)."""
    recomputing = False                                                   # set by LLaDA.forward

    def __init__(self, base, r, s=1.0, dropout=0.05):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)                   # the base key, unchanged
        d_out, d_in = self.weight.shape
        self.r, self.s, self.active = r, s, True                         # active=False: adapters.base_only
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=self.weight.device))    # fp32 adapters
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)                                # on the input of A only

    def factors(self, cond):
        """(A, C, B) of this forward; C = None means the identity."""
        return self.lora_A, None, self.lora_B

    def update(self, x, cond):
        """s · B C A x: (n, L, d_in) -> (n, L, d_out), a = A x in x's dtype; in fp32 all of it in fp32,
        in bf16 [a, a (C − I)ᵀ] @ [sB, sB]ᵀ with the small term formed in fp32 (the departure above)."""
        A, C, B = self.factors(cond)
        a = checkpointed(self, self.down, x, A.to(x.dtype))               # (n, L, r), x's dtype
        with torch.autocast(x.device.type, enabled=False):
            if a.dtype.itemsize >= 4:                                     # fp32 (or fp64): all of it
                if C is not None:
                    a = a @ C.to(a.dtype).transpose(-1, -2)               # (n, L, r) @ (n, r, r)
                return (self.s * a) @ B.to(a.dtype).transpose(-1, -2)     # (n, L, d_out); s on the r side
            sB = self.s * B.float()                                       # (d_out, r) or (n, d_out, r)
            if C is not None:                                             # a (C − I)ᵀ in fp32: (n, L, r)
                small = a.float() @ (C.float() - torch.eye(C.shape[-1], device=C.device)).transpose(-1, -2)
                a, sB = torch.cat([a, small.to(a.dtype)], -1), torch.cat([sB, sB], -1)   # rank 2r
            return a @ sB.to(a.dtype).transpose(-1, -2)                   # (n, L, d_out), x's dtype

    def down(self, x, A):
        """A dropout(x), recomputed in backward while `recomputing`: q, k, v keep one shared input."""
        return self.dropout(x) @ A.transpose(-1, -2)

    def forward(self, x, cond=None):
        """h = W0 x + s · B C A x, rounded once to x's dtype."""
        h = F.linear(x, self.weight)                                      # W0 x, (n, L, d_out) in x's dtype
        return h if not self.active else self.update(x, cond or {}).add_(h).to(h.dtype)

    def merged_weight(self, cond):
        """W0 + s · B C A in fp32 for the first sequence of `cond`."""
        A, C, B = (None if t is None else first_sequence(t) for t in self.factors(cond))
        return self.weight.float() + self.s * ((B if C is None else B @ C) @ A)


def first_sequence(t):
    """The first sequence's factor, whether shared (r, d) or per sequence (n, r, d)."""
    return t.reshape(-1, *t.shape[-2:])[0]


class NaRALinear(LoRALinear):
    """NaRA: h = W0 x + s · B C(λ) A x, C(λ) from the shared hypernetwork (cond[key])."""
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


class Hypernetwork(nn.Module):
    """C(λ) = I_r + η · unvec F_φ(e_λ), once per forward for the batch: (n,) -> (n, r, r).
    e_λ = [sin(λW), cos(λW)], W ~ N(0, 16²) fixed (no 2π); F_φ = Linear(64, 256) SiLU Linear(256, 512)
    SiLU Linear(512, r²), zero biases, the last layer zero: C = I at step 0, so NaRA starts as LoRA."""
    def __init__(self, r, eta=0.1, width=64, hidden=(256, 512)):
        super().__init__()
        self.r, self.eta = r, eta
        self.register_buffer("W", torch.randn(1, width // 2) * 16.0)     # e_λ's matrix: saved, not trained
        self.net = mlp([width, *hidden, r * r])                           # F_φ

    def forward(self, lam):
        if lam is None:
            raise ValueError(NEEDS_LAMBDA)
        with torch.autocast(self.W.device.type, enabled=False):              # fp32 throughout
            proj = lam.float()[:, None] @ self.W.float()                      # (n, width/2)
            e = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)         # (n, width): e_λ
            return core(self.net(e.to(self.net[0].weight.dtype)), self.r, self.eta)   # (n, r, r)


def mlp(sizes):
    """F_φ: Linear, SiLU, ..., Linear through `sizes`, zero biases and the last layer zero (F_φ = 0)."""
    net = nn.Sequential(*[m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.SiLU())][:-1])
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
        if cond.get("lam") is None:
            raise ValueError(NEEDS_LAMBDA.replace("noise-aware", "Multi-LoRA"))
        K = self.lora_A.shape[0]
        k = torch.ceil(cond["lam"] * K).long().clamp(1, K) - 1            # (n,) bin of each sequence
        return self.lora_A[k], None, self.lora_B[k]                       # (n, r, d_in), (n, d_out, r)


# ---------------------------------------------------------------- adding them to a model
def add_adapters(model, method="nara", r=32, targets=TARGETS, alpha=None, dropout=0.05, eta=0.1, *, bins=5,
                 verbose=True):
    """Freeze `model`; replace each linear layer of transformer.blocks whose name ends with a target (never
    the LM head) by `method`'s, s = alpha / r (None: s = 1, as NaRA's authors); NaRA also gets its one
    shared hypernetwork. Here lora, nara, multi-lora; every method of the paper: extras.adapters.attach."""
    layers = {"lora": LoRALinear, "nara": NaRALinear, "multi-lora": lambda *a: MultiLoRALinear(*a, bins=bins)}
    if method not in layers:
        raise ValueError(f"method={method!r}: here lora, nara, multi-lora; extras.adapters.attach has all")
    if getattr(model, "adapter_config", None):
        raise ValueError(f"this model already has {model.adapter_config['method']} adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "nara":
        model.noise_nets["nara"] = Hypernetwork(r, eta).to(model.transformer.wte.weight.device)
    s = 1.0 if alpha is None else alpha / r
    count = replace_linears(model, targets, lambda name, base: layers[method](base, r, s, dropout))
    model.adapter_config = dict(method=method, r=r, targets=list(targets), alpha=alpha, dropout=dropout,
                                eta=eta, bins=bins)
    return report(model, f"{method}: adapted {count} layers ({', '.join(targets)} in "
                         f"{len(model.transformer.blocks)} blocks)", verbose)


def replace_linears(model, targets, make):
    """Swap each model.Linear in transformer.blocks whose name ends with a target for make(name, layer)."""
    linears = {name: m for name, m in model.named_modules()
               if name.startswith("transformer.blocks.") and isinstance(m, Linear)}
    chosen = [name for name in linears if any(name == t or name.endswith("." + t) for t in targets)]
    for t in targets:
        if not any(name == t or name.endswith("." + t) for name in chosen):
            names = ", ".join(sorted({name.rsplit(".", 1)[1] for name in linears}))
            raise ValueError(f"target {t!r} matches no linear layer; available: {names}")
    for name in chosen:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, make(name, linears[name]))
    model.train(model.training)                               # new layers follow the model's mode
    return len(chosen)


def report(model, what, verbose):
    trained, total = (sum(p.numel() for p in model.parameters() if p.requires_grad or every)
                      for every in (0, 1))
    if verbose:
        print(f"{what}; trainable {trained:,} of {total:,} parameters ({100 * trained / total:.3f} %)")
    return model


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
