import json

import pytest
import torch
from conftest import PROMPT, random_model, rank, tolerance

import nara
from extras import ablations, adapters, interop
from model import LLaDA, LLaDAConfig

IDS = torch.tensor([[5, 9, 33, 8, 71, 2], [1, 4, 100, 3, 3, 60]])
LAM = torch.tensor([0.15, 0.85])


def adapted(method, seed=0, **kw):
    model = random_model(seed=seed)
    torch.manual_seed(seed + 1)
    nara.add_adapters(model, method, verbose=False, **rank(method, 4), **kw)
    return model.eval()


def randomise_adapters(model, seed=3):
    """Give every adapter tensor (B and the hypernetwork's last layer included) non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ------------------------------------------------------------------ parameter counts at 8B (docs/methods.md)
@pytest.mark.parametrize("r, hyper", [(8, 181_056), (16, 279_552), (32, 673_536), (64, 2_249_472)])
def test_parameter_counts_on_the_8b_config(r, hyper):
    with torch.device("meta"):
        model = LLaDA(LLaDAConfig())
    nara.add_adapters(model, "nara", r=r, verbose=False)
    assert next(model.parameters()).device.type == "meta"                 # nothing allocated
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.noise_nets.parameters()) == hyper
    assert trainable - hyper == r * (4096 + 4096) * 4 * 32                 # LoRA: 33,554,432 at r = 32
    if r == 32:
        assert trainable - hyper == 33_554_432
        total = sum(p.numel() for p in model.parameters())             # the paper's % are of base + adapters
        assert total - trainable == 8_015_581_184
        assert round(100 * trainable / total, 3) == 0.425
        assert round(100 * (trainable - hyper) / (total - hyper), 3) == 0.417


# ------------------------------------------------------------------ the paper's invariants
LOW_RANK = [m for m in nara.METHODS if m not in PROMPT]


@pytest.mark.parametrize("method", LOW_RANK)
def test_every_low_rank_method_starts_as_the_base_model(method):
    base = random_model()
    model = adapted(method)
    assert torch.equal(model(IDS, noise_level=LAM), base(IDS))


def test_nara_equals_lora_with_the_same_factors_then_diverges_after_one_step():
    lora, nara_model = adapted("lora"), adapted("nara")
    randomise = {k: torch.randn(v.shape) for k, v in adapters.adapter_state(lora).items()}
    lora.load_state_dict(randomise, strict=False)
    nara_model.load_state_dict(randomise, strict=False)                    # same A, B; C(λ) = I
    assert torch.equal(nara_model(IDS, noise_level=LAM), lora(IDS))
    opt = torch.optim.AdamW(nara_model.noise_nets.parameters(), lr=1e-2)   # one step on F_φ alone
    nara_model(IDS, noise_level=LAM).square().mean().backward()
    opt.step()
    assert not torch.allclose(nara_model(IDS, noise_level=LAM), lora(IDS), atol=1e-4)


@pytest.mark.parametrize("method", nara.METHODS)
def test_only_adapters_get_gradients_and_the_base_is_bit_unchanged(method):
    model = adapted(method).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n in adapters.adapter_state(model) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(IDS, noise_level=LAM).logsumexp(-1).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    after = model.state_dict()
    for k in before:
        if k not in adapters.adapter_state(model):
            assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in adapters.adapter_state(model))


@pytest.mark.parametrize("method", ["nara", "multi-lora", "nara-dora", "nara-c", "dora"])
def test_batched_lambda_equals_per_row_forwards(method):
    model = randomise_adapters(adapted(method))
    both = model(IDS, noise_level=LAM)
    for i in range(2):
        one = model(IDS[i:i + 1], noise_level=LAM[i:i + 1])
        assert torch.allclose(both[i], one[0], atol=tolerance(both))   # same math, another batch size
    if method in adapters.NOISE_AWARE:                                        # λ really changes the output
        swapped = model(IDS, noise_level=LAM.flip(0))
        assert not torch.allclose(both, swapped, atol=1e-4)
        with pytest.raises(ValueError, match="noise_level"):
            model(IDS)


def test_multi_lora_bins_follow_ceil_lambda_k():
    layer = adapted("multi-lora").transformer.blocks[0].q_proj
    lam = torch.tensor([0.0, 0.2, 0.2001, 0.6, 1.0])
    A, _, _ = layer.factors({"lam": lam})
    expect = [0, 0, 1, 2, 4]   # ceil(λ·5) clamped to [1, 5], minus 1
    for i, k in enumerate(expect):
        assert torch.equal(A[i], layer.lora_A[k])


@pytest.mark.parametrize("method", LOW_RANK)
def test_merge_at_lambda_equals_the_unmerged_forward(method):
    model = randomise_adapters(adapted(method))
    lam = 0.35
    expect = model(IDS, noise_level=torch.full((2,), lam))
    cond = adapters.cond_at(model, lam)
    deltas = {n: m.merged_weight(cond) - m.weight.float() for n, m in model.named_modules()
              if isinstance(m, nara.LoRALinear)}
    assert len(deltas) == 8 and all(d.abs().max() > 0 for d in deltas.values())
    adapters.merge(model, lam)
    assert not any(p.requires_grad for p in model.parameters()) and len(model.noise_nets) == 0
    # (W0 + ΔW) x against W0 x + ΔW x: the same sums in another order, fp32 rounding only
    assert torch.allclose(model(IDS), expect, atol=tolerance(expect))


def test_hypernetwork_is_the_authors():
    h = nara.Hypernetwork(r=4)
    assert h.W.shape == (1, 32) and "W" in h.state_dict() and not h.W.requires_grad
    assert 10 < h.W.std() < 24                                             # N(0, 16²)
    lam = torch.tensor([0.3])
    seen = []
    h.net[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    h(lam)
    assert torch.allclose(seen[0], torch.cat([torch.sin(0.3 * h.W), torch.cos(0.3 * h.W)], -1))   # no 2π
    assert torch.equal(h(lam), torch.eye(4)[None])                        # C = I at init
    with torch.no_grad():
        h.net[-1].bias.copy_(torch.arange(16.0))
    M = torch.arange(16.0).view(4, 4)                                     # the authors' row-major view
    assert torch.allclose(h(lam)[0], torch.eye(4) + 0.1 * M.T)            # C reads F column-major: C = Mᵀ
    for emb, width in [("mlp", 64), ("raw", 1)]:
        assert ablations.Hypernetwork(4, embedding=emb).net[0].in_features == width


def test_groups_give_one_hypernetwork_per_group():
    model = adapted("nara", groups={"qk": ("q_proj", "k_proj"), "vo": ("v_proj", "attn_out")})
    assert sorted(model.noise_nets) == ["nara_qk", "nara_vo"]
    blocks = model.transformer.blocks
    assert blocks[1].k_proj.key == "nara_qk" and blocks[0].attn_out.key == "nara_vo"
    with pytest.raises(ValueError, match="cover the targets"):
        adapted("nara", groups={"qk": ("q_proj", "k_proj")})


def test_dora_is_magnitude_times_normalised_direction():
    model = randomise_adapters(adapted("dora"))
    layer = model.transformer.blocks[0].v_proj
    V = layer.weight + layer.lora_B @ layer.lora_A
    expect = layer.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    assert torch.allclose(layer.merged_weight({"lam": None}), expect, atol=1e-5)


# ------------------------------------------------------------------ add_adapters errors
def test_add_adapters_errors_and_printout(capsys):
    model = random_model()
    with pytest.raises(ValueError, match="matches no linear layer; available: attn_out, ff_out, ff_proj"):
        nara.add_adapters(model, "lora", targets=("o_proj",))
    with pytest.raises(ValueError, match="method='qlora'"):
        nara.add_adapters(model, "qlora")
    nara.add_adapters(model, "lora", r=2, targets=("ff_out",))
    out = capsys.readouterr().out
    assert "adapted 2 layers" in out and "trainable 768 of" in out       # block MLPs only, not the LM head
    assert type(model.transformer.ff_out).__name__ == "Linear"
    with pytest.raises(ValueError, match="already has lora adapters"):
        nara.add_adapters(model, "nara")


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("method", nara.METHODS)
def test_adapter_save_load_round_trip_is_exact(tmp_path, method):
    model = randomise_adapters(adapted(method))
    interop.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    again = interop.load_adapter(random_model(), tmp_path, verbose=False).eval()
    assert torch.equal(again(IDS, noise_level=LAM), model(IDS, noise_level=LAM))


def test_adapter_into_a_different_model_fails_clearly(tmp_path):
    interop.save_adapter(adapted("nara"), tmp_path)
    with pytest.raises(ValueError, match="different shapes"):
        interop.load_adapter(random_model(LLaDAConfig.tiny(d_model=32)), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "method": "lora"}))
    with pytest.raises(ValueError, match=r"\(lora adapters\): unexpected key 'noise_nets.nara"):
        interop.load_adapter(random_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match="has shape"):
        interop.load_adapter(random_model(), tmp_path)


@pytest.mark.parametrize("method", ["lora", "nara", "multi-lora"])
def test_peft_export_loads_back_to_the_same_output(tmp_path, method):
    model = randomise_adapters(adapted(method, alpha=8 if method == "lora" else None))
    lam = 0.7
    interop.export_peft(model, tmp_path, lam=lam)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight" in keys and len(keys) == 16
    lora = interop.load_peft(random_model(), tmp_path, verbose=False).eval()
    expect = model(IDS, noise_level=torch.full((2,), lam))                # B C A as (B C) A: another order
    assert torch.allclose(lora(IDS), expect, rtol=0, atol=tolerance(expect))
    if method != "lora":
        with pytest.raises(ValueError, match="pass lam="):
            interop.export_peft(model, tmp_path)


# ------------------------------------------------------------------ Theorem 4.1
def family(N, r, d_out, d_in, seed):
    """N updates whose joint column and row spaces both have dimension exactly r."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    Q = torch.randn(d_in, r, generator=g, dtype=torch.float64)
    return [P @ torch.randn(r, r, generator=g, dtype=torch.float64) @ Q.T for _ in range(N)]


