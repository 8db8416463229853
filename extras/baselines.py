"""The paper's other baselines. Low-rank, each a drop-in with the LoRA skeleton of nara.py changed in one
place: NaRA-C (a learned constant core), HiRA (a high-rank Hadamard update), DoRA, and NaRA on DoRA
(Appendix M). Prompt-based: Prompt Tuning and P-Tuning (virtual input tokens). Each is registered in
nara.METHODS at the end of this file, so nara.add_adapters builds it by name.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import nara
from nara import LoRALinear, NaRALinear, core


class StaticCore(nn.Module):
    """NaRA-C: C = I + η·unvec(P) with one learnable r x r P (zero at init), shared by all layers, blind
    to λ; P is read column-major like F_φ's output, so the authors' `constant_c` loads as it is."""
    reads = ()                                                            # no signal: the same C always

    def __init__(self, r, eta=0.1):
        super().__init__()
        self.eta = eta
        self.P = nn.Parameter(torch.zeros(r, r))

    def forward(self):
        return core(self.P.flatten(), self.P.shape[0], self.eta)         # (r, r), the same for every sequence


class HiRALinear(LoRALinear):
    """HiRA (ICLR 2025): h = W0 x + (W0 ⊙ s·B A) x, a high-rank Hadamard update (A kaiming, B zero)."""
    def delta(self):
        return self.weight.float() * (self.s * self.lora_B @ self.lora_A)      # (d_out, d_in)

    def update(self, x, cond):
        return F.linear(self.dropout(x), self.delta().to(x.dtype))   # full rank: recomputing would not pay

    def merged_weight(self, cond):
        return self.weight.float() + self.delta()


class DoRALinear(LoRALinear):
    """DoRA: W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row, the norm a constant in backward (the DoRA paper)."""
    def __init__(self, base, r, s=1.0, dropout=0.05, **key):            # NaRA-DoRA: the key of its core
        super().__init__(base, r, s, dropout, **key)
        self.register_buffer("w0_sq", self.weight.float().square().sum(1), persistent=False)   # ‖W0‖² per row
        self.magnitude = nn.Parameter(self.w0_sq.sqrt())                  # m = ‖W0‖_row at init

    def scale(self, cond):
        """m / ‖W0 + s·B C A‖ per row, (n or 1, d_out), without building W0 + s·B C A per sequence:
        ‖w + s u‖² = ‖w‖² + 2s w·u + s²‖u‖², with u_i = (BC)_i A, so w·u = (BC)_i·(W0 Aᵀ)_i and
        ‖u_i‖² = (BC)_i (A Aᵀ) (BC)_iᵀ."""
        A, C, Bm = (None if t is None else t.float() for t in self.factors(cond))
        W0 = self.weight.float()
        BC = Bm if C is None else Bm @ C                                  # (d_out, r) or (n, d_out, r)
        sq = (self.w0_sq + 2 * self.s * (BC * (W0 @ A.T)).sum(-1)
              + self.s ** 2 * ((BC @ (A @ A.T)) * BC).sum(-1))                 # ‖W0 + s·B C A‖² per row
        return (self.magnitude / sq.sqrt().detach()).reshape(-1, W0.shape[0])

    def forward(self, x, cond=None):
        cond = cond or {}
        h = F.linear(x, self.weight)
        scale = self.scale(cond)[:, None, :]                              # (n or 1, 1, d_out)
        return (scale * (h.to(scale.dtype) + self.update(x, cond))).to(h.dtype)

    def merged_weight(self, cond):
        return self.scale(cond)[0][:, None] * super().merged_weight(cond)


class NaRADoRALinear(DoRALinear, NaRALinear):
    """NaRA on DoRA (the paper's Appendix M): DoRA whose direction update is B C(λ) A, per sequence."""


# ---------------------------------------------------------------- prompt methods
# Prompt Tuning (Lester et al., 2021) and P-Tuning (Liu et al., 2021), the paper's prompt-based
# baselines: n trainable input embeddings join every sequence, through the model's `prompt` hook.
# Departure from PEFT (which puts them before everything): the n tokens go right before each row's first
# real token, after its left padding, so a left-padded batch gives each row what it gives alone. They
# are never masked, scored or committed (LLaDA.forward takes them out before the LM head), and they are
# attended to from the first step, so unlike the low-rank methods the model does NOT start equal to the
# base; the real tokens' positions move by n, which RoPE's relative form leaves without effect on the
# real tokens among themselves.
class VirtualTokens(nn.Module):
    """Prompt Tuning trains n embeddings directly, initialised from the embeddings of a text's tokens
    (`init_ids`, repeated to n) or of n random vocabulary rows; P-Tuning makes them with PEFT's MLP
    prompt encoder, Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d) applied to a free
    N(0, 1) table, h = encoder_hidden."""
    def __init__(self, wte, n, vocab_size, init_ids=None, encoder_hidden=None):
        super().__init__()
        d, dev = wte.weight.shape[1], wte.weight.device
        if encoder_hidden is None:                                          # Prompt Tuning
            ids = (torch.tensor(init_ids).repeat(math.ceil(n / len(init_ids)))[:n] if init_ids
                   else torch.randint(0, vocab_size, (n,)))
            self.embedding = nn.Parameter(wte.weight.detach()[ids.to(dev)].float().clone())   # (n, d)
            self.encoder = None
        else:                                                               # P-Tuning
            h = encoder_hidden
            self.embedding = nn.Parameter(torch.randn(n, d, device=dev))
            self.encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                         nn.Linear(h, d)).to(dev)

    def tokens(self):
        return self.embedding if self.encoder is None else self.encoder(self.embedding)   # (n, d)

    def forward(self, x, pad):
        """x (B, L, d), pad (B, L) bool or None -> (x' (B, n + L, d), pad' or None, real (B, L)):
        the n tokens sit after each row's leading padding; real[b, j] is where token j went."""
        B, L, d = x.shape
        n = self.embedding.shape[0]
        lead = (torch.zeros(B, 1, dtype=torch.long, device=x.device) if pad is None
                else pad.long().cumprod(1).sum(1, keepdim=True))                     # (B, 1) leading pads
        k = torch.arange(n + L, device=x.device)                                    # positions of x'
        order = torch.where(k < lead, n + k, torch.where(k < lead + n, k - lead, k))   # into [tokens, x]
        both = torch.cat([self.tokens().to(x.dtype).expand(B, n, d), x], dim=1)
        x = both.gather(1, order[..., None].expand(-1, -1, d))
        if pad is not None:
            pad = torch.cat([torch.zeros_like(pad[:, :1]).expand(B, n), pad], dim=1).gather(1, order)
        j = torch.arange(L, device=x.device)
        return x, pad, j + n * (j >= lead)


def virtual_tokens(model, virtual_tokens, prompt_init, encoder_hidden, p_tuning):
    """The prompt methods' inputs module for `model` (nara.Method.inputs)."""
    return VirtualTokens(model.transformer.wte, virtual_tokens, model.config.vocab_size, prompt_init,
                         (encoder_hidden or model.config.d_model) if p_tuning else None)


# ---------------------------------------------------------------- their entries in nara.METHODS
PROMPT = dict(virtual_tokens=20, prompt_init=None, encoder_hidden=None)   # init: token ids of a text
nara.METHODS.update({
    "nara-c": nara.Method(NaRALinear, StaticCore, core_options=dict(eta=0.1)),
    "hira": nara.Method(HiRALinear, per_layer=True),
    "dora": nara.Method(DoRALinear, per_layer=True),
    "nara-dora": nara.Method(NaRADoRALinear, nara.Hypernetwork, core_options=dict(eta=0.1)),
    "prompt-tuning": nara.Method(inputs=partial(virtual_tokens, p_tuning=False), options=PROMPT),
    "p-tuning": nara.Method(inputs=partial(virtual_tokens, p_tuning=True), options=PROMPT),
})
