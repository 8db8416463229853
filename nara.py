"""NaRA: Noise-Aware LoRA (arXiv 2605.29716), and the methods the paper compares it with.

Read with the paper: §3 (masked diffusion, the noise level), §4 (NaRA, Eq. ΔW(λ) = B C(λ) A),
Theorem 4.1 (representation), §5 and Appendix M (baselines, NaRA on DoRA), the ablations.

Glossary (code -> paper)
    W0 = weight          frozen pretrained weight of an adapted linear layer, (d_out, d_in)
    A = lora_A           down-projection, (r, d_in), kaiming-uniform(a=sqrt 5)
    B = lora_B           up-projection, (d_out, r), zero at init, so ΔW = 0 at step 0
    C(λ)                 the r x r core: C(λ) = I + η F_φ(e_λ); one per sequence, (batch, r, r)
    F_φ = Hypernetwork   64 -> 256 -> 512 -> r², SiLU, last layer zero: shared by ALL adapted layers
    e_λ                  Gaussian Fourier features [sin(λW), cos(λW)], W ~ N(0, 16²) of shape (1, 32)
    lam (λ)              the noise level of each sequence: t in training, the masked fraction in sampling
    eta (η), s           core scale 0.1 and update scale alpha/r (NaRA: s = 1)

Every method is a drop-in for model.Linear that keeps the base `weight` key where it was, so a
pretrained checkpoint loads unchanged and only adapter keys are new. The noise level travels as an
argument: LLaDA.forward computes `cond = {"lam": λ, name: net(λ) for each shared noise net}` once and
hands it to every adapted layer; a noise-aware layer without λ raises instead of reusing an old one.
Not included: the "noise density" conditioning ablation, Prompt Tuning and P-Tuning.
"""
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear, _atomic, _check_keys

METHODS = ("lora", "nara", "nara-c", "multi-lora", "hira", "dora", "nara-dora")
NOISE_AWARE = ("nara", "multi-lora", "nara-dora")


# ---------------------------------------------------------------- the shared noise networks
class Hypernetwork(nn.Module):
    """C(λ) = I_r + η · F_φ(e_λ), computed once per forward pass for the whole batch: (B,) -> (B, r, r)."""
    def __init__(self, r, eta=0.1, embedding="fourier"):
        super().__init__()
        self.r, self.eta, self.embedding = r, eta, embedding
        if embedding == "fourier":        # fixed, saved, not trained; no 2π factor (authors' code)
            self.register_buffer("W", torch.randn(1, 32) * 16.0)
            width = 64
        elif embedding == "mlp":          # learnable: Linear(1 -> 64) + SiLU
            self.embed = nn.Sequential(nn.Linear(1, 64), nn.SiLU())
            width = 64
        elif embedding == "raw":          # λ itself
            width = 1
        else:
            raise ValueError(f"embedding={embedding!r}: choose fourier, mlp or raw")
        self.net = nn.Sequential(nn.Linear(width, 256), nn.SiLU(), nn.Linear(256, 512), nn.SiLU(),
                                 nn.Linear(512, r * r))
        for layer in self.net[::2]:
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.net[-1].weight)  # F_φ = 0 at init: C = I and NaRA starts exactly as LoRA

    def embed_lambda(self, lam):
        lam = lam.float()[:, None]                                         # (B, 1), fp32
        if self.embedding == "fourier":
            proj = lam @ self.W.float()                                   # (B, 32)
            return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)  # (B, 64)
        return self.embed(lam) if self.embedding == "mlp" else lam

    def forward(self, lam):
        if lam is None:
            raise ValueError("this model has noise-aware adapters: call it with noise_level=λ (one per sequence)")
        with torch.autocast(lam.device.type, enabled=False):
            F_phi = self.net(self.embed_lambda(lam)).view(-1, self.r, self.r)   # (B, r, r), row-major
            return torch.eye(self.r, device=lam.device) + self.eta * F_phi


