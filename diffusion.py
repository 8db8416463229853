"""Masked diffusion for LLaDA: the training losses, the sampler and the Monte-Carlo likelihood.

Read with LLaDA (arXiv 2502.09992): Eq. (3) pre-training loss, Eq. (5) SFT loss, Eq. (6) likelihood
bound, Algorithms 4-5 and Appendix B.3 (semi-autoregressive low-confidence remasking); NaRA §4.

Glossary
    t, p_mask  diffusion time of each sequence; the masking probability
    λ (lam)    the noise level handed to the model (`noise_level=`): t in training; in sampling and the
               likelihood, the fraction of the answer still masked: from 1 down to 0 everywhere
    mask_id    `model.config.mask_token_id` (126336 in LLaDA-8B); eos = `model.config.eos_token_id`
    L_ans      the answer's length (with its EOS padding in SFT)
    generator  an explicit torch.Generator on the model's device for fixed-seed draws (validation, noise
               curves): the global random stream is never reseeded

Departures from the reference code, on purpose: SFT draws t = 1 - U[0, 1) in (0, 1], so 1/t is
finite; `confidence_eos_eot_inf` ranks EOS/EOT predictions below all others (LLaDA's flag sets them to
-inf after the argmax and can then commit a decoded position); finished sequences (`till_eos`) are
filled with EOS and cost no more steps; the sampler never predicts the mask id. Optional and off by
default, two approximations from Fast-dLLM (arXiv 2505.22618): `threshold` decoding (several tokens a
step when the model is sure of them) and a block KV cache (`BlockCache`: later steps of a block reuse
the K/V of the positions around it from the block's first step, though tokens and, with NaRA, λ have
changed since; docs/evaluation.md measures the cost).
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- forward process and losses
def pretrain_loss(model, x, eps=1e-3, t=None, generator=None):
    """LLaDA Eq. (3): t ~ U[0,1], p = (1-eps) t + eps, each token masked independently with prob p;
    loss = Σ_masked CE / p, divided by batch·length. Returns (loss, λ = t)."""
    B, L = x.shape
    t = torch.rand(B, device=x.device, generator=generator) if t is None else t
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, L)                    # (B, L)
    masked = torch.rand(B, L, device=x.device, generator=generator) < p_mask
    noisy = torch.where(masked, model.config.mask_token_id, x)
    logits = model(noisy, noise_level=t, logits_at=masked)                  # (N, V): masked positions only
    ce = F.cross_entropy(logits.float(), x[masked], reduction="none") / p_mask[masked]
    return ce.sum() / (B * L), t


def sft_mask(answer, t, exact=True, eps=1e-3, generator=None):
    """Which positions to mask for SFT. answer (B, L) bool marks the answer region (EOS padding
    included); the prompt is never masked. exact=True (NaRA's authors): exactly
    k = max(1, ceil(t·L_ans)) answer positions, uniformly chosen, p = t. exact=False (LLaDA):
    each answer token with prob p = (1-eps) t + eps. Returns (masked (B, L) bool, p (B,))."""
    B, L = answer.shape
    if not exact:
        p = (1 - eps) * t + eps
        return answer & (torch.rand(B, L, device=answer.device, generator=generator) < p[:, None]), p
    k = torch.ceil(t * answer.sum(1)).long().clamp(min=1)                   # (B,)
    score = torch.rand(B, L, device=answer.device, generator=generator).masked_fill(~answer, 2.0)  # prompt: 2
    rank = score.argsort(1).argsort(1)                                      # a uniform random order
    return rank < k[:, None], t


def sft_loss(model, x, answer, exact=True, t=None, attention_mask=None, generator=None):
    """LLaDA Eq. (5) per sequence: Σ_masked CE / p / L_ans, averaged over the batch (λ = t per
    sequence). x (B, L) prompt + answer + EOS padding; answer (B, L) bool. Returns (loss, λ)."""
    t = 1 - torch.rand(x.shape[0], device=x.device, generator=generator) if t is None else t
    masked, p = sft_mask(answer, t, exact, generator=generator)
    noisy = torch.where(masked, model.config.mask_token_id, x)
    logits = model(noisy, attention_mask, noise_level=t, logits_at=masked)  # (N, V): masked positions only
    ce = F.cross_entropy(logits.float(), x[masked], reduction="none")       # (N,), row-major like masked
    per_seq = torch.zeros(x.shape[0], device=x.device).index_add(0, masked.nonzero()[:, 0], ce)   # (B,)
    return (per_seq / p / answer.sum(1)).mean(), t


# ---------------------------------------------------------------- the sampler
def transfer_counts(masked, steps):
    """How many tokens to commit at each step of a block: the block's masked count split evenly,
    the remainder spread over the first steps (LLaDA, linear schedule of Eq. (8)). (B, steps)."""
    n = masked.sum(1, keepdim=True)
    return n // steps + (torch.arange(steps, device=masked.device) < n % steps).long()


def add_gumbel_noise(logits, temperature, generator=None):
    """Gumbel-max in float64 (low precision hurts MDM sampling, arXiv 2409.02908): the argmax of
    exp(logits) / (-log u)^T samples softmax(logits / T)."""
    if temperature == 0:
        return logits
    logits = logits.double()
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(u)) ** temperature


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
             temperature=0., cfg_scale=0., remasking="low_confidence", logits_eos_inf=False,
             confidence_eos_eot_inf=False, till_eos=False, eot_token_id=None, stats=None, lam_over="answer",
             generator=None, threshold=None, cache=None, refresh=None):
    """LLaDA's semi-autoregressive sampler. prompt (B, P), left-padded with EOS when lengths differ, with
    attention_mask (B, P). The answer starts as gen_length masks in blocks decoded left to right, each
    in steps/num_blocks steps; each step commits the transfer_counts most confident (or random)
    predictions among the masked positions of the current block. λ = (masked answer positions) /
    gen_length per sequence, from 1 to 0 like training's; lam_over="sequence" divides by prompt + gen
    instead (the authors' lm-eval default, which never reaches 1). till_eos: once a decoded block holds
    EOS, decode one more, fill the rest with EOS. Returns (B, P + gen_length); `stats` gets the model
    calls and the positions they computed (rows x length).

    Faster and approximate, off by default (the paper's tables use the exact sampler above):
    threshold=τ commits, at each step, every masked position of the block whose confidence is at least
    τ, and always the most confident one (Fast-dLLM's parallel decoding): a block then takes as many
    steps as it needs (`steps` is not used), and a row whose block is done waits for the others.
    cache="prefix" or "dual" computes most steps on part of the sequence against the K/V kept from the
    block's first step, recomputed when λ has moved by more than `refresh` (BlockCache)."""
    mask_id, eos = model.config.mask_token_id, model.config.eos_token_id
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}, "
                         f"and steps={steps} a multiple of the number of blocks")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking={remasking!r}: choose low_confidence or random")
    if lam_over not in ("answer", "sequence"):
        raise ValueError(f"lam_over={lam_over!r}: choose answer or sequence")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: a confidence in (0, 1]")
    cached = None if cache is None else BlockCache(cache, refresh)
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones_like(x[:, P:])], dim=1)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    if lam_over == "answer":
        lam_den = torch.full((B,), float(gen_length), device=x.device)
    else:                                                                     # prompt tokens + gen_length
        prompt_len = P if attention_mask is None else attention_mask[:, :P].sum(1).float()
        lam_den = torch.full((B,), float(gen_length), device=x.device) + prompt_len
    eos_block = torch.full((B,), float(num_blocks), device=x.device)      # first block holding EOS
    calls = positions = 0

    def forward(seq, mask, lam):                  # the current block's logits, through the cache if any
        nonlocal positions
        if cached is None:
            positions += seq.numel()
            return model(seq, mask, noise_level=lam, logits_at=current)
        logits, computed = cached.logits(model, seq, mask, lam, lo, hi)
        positions += computed
        return logits

    for nb in range(num_blocks):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        current = slice(lo, hi)                                               # only this block can commit
        counts = transfer_counts(x[:, lo:hi] == mask_id, steps_per_block)   # (B, steps)
        for i in range(steps_per_block if threshold is None else block_length):
            if threshold is None and not counts[:, i].any():
                continue
            if threshold is not None and not (x[:, lo:hi] == mask_id).any():
                break                                                         # every row's block is done
            masked = x == mask_id                                             # (B, P + gen)
            lam = masked[:, P:].sum(1).float() / lam_den                     # (B,)
            if cfg_scale > 0:                                                 # second pass, prompt masked
                un_x = x.clone()
                un_x[:, :P] = mask_id
                am = None if attention_mask is None else attention_mask.repeat(2, 1)
                both = forward(torch.cat([x, un_x]), am, lam.repeat(2))
                with_prompt, without = both.chunk(2)                          # (B, block, V) each
                logits = without + (cfg_scale + 1) * (with_prompt - without)
                calls += 2
            else:
                logits = forward(x, attention_mask, lam)                      # (B, block, V)
                calls += 1
            logits[:, :, mask_id] = -torch.inf                              # [MASK] is never an answer
            if logits_eos_inf:
                logits[:, :, eos] = -torch.inf
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)  # (B, block)
            if remasking == "low_confidence":
                conf = torch.gather(F.softmax(logits.double(), -1), -1, x0[..., None])[..., 0]
            else:
                conf = torch.rand(x0.shape, device=x.device, dtype=torch.float64, generator=generator)
            if confidence_eos_eot_inf:                                        # ranked below all others
                stop = (x0 == eos) if eot_token_id is None else (x0 == eos) | (x0 == eot_token_id)
                conf = torch.where(stop, conf - 2, conf)
            masked = masked[:, lo:hi]
            conf = torch.where(masked, conf, -torch.inf)
            commit = torch.zeros_like(masked)
            if threshold is None:
                for j in range(B):                                            # rows may differ in k
                    commit[j, torch.topk(conf[j], k=int(counts[j, i])).indices] = True
            else:                                                             # sure enough, or the surest
                commit = (conf >= threshold).scatter(1, conf.argmax(1, keepdim=True), True)
            x[:, lo:hi] = torch.where(commit & masked, x0, x[:, lo:hi])
        if till_eos:
            has_eos = (x[:, lo:hi] == eos).any(1)
            eos_block = torch.where(has_eos & (eos_block == num_blocks), nb, eos_block)
            done = eos_block < nb                                             # one more block decoded
            x[done, hi:] = torch.where(x[done, hi:] == mask_id, eos, x[done, hi:])
            if bool(done.all()):
                break
    if stats is not None:
        stats.update(model_calls=calls, positions=positions)
    return x