@pytest.mark.parametrize("N, r, d_out, d_in",
                         [(1, 3, 10, 12), (5, 4, 16, 9), (8, 6, 20, 30), (3, 16, 40, 24)])
def test_theorem_4_1_reconstructs_to_float64_precision(N, r, d_out, d_in):
    updates = family(N, r, d_out, d_in, seed=N + r)
    B, A, C = nara.decompose(updates, r)
    assert B.shape == (d_out, r) and A.shape == (r, d_in) and len(C) == N
    assert torch.allclose(B.T @ B, torch.eye(r, dtype=torch.float64), atol=1e-12)
    for Ci, W in zip(C, updates):
        assert (B @ Ci @ A - W).abs().max() < 1e-12 * W.abs().max() * d_out
    B2, A2, C2 = nara.decompose(updates, r + 3)                            # slack in r is fine
    assert all(torch.allclose(B2 @ c @ A2, w, atol=1e-10) for c, w in zip(C2, updates))


def test_theorem_4_1_refuses_joint_rank_above_r():
    updates = family(4, 5, 12, 12, seed=1)
    extra = torch.zeros(12, 12, dtype=torch.float64)
    extra[0, 0] = 1.0   # pushes the joint rank to 6 (generic)
    with pytest.raises(ValueError, match="dimension 6 > r = 5"):
        nara.decompose(updates + [updates[0] + extra], 5)
    nara.decompose(updates + [updates[0] + extra], 6)


