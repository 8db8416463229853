import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import random_model, tolerance

import nara
from diffusion import BlockCache, generate, log_likelihood, pretrain_loss, sft_loss, sft_mask, transfer_counts
from extras.tasks import pad_sft
from model import LLaDAConfig

MASK, EOS = 126, 125          # LLaDAConfig.tiny()'s ids


def select(logits, logits_at):
    """What LLaDA.forward returns for `logits_at` (None, a bool mask or a slice), from full logits."""
    if logits_at is None:
        return logits
    return logits[logits_at] if isinstance(logits_at, torch.Tensor) else logits[:, logits_at]


class Stub(nn.Module):
    """logits = table[token] + bias[position]; never predicts the mask id; records every call."""
    def __init__(self, vocab=128, favour=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(mask_token_id=MASK, eos_token_id=EOS)
        self.table, self.bias = torch.randn(vocab, vocab, generator=g), torch.randn(256, vocab, generator=g)
        self.favour = favour or {}                                      # {position: token} made certain
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, attention_mask=None, noise_level=None, logits_at=None):
        self.calls.append((x.clone(), None if noise_level is None else noise_level.clone()))
        logits = self.table[x] + self.bias[:x.shape[1]] + self.w
        for pos, tok in self.favour.items():
            logits[:, pos, tok] += 100.0
        logits[..., MASK] = -torch.inf
        return select(logits, logits_at)


class NoMask(nn.Module):
    """A real tiny LLaDA that cannot predict the mask id. It computes the head at every position and then
    selects, so that the sampler and reference_generate run the same matmuls on the same shapes and their
    tokens can be compared exactly on any BLAS (the head at selected positions has a test of its own)."""
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, x, attention_mask=None, noise_level=None, logits_at=None):
        self.seen.append(x.clone())
        logits = select(self.model(x, attention_mask, noise_level=noise_level), logits_at)
        logits[..., self.config.mask_token_id] = -1e4                                        # finite: CFG subtracts logits
        return logits