class BlockCache:
    """A block KV cache for the sampler (Fast-dLLM's, with NaRA's λ). At a block's first step one full
    forward keeps every position's K/V; at its later steps only the block ("dual") or the block and
    every position after it ("prefix") is computed, attending to the kept K/V of the others.

    What it approximates: the kept K/V are those of the block's first step. For any model they miss the
    tokens committed since (in the block, and for "dual" their effect on later positions); for NaRA they
    were also computed with that step's C(λ), and λ falls at every step. The rule here: the first step of
    each block is the exact forward, and the cache is computed again (a full forward) when any row's λ has
    moved by more than `refresh` since it was (None: never within a block). docs/evaluation.md measures
    what each costs against the uncached forward."""
    def __init__(self, mode, refresh=None):
        if mode not in ("prefix", "dual"):
            raise ValueError(f"cache={mode!r}: choose prefix or dual")
        if refresh is not None and not refresh >= 0:
            raise ValueError(f"refresh={refresh!r}: a change of λ, >= 0")
        self.mode, self.refresh, self.kv, self.lam, self.lo = mode, refresh, None, None, None

    def logits(self, model, x, attention_mask, lam, lo, hi):
        """(logits of positions lo..hi (B, hi - lo, V), positions computed) for the sequences x (B, S)."""
        if lo != self.lo or (self.refresh is not None and bool((lam - self.lam).abs().max() > self.refresh)):
            logits, self.kv = model(x, attention_mask, noise_level=lam, logits_at=slice(lo, hi), keep_kv=True)
            self.lam, self.lo = lam, lo
            return logits, x.numel()
        end = hi if self.mode == "dual" else x.shape[1]
        logits = model(x[:, lo:end], attention_mask, noise_level=lam, logits_at=slice(0, hi - lo), kv=self.kv,
                       start=lo)
        return logits, x.shape[0] * (end - lo)