def test_theorem_4_1_with_r_above_the_width_pads_b_and_a_with_zeros():
    updates = family(3, 2, 4, 5, seed=3)                                  # joint rank 2, width 4 x 5
    B, A, C = nara.decompose(updates, 7)                                  # r = 7 > d_out, d_in
    assert B.shape == (4, 7) and A.shape == (7, 5) and C[0].shape == (7, 7)
    assert B[:, 4:].abs().max() == 0 and A[5:].abs().max() == 0           # no basis past U's width
    assert all(torch.allclose(B @ c @ A, w, atol=1e-12) for c, w in zip(C, updates))


def test_theorem_4_1_at_llada_width_needs_only_thin_svd_factors(monkeypatch):
    """The SVD factors decompose asks for, sized on the meta device at LLaDA's width (d = 4096, N = 5,
    float64): thin ones, 0.75 GiB per side, where full_matrices=True would add an (N·d)² factor, 3.4 GB."""
    calls, svd = [], torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda M, **k: calls.append(k) or svd(M, **k))
    nara.decompose(family(5, 3, 12, 10, seed=0), 3)
    assert len(calls) == 2
    for k in calls:
        factors = svd(torch.empty(4096, 5 * 4096, dtype=torch.float64, device="meta"), **k)
        gib = sum(f.numel() * f.element_size() for f in factors) / 2**30
        assert gib < 0.8, gib


