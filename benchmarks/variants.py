"""Two reference paths of NaRA's layer for the benchmarks, beside the one nara.py takes (in bf16, one
matmul of rank 2r with a (C − I)ᵀ formed in fp32): the authors' rank-r product in the activations'
dtype (in bf16, a core entry 1 + δ with |δ| < 2⁻⁸ rounds to 1), and this project's earlier path, the
rank-r rest in fp32 with an fp32 (B, L, d_out) output rounded once (C − I survives at more cost)."""
import torch

import nara
from model import recomputable


class AuthorsPathNaRA(nara.NaRALinear):
    """The rank-r product in the activations' dtype, as the authors' autocast runs it."""
    def forward(self, x, cond=None):
        A, C, B = (t.to(x.dtype) for t in self.factors(cond))
        a = (self.dropout(x) @ A.T) @ C.transpose(-1, -2)
        return torch.nn.functional.linear(x, self.weight).add_((self.s * a) @ B.T)


class Fp32PathNaRA(nara.NaRALinear):
    """A x in the activations' dtype, then C and B in fp32 with autocast off: an fp32 (B, L, d_out)."""
    def update(self, x, cond):
        A, C, B = self.factors(cond)
        a = recomputable(self.down, x, A.to(x.dtype))             # (B, L, r)
        with torch.autocast(x.device.type, enabled=False):
            a = a.float() @ C.float().transpose(-1, -2)                   # (B, L, r)
            return (self.s * a) @ B.float().transpose(-1, -2)             # (B, L, d_out) in fp32


def use(model, cls):
    """Switch every NaRA layer of `model` to `cls` (nara.NaRALinear restores the default path)."""
    for m in model.modules():
        if isinstance(m, nara.NaRALinear) and type(m) in (nara.NaRALinear, AuthorsPathNaRA, Fp32PathNaRA):
            m.__class__ = cls
    return model
