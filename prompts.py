"""Prompt Tuning (Lester et al., 2021) and P-Tuning (Liu et al., 2021), the paper's prompt-based
baselines: n trainable input embeddings join every sequence, through the model's `prompt` hook.
Skip on a first read; adapters.add_adapters builds them by name ("prompt-tuning", "p-tuning").

Departure from PEFT (which puts them before everything): the n tokens go right before each row's first
real token, after its left padding, so a left-padded batch gives each row what it gives alone. They
are never masked, scored or committed (LLaDA.forward takes them out before the LM head), and they are
attended to from the first step, so unlike the low-rank methods the model does NOT start equal to the
base; the real tokens' positions move by n, which RoPE's relative form leaves without effect on the
real tokens among themselves.
"""
import math

import torch
import torch.nn as nn


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