def test_five_bin_multi_lora_is_a_rank_5r_nara_layer():
    """Each bin's LoRA B_k A_k has rank r, so the five updates fit exactly in one NaRA layer of rank
    5r with static B, A and one core per bin (what a hypernetwork has to output at that λ)."""
    model = randomise_adapters(adapted("multi-lora"))
    layer = model.transformer.blocks[0].q_proj                            # r = 4, K = 5
    updates = [layer.lora_B[k].detach().double() @ layer.lora_A[k].detach().double() for k in range(5)]
    B, A, C = nara.decompose(updates, 20)
    with pytest.raises(ValueError):
        nara.decompose(updates, 19)
    single = nara.NaRALinear(layer, r=20, dropout=0.0, key="core")
    with torch.no_grad():
        single.lora_A.copy_(A)
        single.lora_B.copy_(B)
    x = torch.randn(1, 6, 64)
    layer.dropout.p = 0.0
    for k, lam in enumerate([0.1, 0.3, 0.5, 0.7, 0.9]):
        multi = layer(x, {"lam": torch.tensor([lam])})
        ours = single(x, {"core": C[k].float()})
        # the float64 construction stored in fp32 (one rounding of B, A and C) and another order of sums
        assert torch.allclose(multi, ours, atol=tolerance(multi))


def test_activation_checkpointing_keeps_the_hypernetwork_gradient():
    grads = []
    for ckpt in (False, True):
        model = randomise_adapters(adapted("nara", dropout=0.0)).train()
        model.gradient_checkpointing = ckpt
        model(IDS, noise_level=LAM).square().mean().backward()
        grads.append(model.noise_nets["nara"].net[0].weight.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_theorem_4_1_by_training():
    """Fitting 5 targets of joint rank r = 4 (benchmarks/theorem.py): static LoRA stalls at the
    theorem's floor (the best single matrix for the family); NaRA, with a hypernetwork of about
    LoRA's size, fits them; Multi-LoRA does too with one bin per λ, at 5 times the parameters.
    With joint rank r + 1, NaRA's rank-r error stays above the Eckart-Young bound."""
    from benchmarks.theorem import family, fit, rank_bound, static_floor
    targets = family(4)
    floor = static_floor(targets)
    lora, n_lora = fit("lora", targets)
    ours, n_nara = fit("nara", targets)
    multi, n_multi = fit("multi-lora", targets)
    assert floor > 0.5 and floor - 1e-4 <= lora[-1] <= 1.01 * floor
    assert ours[-1] < 1e-3 * floor and n_nara < 1.6 * n_lora
    assert multi[-1] < 1e-2 * floor and n_multi == 5 * n_lora
    wider = family(5)
    bound = rank_bound(wider, 4)
    assert bound > 0.05 and fit("nara", wider)[0][-1] >= bound


def test_adapters_follow_the_mode_of_the_model_they_join(tmp_path):
    model = random_model().eval()
    nara.add_adapters(model, "nara", r=4, verbose=False)
    assert not any(m.training for m in model.modules())                 # no dropout in an evaluated model
    interop.save_adapter(randomise_adapters(model), tmp_path)
    loaded = interop.load_adapter(random_model().eval(), tmp_path, verbose=False)
    assert torch.equal(loaded(IDS, noise_level=LAM), loaded(IDS, noise_level=LAM))
    assert torch.equal(loaded(IDS, noise_level=LAM), model(IDS, noise_level=LAM))