@torch.no_grad()
def reference_generate(model, prompt, steps, gen_length, block_length):
    """LLaDA's greedy low-confidence sampler for one prompt, re-stated plainly: per block, per step,
    commit the n most probable argmax predictions among the block's masked positions."""
    mask = model.config.mask_token_id
    x = prompt[0].tolist() + [mask] * gen_length
    P, per_block = prompt.shape[1], steps // (gen_length // block_length)
    for start in range(P, P + gen_length, block_length):
        n_masked = block_length
        schedule = [n_masked // per_block + (1 if i < n_masked % per_block else 0) for i in range(per_block)]
        for n in schedule:
            logits = model(torch.tensor([x]))[0].double()
            probs = logits.softmax(-1)
            pred = logits.argmax(-1)
            cands = [(float(probs[i, pred[i]]), i) for i in range(start, start + block_length)
                     if x[i] == mask]
            order = sorted(range(len(cands)), key=lambda j: -cands[j][0])        # stable: ties by position
            for j in order[:n]:
                x[cands[j][1]] = int(pred[cands[j][1]])
    return torch.tensor([x])


# ------------------------------------------------------------------ schedule
@pytest.mark.parametrize("n, steps, expect", [(8, 4, [2, 2, 2, 2]), (10, 4, [3, 3, 2, 2]),
                                              (5, 8, [1, 1, 1, 1, 1, 0, 0, 0]), (7, 1, [7]),
                                              (32, 5, [7, 7, 6, 6, 6])])
def test_transfer_counts(n, steps, expect):
    masked = torch.zeros(2, 40, dtype=torch.bool)
    masked[:, :n] = True
    assert transfer_counts(masked, steps).tolist() == [expect, expect]


# ------------------------------------------------------------------ the sampler
@pytest.mark.parametrize("steps, gen, block", [(8, 8, 8), (8, 16, 4), (16, 16, 8), (6, 12, 4), (8, 4, 4)])
def test_greedy_tokens_equal_the_reference_sampler_step_for_step(steps, gen, block):
    model = NoMask(random_model().eval())
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    ours = generate(model, prompt, steps=steps, gen_length=gen, block_length=block)
    our_steps, model.seen = model.seen, []
    assert torch.equal(ours, reference_generate(model, prompt, steps, gen, block))
    ref_steps = model.seen        # the reference also calls the model on steps that commit nothing
    ref_steps = [s for i, s in enumerate(ref_steps)
                 if (s == MASK).any() and (i == 0 or not torch.equal(s, ref_steps[i - 1]))]
    assert len(our_steps) == len(ref_steps) and all(torch.equal(a, b) for a, b in zip(our_steps, ref_steps))


def test_blocks_fill_left_to_right_and_the_prompt_is_untouched():
    stub = Stub()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(stub, prompt, steps=8, gen_length=16, block_length=4)
    assert torch.equal(out[:, :3], prompt) and not (out == MASK).any()
    seen = [x for x, _ in stub.calls] + [out]
    for before, after in zip(seen, seen[1:]):
        assert torch.equal(before[:, :3], prompt)
        new = (before == MASK) & (after != MASK)
        assert (new.sum(1) == 2).all()                                   # 4 tokens over 2 steps per block
        pos = new.nonzero()[:, 1]
        block = (pos.min() - 3) // 4
        assert pos.max() < 3 + 4 * (block + 1)                           # only the current block
        assert not (before[:, 3:3 + 4 * block] == MASK).any()            # earlier blocks already full


def test_lambda_is_the_masked_fraction_of_the_answer_at_every_step():
    stub = Stub()
    generate(stub, torch.tensor([[1, 2, 3, 4]]), steps=12, gen_length=12, block_length=4)
    lams = []
    for x, lam in stub.calls:
        assert torch.allclose(lam, (x[:, 4:] == MASK).float().mean(1))
        lams.append(float(lam))
    assert lams[0] == 1.0 and lams == sorted(lams, reverse=True) and lams[-1] == pytest.approx(1 / 12)


def test_early_termination_decodes_one_block_after_the_first_eos_block():
    stub = Stub(favour={3 + 5: EOS})                                     # EOS certain in block 1 (of 6)
    stats = {}
    out = generate(stub, torch.tensor([[7, 8, 9]]), steps=24, gen_length=24, block_length=4,
                   till_eos=True, stats=stats)
    assert out[0, 8] == EOS and not (out == MASK).any()
    assert (out[0, 3 + 12:] == EOS).all()                                # blocks 3.. filled with EOS
    assert stats["model_calls"] == 3 * 4 == len(stub.calls)              # blocks 0, 1, 2 only
    full = {}
    generate(Stub(favour={8: EOS}), torch.tensor([[7, 8, 9]]), steps=24, gen_length=24,
             block_length=4, stats=full)
    assert full["model_calls"] == 24


def test_eos_options():
    prompt = torch.tensor([[7, 8, 9]])
    likes_eos = {p: EOS for p in range(3, 11)}
    assert (generate(Stub(favour=likes_eos), prompt, steps=8,
                     gen_length=8, block_length=8)[:, 3:] == EOS).all()
    for temperature in (0.0, 1.0):
        out = generate(Stub(favour=likes_eos), prompt, steps=8, gen_length=8, block_length=8,
                       temperature=temperature, logits_eos_inf=True)
        assert not (out[:, 3:] == EOS).any()
    stub = Stub(favour={3: EOS})                                         # EOS at the most confident place
    generate(stub, prompt, steps=8, gen_length=8, block_length=8, confidence_eos_eot_inf=True)
    assert stub.calls[-1][0][0, 3] == MASK                               # committed last, not first


def test_cfg_zero_is_no_cfg_and_cfg_runs_two_passes_with_a_mask():
    model = NoMask(random_model().eval())
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(generate(model, prompt, steps=4, gen_length=8, block_length=4, cfg_scale=0.0),
                       generate(model, prompt, steps=4, gen_length=8, block_length=4))
    stats = {}
    out = generate(model, prompt, attention_mask=torch.ones_like(prompt), steps=4, gen_length=8,
                   block_length=4, cfg_scale=1.5, stats=stats)
    assert stats["model_calls"] == 8 and not (out == MASK).any()


def test_batched_left_padded_prompts_equal_each_alone():
    # A padded row is another shape than the row alone (batch, length, RoPE positions), so their logits
    # agree only to rounding; in float64 that is ~1e-15, far below any gap between two candidates, so
    # the greedy tokens agree exactly on any kernel path (in fp32 a near-tie could flip one).
    model = NoMask(random_model().double().eval())
    a, b = [5, 6, 7, 8, 9], [10, 11]
    batch = torch.tensor([a, [EOS] * 3 + b])
    mask = torch.tensor([[1] * 5, [0] * 3 + [1] * 2])
    both = generate(model, batch, attention_mask=mask, steps=8, gen_length=8, block_length=4)
    assert torch.equal(both[0], generate(model, torch.tensor([a]), steps=8, gen_length=8, block_length=4)[0])
    alone = generate(model, torch.tensor([b]), steps=8, gen_length=8, block_length=4)[0]
    assert torch.equal(both[1, 3:], alone)


def test_sampling_feeds_lambda_to_noise_aware_adapters():
    model = random_model()
    nara.add_adapters(model, "nara", r=2, verbose=False)
    out = generate(NoMask(model.eval()), torch.tensor([[1, 2, 3]]), steps=4, gen_length=4, block_length=4)
    assert not (out == MASK).any()


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(Stub(), torch.tensor([[1]]), steps=4, gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="remasking"):
        generate(Stub(), torch.tensor([[1]]), steps=4, gen_length=4, block_length=4, remasking="entropy")


# ------------------------------------------------------------------ losses
class Uniform(nn.Module):
    """Input-independent logits: CE at position i is a fixed number c_i, whatever is masked."""
    def __init__(self, L, vocab=8):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=7, eos_token_id=6)
        self.logits = nn.Parameter(torch.randn(L, vocab, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, attention_mask=None, noise_level=None, logits_at=None):
        return select(self.logits.expand(x.shape[0], -1, -1), logits_at)


def test_sft_loss_matches_a_hand_computed_value():
    model = Uniform(6)
    x = torch.tensor([[1, 2, 3, 4, 6, 6]])
    answer = torch.tensor([[False, False, True, True, True, True]])
    ce = F.cross_entropy(model.logits.detach(), x[0], reduction="none")
    loss, lam = sft_loss(model, x, answer, t=torch.tensor([1.0]))          # t = 1: the whole answer
    assert torch.allclose(loss, ce[2:].sum() / 1.0 / 4) and lam.tolist() == [1.0]
    with torch.no_grad():
        model.logits.zero_()                                               # every CE = log 8
    loss, _ = sft_loss(model, x, answer, t=torch.tensor([0.5]))           # k = 2 of 4: 2 log 8 / 4 / 0.5
    assert torch.allclose(loss, torch.tensor(math.log(8)))


def test_sft_mask_counts_and_never_touches_the_prompt():
    answer = torch.zeros(3, 10, dtype=torch.bool)
    answer[:, 4:] = True
    masked, p = sft_mask(answer, torch.tensor([0.01, 0.5, 1.0]))
    assert masked.sum(1).tolist() == [1, 3, 6] and not masked[:, :4].any()
    assert torch.equal(p, torch.tensor([0.01, 0.5, 1.0]))
    masked, p = sft_mask(answer.repeat(200, 1), torch.full((600,), 0.3), exact=False)
    assert not masked[:, :4].any() and abs(masked.float().sum(1).mean() / 6 - p[0]) < 0.02


def test_the_one_over_p_weighting_is_unbiased():
    """E[Σ_masked CE_i / p] / L = mean_i CE_i for any p: checked over many draws of t and masks."""
    torch.manual_seed(0)
    model, L = Uniform(12), 12
    x = torch.randint(0, 6, (1, L))
    exact = F.cross_entropy(model.logits.detach(), x[0]).item()
    draws = [pretrain_loss(model, x.repeat(64, 1))[0].item() for _ in range(300)]
    assert abs(sum(draws) / len(draws) - exact) < 0.02 * exact
    answer = torch.ones(64, L, dtype=torch.bool)
    draws = [sft_loss(model, x.repeat(64, 1), answer, exact=False)[0].item() for _ in range(300)]
    assert abs(sum(draws) / len(draws) - exact) < 0.02 * exact


def test_pad_sft():
    ids, answer = pad_sft([1, 2], [3, 4, 9], 7, eos_token_id=9)
    assert ids.tolist() == [1, 2, 3, 4, 9, 9, 9] and answer.tolist() == [False, False] + [True] * 5
    assert pad_sft([1, 2, 3], [4, 5], 4, 9) is None


# ------------------------------------------------------------------ likelihood
def test_one_token_likelihood_is_the_exact_log_probability():
    # The estimate runs the model on a batch of 4, the reference on a batch of 1: in float64 both round
    # within tolerance() of each other, and a wrong position, weight or count would move it by > 0.1.
    model = random_model(LLaDAConfig.tiny()).double().eval()
    prompt, answer = torch.tensor([4, 8, 15, 16]), torch.tensor([23])
    got = log_likelihood(model, prompt, answer, mc_num=8, batch_size=4)
    logits = model(torch.tensor([[4, 8, 15, 16, MASK]]), noise_level=torch.tensor([1.0]))[0, 4].detach()
    expect = float(logits.log_softmax(-1)[23])
    assert got == pytest.approx(expect, abs=tolerance(logits, dtype=torch.float64))


def test_likelihood_uses_stratified_counts_and_lambda():
    stub = Stub()
    log_likelihood(stub, [1, 2, 3], [4, 5, 6, 7, 8], mc_num=8, batch_size=4)
    for x, lam in stub.calls:
        m = (x[:, 3:] == MASK).sum(1)
        assert not (x[:, :3] == MASK).any() and m.min() >= 1
        assert torch.allclose(lam, m.float() / 5)
        assert len(set(m.tolist())) >= 3                                   # strata spread over 1..La
    with pytest.raises(ValueError, match="multiple of batch_size"):
        log_likelihood(stub, [1], [2], mc_num=10, batch_size=4)


def test_the_head_at_selected_positions_changes_no_loss_or_likelihood():
    """sft_loss, pretrain_loss and log_likelihood ask the model only for the positions they read;
    the same numbers come out of the full-logits formulas they replaced (same masks, same draws).
    The head on N selected rows and on all B·L rows is the same function of the same inputs, but two
    matmul shapes, whose BLAS blocking may differ: in float64 they agree to tolerance(); the losses
    take their cross-entropy in fp32 (sft_loss, pretrain_loss), so those agree to fp32's."""
    model = random_model().double().eval()
    nara.add_adapters(model, "nara", r=4, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    x = torch.randint(0, 120, (3, 10))
    answer = torch.arange(10).expand(3, 10) >= 3
    lam = torch.tensor([0.2, 0.5, 0.9])
    full = model(x, noise_level=lam)
    exact = dict(rtol=0, atol=tolerance(full, dtype=torch.float64))
    assert model(x, noise_level=lam, logits_at=answer).shape == (21, 128)
    assert torch.allclose(model(x, noise_level=lam, logits_at=answer), full[answer], **exact)
    assert torch.allclose(model(x, noise_level=lam, logits_at=slice(4, 7)), full[:, 4:7], **exact)
    torch.manual_seed(0)
    new, _ = sft_loss(model, x, answer)
    torch.manual_seed(0)   # the previous sft_loss, written out
    t = 1 - torch.rand(3)
    masked, p = sft_mask(answer, t)
    logits = model(torch.where(masked, MASK, x), noise_level=t)
    old = ((F.cross_entropy(logits.float().transpose(1, 2), x,
                            reduction="none") * masked).sum(1) / p / answer.sum(1)).mean()
    assert torch.allclose(new, old, rtol=0, atol=tolerance(old))
    torch.manual_seed(1)
    new, _ = pretrain_loss(model, x)
    torch.manual_seed(1)
    t = torch.rand(3)
    p_mask = ((1 - 1e-3) * t + 1e-3)[:, None].expand(3, 10)
    masked = torch.rand(3, 10) < p_mask
    logits = model(torch.where(masked, MASK, x), noise_level=t)
    old = (F.cross_entropy(logits[masked].float(), x[masked], reduction="none") / p_mask[masked]).sum() / 30
    assert torch.allclose(new, old, rtol=0, atol=tolerance(old))
    torch.manual_seed(2)
    new = log_likelihood(model, x[0, :4], x[0, 4:], mc_num=4, batch_size=4)
    torch.manual_seed(2)                                                   # one round of the previous code
    k = int(torch.randint(1, 7, ()))
    m = ((torch.round(torch.linspace(float(k), k + 3 * 6 / 4, 4)).long() - 1) % 6 + 1)
    chosen = torch.rand(4, 6).argsort(1) < m[:, None]
    masked = torch.cat([torch.zeros(4, 4, dtype=torch.bool), chosen], dim=1)
    seq = x[0][None].repeat(4, 1)
    with torch.no_grad():
        logits = model(torch.where(masked, MASK, seq), noise_level=m.float() / 6)
    ce = F.cross_entropy(logits[masked].double(), seq[masked], reduction="none")
    old = -float((ce * (6 / m.double())[:, None].expand(4, 10)[masked]).sum()) / 4
    assert new == pytest.approx(old, abs=tolerance(old, dtype=torch.float64))


# ------------------------------------------------------------------ parallel decoding and the block KV cache
class Table(nn.Module):
    """Logits set by hand per step: step s gives each answer position i the confidence table[s][i] for
    token 10 + i (the rest spread evenly over 100 other tokens); records every call."""
    def __init__(self, table, P):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=MASK, eos_token_id=EOS)
        self.table, self.P, self.calls = table, P, []

    def forward(self, x, attention_mask=None, noise_level=None, logits_at=None):
        self.calls.append(x.clone())
        p = torch.tensor(self.table[len(self.calls) - 1], dtype=torch.float64)          # (B, gen)
        probs = torch.full((*x.shape, 128), 1e-9, dtype=torch.float64)
        answer = probs[:, self.P:]
        answer[..., 20:120] = (1 - p[..., None]) / 100
        answer.scatter_(-1, (10 + torch.arange(p.shape[1])).expand(x.shape[0], -1)[..., None], p[..., None])
        return select(probs.log(), logits_at)


def test_threshold_commits_what_is_sure_enough_and_at_least_the_surest():
    # Worked by hand: threshold 0.9, one block of 4. Step 1: row 0 has 0.95, 0.5, 0.92, 0.3 -> commits
    # positions 0 and 2; row 1 has nothing >= 0.9 -> commits only its surest, position 3 (0.6).
    # Step 2: row 0 has 0.6 at 1 and 0.7 at 3 -> its surest, 3; row 1: 0.91 at 0 and 0.95 at 1 -> both.
    # Step 3: row 0 commits 1 (its last); row 1 commits 2 (its last). No fourth call.
    table = [[[0.95, 0.5, 0.92, 0.3], [0.2, 0.4, 0.1, 0.6]],
             [[0.9, 0.6, 0.9, 0.7], [0.91, 0.95, 0.5, 0.9]],
             [[0.9, 0.55, 0.9, 0.9], [0.9, 0.9, 0.8, 0.9]]]
    stub = Table(table, P=2)
    out = generate(stub, torch.tensor([[1, 2], [3, 4]]), steps=4, gen_length=4, block_length=4, threshold=0.9)
    seen = [(c[:, 2:] != MASK) for c in stub.calls] + [out[:, 2:] != MASK]
    assert [s.int().tolist() for s in seen] == [[[0, 0, 0, 0], [0, 0, 0, 0]],
                                                [[1, 0, 1, 0], [0, 0, 0, 1]],
                                                [[1, 0, 1, 1], [1, 1, 0, 1]],
                                                [[1, 1, 1, 1], [1, 1, 1, 1]]]
    assert out[:, 2:].tolist() == [[10, 11, 12, 13], [10, 11, 12, 13]] and len(stub.calls) == 3


def test_a_row_done_early_waits_without_committing():
    table = [[[0.99, 0.99, 0.99, 0.99], [0.2, 0.4, 0.1, 0.6]]] + [[[0.1] * 4, [0.3] * 4]] * 3
    stub = Table(table, P=2)
    stats = {}
    out = generate(stub, torch.tensor([[1, 2], [3, 4]]), steps=4, gen_length=4, block_length=4, threshold=0.9,
                   stats=stats)
    assert stats["model_calls"] == 4 and not (out == MASK).any()         # row 1: one token a step
    assert all((c[0, 2:] == out[0, 2:]).all() for c in stub.calls[1:])   # row 0 done at step 1, untouched


@pytest.mark.parametrize("base", ["base", "instruct/base"])
def test_without_the_new_arguments_the_sampler_is_the_reference_on_the_bundled_models(base):
    """Token for token and call for call LLaDA's sampler (reference_generate) on the bundled models."""
    from model import LLaDA
    model = NoMask(LLaDA.from_pretrained(Path(__file__).parents[1] / "data" / base).eval())
    prompt = torch.tensor([[4, 40, 41, 42, 43, 44]])
    ours = generate(model, prompt, steps=8, gen_length=16, block_length=8)
    calls, model.seen = model.seen, []
    assert torch.equal(ours, reference_generate(model, prompt, 8, 16, 8))
    assert len(calls) == len(model.seen) and all(torch.equal(a, b) for a, b in zip(calls, model.seen))


def cached_model(method=None, dtype=torch.float64):
    model = random_model().to(dtype).eval()
    if method:
        nara.add_adapters(model, method, r=4, verbose=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("method", [None, "lora", "nara"])
def test_the_kv_of_a_sequence_make_its_later_positions_exactly_as_the_full_forward(method):
    """The K/V mechanism: the K/V kept from a full forward, then only positions lo.. (or lo..hi)
    computed against them, give those positions' logits as the full forward does, when nothing changed
    in between (float64: agreement to rounding, another shape)."""
    model = cached_model(method)
    x, lam = torch.randint(0, 120, (2, 12)), torch.tensor([0.3, 0.8])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0                                                        # a left-padded row
    full, kv = model(x, mask, noise_level=lam, keep_kv=True)
    assert len(kv) == 2 and kv[0][0].shape == (2, 4, 12, 16)
    exact = dict(rtol=0, atol=tolerance(full, dtype=torch.float64))
    assert torch.allclose(model(x[:, 5:], mask, noise_level=lam, kv=kv, start=5), full[:, 5:], **exact)
    assert torch.allclose(model(x[:, 5:9], mask, noise_level=lam, kv=kv, start=5), full[:, 5:9], **exact)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x[:, 5:], mask[:, 5:], noise_level=lam, kv=kv, start=5)   # the mask covers every key


def test_a_cache_refuses_virtual_tokens_and_cores_that_read_the_whole_input():
    x = torch.randint(0, 120, (1, 8))
    for method, options in (("prompt-tuning", dict(virtual_tokens=2)), ("nara", dict(r=2, signal="density"))):
        model = random_model()
        nara.add_adapters(model, method, verbose=False, **options)
        _, kv = model(x, noise_level=torch.tensor([0.5]), keep_kv=True)
        with pytest.raises(ValueError, match="KV cache"):
            model(x[:, 4:], noise_level=torch.tensor([0.5]), kv=kv, start=4)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_the_first_step_of_each_block_is_the_uncached_forward(mode):
    model = cached_model("nara", torch.float32)
    x, lam = torch.randint(0, 120, (2, 14)), torch.tensor([1.0, 0.9])
    cache = BlockCache(mode)
    for lo in (6, 10):                                                     # two blocks: each starts afresh
        got, computed = cache.logits(model, x, None, lam, lo, lo + 4)
        assert torch.equal(got, model(x, noise_level=lam, logits_at=slice(lo, lo + 4))) and computed == 2 * 14
        _, computed = cache.logits(model, x, None, lam, lo, lo + 4)
        assert computed == 2 * (lo + 4 - lo if mode == "dual" else 14 - lo)


def test_refresh_zero_recomputes_the_cache_at_every_step_so_the_tokens_are_the_exact_samplers():
    model = Spy(cached_model("nara"))                  # both compute the head on the block, same shapes
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    exact = generate(model, prompt, steps=8, gen_length=8, block_length=4)
    stats = {}
    same = generate(model, prompt, steps=8, gen_length=8, block_length=4, cache="dual", refresh=0.0, stats=stats)
    assert torch.equal(same, exact) and stats["positions"] == 8 * 14


class Spy(nn.Module):
    """A real model whose every call is recorded: the input, λ, the positions it starts at."""
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, x, attention_mask=None, noise_level=None, logits_at=None, kv=None, start=0, keep_kv=False):
        self.calls.append((x.shape[1], noise_level.clone(), start))
        out = self.model(x, attention_mask, noise_level=noise_level, logits_at=logits_at, kv=kv, start=start,
                         keep_kv=keep_kv)
        logits = out[0] if keep_kv else out
        logits[..., MASK] = -1e4
        return out


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_with_a_cache_lambda_reaches_the_adapters_at_every_step_and_cfg_runs_both_halves(cfg):
    spy = Spy(cached_model("nara", torch.float32))
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    stats = {}
    out = generate(spy, prompt, steps=8, gen_length=8, block_length=4, cache="prefix", cfg_scale=cfg,
                   stats=stats)
    assert not (out == MASK).any() and stats["model_calls"] == 8 * (2 if cfg else 1) and len(spy.calls) == 8
    rows = 4 if cfg else 2
    lams = [lam for _, lam, _ in spy.calls]
    assert [float(lam[0]) for lam in lams] == pytest.approx([1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert all(lam.shape == (rows,) for lam in lams)                     # CFG: both halves, one λ each
    assert [(L, start) for L, _, start in spy.calls] == [(12, 0), (8, 4), (8, 4), (8, 4),
                                                        (12, 0), (4, 8), (4, 8), (4, 8)]
    assert stats["positions"] == rows * (12 + 3 * 8 + 12 + 3 * 4)