# ---------------------------------------------------------------- Monte-Carlo likelihood
@torch.no_grad()
def log_likelihood(model, prompt, answer, mc_num=128, batch_size=16, cfg_scale=0., generator=None):
    """LLaDA Eq. (6), the lower bound on log p(answer | prompt) used for multiple choice: each of
    mc_num/batch_size rounds draws k in 1..L_ans and masks exactly m_i answer positions in row i, with
    stratified counts m_i = ((round(linspace(k, k + (b-1)·L_ans/b, b)) - 1) mod L_ans) + 1; the loss is
    Σ_masked CE · L_ans/m_i averaged over the batch; λ = m_i / L_ans. Returns minus the mean loss."""
    if mc_num < batch_size or mc_num % batch_size:
        raise ValueError(f"mc_num={mc_num} must be a positive multiple of batch_size={batch_size}")
    prompt, answer = torch.as_tensor(prompt).flatten(), torch.as_tensor(answer).flatten()
    P, L_ans, b = len(prompt), len(answer), batch_size
    dev = next(model.parameters()).device
    seq = torch.cat([prompt, answer]).to(dev)[None].repeat(b, 1)             # (b, P + L_ans)
    mask_id = model.config.mask_token_id
    losses = []
    for _ in range(mc_num // batch_size):
        k = int(torch.randint(1, L_ans + 1, (), device=dev, generator=generator))
        m = torch.round(torch.linspace(float(k), k + (b - 1) * L_ans / b, b)).long()
        m = ((m - 1) % L_ans + 1).to(dev)                                        # (b,) in 1..L_ans
        chosen = torch.rand(b, L_ans, device=dev, generator=generator).argsort(1) < m[:, None]   # m_i of them
        masked = torch.cat([torch.zeros(b, P, dtype=torch.bool, device=dev), chosen], dim=1)
        noisy = torch.where(masked, mask_id, seq)
        lam = m.float() / L_ans
        logits = model(noisy, noise_level=lam, logits_at=masked)             # (N, V): masked answer positions
        if cfg_scale > 0:
            un = noisy.clone()
            un[:, :P] = mask_id
            uncond = model(un, noise_level=lam, logits_at=masked)
            logits = uncond + (cfg_scale + 1) * (logits - uncond)
        ce = F.cross_entropy(logits.double(), seq[masked], reduction="none")
        weight = (L_ans / m.double())[:, None].expand(b, P + L_ans)[masked]
        losses.append(float((ce * weight).sum()) / b)
    return -math.fsum(losses) / len(losses)
