"""The paper's other low-rank baselines, each a drop-in with the LoRA skeleton of nara.py changed in one
place: NaRA-C (a learned constant core), HiRA (a high-rank Hadamard update), DoRA, and NaRA on DoRA
(Appendix M). Skip on a first read. adapters.add_adapters builds them by name.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nara import LoRALinear, NaRALinear, core


class StaticCore(nn.Module):
    """NaRA-C: C = I + η·unvec(P) with one learnable r x r P (zero at init), shared by all layers, blind
    to λ; P is read column-major like F_φ's output, so the authors' `constant_c` loads as it is."""
    def __init__(self, r, eta=0.1):
        super().__init__()
        self.eta = eta
        self.P = nn.Parameter(torch.zeros(r, r))

    def forward(self, lam=None, masked=None, valid=None):
        return core(self.P.flatten(), self.P.shape[0], self.eta)         # (r, r), the same for every sequence


class HiRALinear(LoRALinear):
    """HiRA (ICLR 2025): h = W0 x + (W0 ⊙ s·B A) x, a high-rank Hadamard update (A kaiming, B zero)."""
    def delta(self):
        return self.weight.float() * (self.s * self.lora_B @ self.lora_A)      # (d_out, d_in)

    def update(self, x, cond):
        return F.linear(self.dropout(x), self.delta().to(x.dtype))   # full rank: recomputing would not pay

    def merged_weight(self, cond):
        return self.weight.float() + self.delta()


class DoRALinear(NaRALinear):
    """DoRA: W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row, the norm a constant in backward (the DoRA paper).
    With key set (NaRA-DoRA, the paper's Appendix M) the direction update is B C(λ) A, per sequence."""
    def __init__(self, base, r, s=1.0, dropout=0.05, key=None):
        super().__init__(base, r, s, dropout, key)
        self.register_buffer("w0_sq", self.weight.float().square().sum(1), persistent=False)   # ‖W0‖² per row
        self.magnitude = nn.Parameter(self.w0_sq.sqrt())                  # m = ‖W0‖_row at init

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
              + self.s ** 2 * ((BC @ (A @ A.T)) * BC).sum(-1))                 # ‖W0 + s·B C A‖² per row
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