class StaticCore(nn.Module):
    """NaRA-C: C = I + η·P with one learnable P (zero at init), shared by all layers, blind to λ."""
    def __init__(self, r, eta=0.1):
        super().__init__()
        self.eta = eta
        self.P = nn.Parameter(torch.zeros(r, r))

    def forward(self, lam):
        return torch.eye(self.P.shape[0], device=self.P.device) + self.eta * self.P      # (r, r)


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

    def factors(self, cond):
        """(A, C, B) of this forward: C = None means the identity."""
        return self.lora_A, None, self.lora_B

    def update(self, x, cond):
        """s · B C A x for x (B, L, d_in) -> (B, L, d_out). Computed in x's dtype: the fp32 factors
        are cast (r x d, cheap) rather than the activations (B x L x d), as autocast would do."""
        A, C, B = (None if t is None else t.to(x.dtype) for t in self.factors(cond))
        a = self.dropout(x) @ A.transpose(-1, -2)                         # (B, L, r)
        if C is not None:
            a = a @ C.transpose(-1, -2)                                   # (B, L, r) @ (B, r, r)
        return (self.s * a) @ B.transpose(-1, -2)                         # (B, L, d_out); s on the small side

    def forward(self, x, cond=None):
        return F.linear(x, self.weight).add_(self.update(x, cond))        # in place: W0 x is not kept for backward

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
        return F.linear(self.dropout(x), self.delta().to(x.dtype))

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
        A, C, B = self.factors(cond)
        W0 = self.weight.float()
        BC = B if C is None else B @ C                                    # (d_out, r) or (B, d_out, r)
        sq = (self.w0_sq + 2 * self.s * (BC * (W0 @ A.T)).sum(-1)
              + self.s ** 2 * ((BC @ (A @ A.T)) * BC).sum(-1))
        return (self.magnitude / sq.sqrt().detach()).reshape(-1, W0.shape[0])

    def forward(self, x, cond=None):
        h = F.linear(x, self.weight)
        scale = self.scale(cond)[:, None, :]                              # (B or 1, 1, d_out)
        return (scale * (h.to(scale.dtype) + self.update(x, cond))).to(h.dtype)

    def merged_weight(self, cond):
        return self.scale(cond)[0][:, None] * super().merged_weight(cond)


# ---------------------------------------------------------------- putting adapters on a model
def add_adapters(model, method, r=32, targets=("q_proj", "k_proj", "v_proj", "attn_out"), alpha=None,
                 dropout=0.05, eta=0.1, embedding="fourier", groups=None, bins=5, verbose=True):
    """Freeze `model` and replace each linear layer inside transformer.blocks whose name ends with a
    target by the adapter of `method`. s = alpha / r (alpha=None: s = 1, as NaRA's authors).
    groups (NaRA only): {"qk": ("q_proj", "k_proj"), ...} gives one hypernetwork per group instead
    of one global. The LM head `transformer.ff_out` is never adapted (the block MLP's ff_out is)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if getattr(model, "adapter_config", None):
        raise ValueError(f"this model already has {model.adapter_config['method']} adapters")
    config = dict(method=method, r=r, targets=list(targets), alpha=alpha, dropout=dropout, eta=eta,
                  embedding=embedding, groups=groups, bins=bins)
    s = 1.0 if alpha is None else alpha / r
    linears = {n: m for n, m in model.named_modules() if n.startswith("transformer.blocks.") and isinstance(m, Linear)}
    for t in targets:
        if not any(n.endswith("." + t) for n in linears):
            names = sorted({n.rsplit(".", 1)[1] for n in linears})
            raise ValueError(f"target {t!r} matches no linear layer; available: {', '.join(names)}")
    group_of = {t: "nara" for t in targets}
    if groups and method in ("nara", "nara-dora"):
        group_of = {t: f"nara_{g}" for g, members in groups.items() for t in members}
        if set(group_of) != set(targets):
            raise ValueError(f"groups {groups} must cover the targets {list(targets)} exactly once")
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    if method in ("nara", "nara-dora"):
        for key in sorted(set(group_of.values())):
            model.noise_nets[key] = Hypernetwork(r, eta, embedding).to(device)
    elif method == "nara-c":
        model.noise_nets["nara"] = StaticCore(r, eta).to(device)
    matched = []
    for name, base in linears.items():
        t = next((t for t in targets if name.endswith("." + t)), None)
        if t is None:
            continue
        layer = {"lora": lambda: LoRALinear(base, r, s, dropout),
                 "nara": lambda: NaRALinear(base, r, s, dropout, group_of[t]),
                 "nara-c": lambda: NaRALinear(base, r, s, dropout, "nara"),
                 "multi-lora": lambda: MultiLoRALinear(base, r, s, dropout, bins),
                 "hira": lambda: HiRALinear(base, r, s, dropout),
                 "dora": lambda: DoRALinear(base, r, s, dropout),
                 "nara-dora": lambda: DoRALinear(base, r, s, dropout, group_of[t])}[method]()
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)
        matched.append(name)
    model.adapter_config = config
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"{method}: adapted {len(matched)} layers ({', '.join(targets)} in {len(model.transformer.blocks)} blocks); "
              f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f} %)")
    return model


def adapter_state(model):
    """Only the adapter tensors (the base keys are left out): what training changes."""
    base = {k[len("model."):] for k in model.base_shapes()}
    return {k: v for k, v in model.state_dict().items() if k not in base}


def _cond_at(model, lam):
    """What the adapted layers receive for a batch of one sequence at noise level `lam`."""
    return model.condition(torch.tensor([float(lam)], device=next(model.parameters()).device))


def merge(model, lam):
    """Fold every adapter into its base weight at one fixed λ: W0 <- W0 + ΔW(λ); the model becomes a
    plain LLaDA (only possible at a fixed λ, since NaRA's update depends on it)."""
    cond = _cond_at(model, lam)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoRALinear):
            plain = Linear(layer.weight.shape[1], layer.weight.shape[0]).to(layer.weight.device)
            plain.weight = nn.Parameter(layer.merged_weight(cond).to(layer.weight.dtype), requires_grad=False)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, plain)
    model.noise_nets.clear()
    model.adapter_config = None
    return model


def delta_weights(model, lam):
    """{layer name: ΔW(λ) = merged weight − W0} for every adapted layer, in fp32."""
    cond = _cond_at(model, lam)
    return {n: m.merged_weight(cond) - m.weight.float() for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---------------------------------------------------------------- adapter checkpoints
def _write(directory, tensor_file, tensors, body):
    """tensors as safetensors and body as JSON in `directory`, each file written atomically."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(directory / tensor_file, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(body, indent=2)))


def save_adapter(model, directory):
    """adapter.safetensors (adapter tensors only) + adapter_config.json."""
    _write(directory, "adapter.safetensors", adapter_state(model), {**model.adapter_config, "base_shapes": _shape_id(model)})


def load_adapter(model, directory, verbose=True):
    """Put the saved adapters onto a plain `model` and load their tensors, checking every key and shape."""
    from safetensors.torch import load_file
    directory = Path(directory)
    cfg_file, file = directory / "adapter_config.json", directory / "adapter.safetensors"
    for f in (cfg_file, file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: adapter file not found")
    config = json.loads(cfg_file.read_text())
    if config.pop("base_shapes", None) != _shape_id(model):
        raise ValueError(f"{cfg_file}: saved for a model with different shapes than this one")
    add_adapters(model, **config, verbose=verbose)
    tensors, expected = load_file(str(file)), adapter_state(model)
    _check_keys(f"{file} ({config['method']} adapters)", tensors, expected)
    for k in tensors:
        if tensors[k].shape != expected[k].shape:
            raise ValueError(f"{file}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)                          # exactly the adapter keys, checked above
    return model


def _shape_id(model):
    c = model.config
    return f"d_model={c.d_model} n_layers={c.n_layers} n_heads={c.n_heads} n_kv_heads={c.n_kv_heads} mlp={c.mlp_hidden_size}"


PEFT_PREFIX = "base_model.model.model."


def export_peft(model, directory, lam=None):
    """LoRA in PEFT's layout (adapter_model.safetensors + adapter_config.json). NaRA, NaRA-C and
    Multi-LoRA export "LoRA at a fixed λ": B' = B C(λ) (the bin's LoRA for Multi-LoRA)."""
    cfg = model.adapter_config
    if cfg["method"] not in ("lora", "nara", "nara-c", "multi-lora"):
        raise ValueError(f"{cfg['method']} is not a low-rank additive update: PEFT's LoRA layout cannot hold it")
    if cfg["method"] in NOISE_AWARE and lam is None:
        raise ValueError(f"{cfg['method']} depends on λ: pass lam= to export LoRA at that noise level")
    cond = _cond_at(model, 0.0 if lam is None else lam)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            A, C, B = (None if t is None else _first(t) for t in m.factors(cond))
            B = B if C is None else B @ C
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = A, B
    s = 1.0 if cfg["alpha"] is None else cfg["alpha"] / cfg["r"]
    _write(directory, "adapter_model.safetensors", tensors, {
        "peft_type": "LORA", "r": cfg["r"], "lora_alpha": s * cfg["r"], "lora_dropout": cfg["dropout"],
        "target_modules": cfg["targets"], "bias": "none", "exported_from": cfg["method"], "noise_level": lam})


def load_peft(model, directory, verbose=True):
    """Load a PEFT-layout LoRA (ours or PEFT's own) onto a plain model as method 'lora'."""
    from safetensors.torch import load_file
    directory = Path(directory)
    body = json.loads((directory / "adapter_config.json").read_text())
    add_adapters(model, "lora", r=body["r"], targets=body["target_modules"], alpha=body["lora_alpha"],
                 dropout=body.get("lora_dropout", 0.0), verbose=verbose)
    file = directory / "adapter_model.safetensors"
    tensors = load_file(str(file))
    names = {f"{PEFT_PREFIX}{n}.{ab}.weight": f"{n}.{ab}" for n, m in model.named_modules()
             if isinstance(m, LoRALinear) for ab in ("lora_A", "lora_B")}
    _check_keys(file, tensors, names)
    state = {names[k]: v for k, v in tensors.items()}
    model.load_state_dict(state, strict=False)
    return model


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
        U, S, _ = torch.linalg.svd(stacked, full_matrices=True)           # U spans `side` space first
        tol = S.max() * max(stacked.shape) * torch.finfo(torch.float64).eps if S.numel() else 0.0
        rank = int((S > tol).sum())
        if rank > r:
            raise ValueError(f"the joint {side} space has dimension {rank} > r = {r}: "
                             f"no static B, A of rank {r} can represent these updates")
        basis = torch.zeros(stacked.shape[0], r, dtype=torch.float64)
        basis[:, :min(r, U.shape[1])] = U[:, :r]                           # extra columns: still orthonormal
        bases.append(basis)
    P, Q = bases
    return P, Q.T, [P.T @ w @ Q for w in W]
