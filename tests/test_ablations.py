"""The paper's other baselines and ablation switches: Prompt Tuning, P-Tuning, noise-density
conditioning, the hypernetwork's switches, two-stage training, and the authors' own C convention
and checkpoints (their formula re-stated here, independently of nara.py)."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT, random_model, rank, tolerance

import nara
from diffusion import generate, sft_loss
from extras import ablations, adapters, baselines, interop
from model import LLaDA, LLaDAConfig

IDS = torch.tensor([[5, 9, 33, 8, 71, 2], [1, 4, 100, 3, 3, 60]])
LAM = torch.tensor([0.15, 0.85])
MASK = LLaDAConfig.tiny().mask_token_id


def adapted(method, seed=0, **kw):
    model = random_model(seed=seed)
    torch.manual_seed(seed + 1)
    nara.add_adapters(model, method, verbose=False, **rank(method, 4), **kw)
    return model.eval()


# ------------------------------------------------------------------ the authors' C convention
def test_a_layer_with_a_non_symmetric_core_gives_the_authors_output():
    """Hand-set A, B and F = (1, 2, 3, 4): the authors compute W0 x + ((x Aᵀ) M) Bᵀ with
    M = I + η F.view(2, 2) = [[1.1, 0.2], [0.3, 1.4]] (row-major); ΔW = B C A with C = Mᵀ."""
    model = adapted("nara", dropout=0.0)
    model.noise_nets["nara"] = nara.Hypernetwork(2)
    layer = nara.NaRALinear(model.transformer.blocks[0].q_proj, r=2, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_A[0, 0], layer.lora_A[1, 1] = 1.0, 1.0                 # A x = (x0, x1)
        layer.lora_B.zero_()
        layer.lora_B[0, 0], layer.lora_B[1, 1] = 1.0, 1.0                 # B h = (h0, h1, 0, ...)
        model.noise_nets["nara"].net[-1].bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.zeros(1, 1, 64)
    x[0, 0, 0], x[0, 0, 1] = 1.0, 10.0
    cond = model.conditioning(torch.tensor([0.5]))
    out = layer(x, cond) - x @ layer.weight.T
    # row vector (1, 10) @ M = (1.1 + 3.0, 0.2 + 14.0) = (4.1, 14.2)
    assert torch.allclose(out[0, 0, :2], torch.tensor([4.1, 14.2])) and out[0, 0, 2:].abs().max() == 0
    assert torch.allclose(cond["nara"][0], torch.tensor([[1.1, 0.3], [0.2, 1.4]]))   # C = Mᵀ
    assert torch.allclose(layer.merged_weight(cond) - layer.weight,
                          layer.lora_B @ cond["nara"][0] @ layer.lora_A)


# ------------------------------------------------------------------ noise density
def test_mask_density_by_hand():
    masked = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 0], [0] * 8]).bool()
    # radius 2: position 1 sees 0, 2, 3 (1 of 3 masked), 2 sees 0, 1, 3, 4 (2/4), 4 sees 2, 3, 5, 6 (1/4)
    assert torch.allclose(ablations.mask_density(masked, radius=2),
                          torch.tensor([(1 / 3 + 1 / 2 + 1 / 4) / 3, 0.0]))
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 0] = False   # padding is not a neighbour: 1 sees 2, 3; 2 sees 1, 3, 4
    assert torch.allclose(ablations.mask_density(masked, valid, radius=2)[0],
                          torch.tensor((1 / 2 + 2 / 3 + 1 / 4) / 3))


@pytest.mark.parametrize("condition, width", [("density", 64), ("both", 128)])
def test_density_conditioning_reads_the_input_the_model_sees(condition, width):
    model = adapted("nara", signal=condition, radius=2)
    net = model.noise_nets["nara"]
    assert net.net[0].in_features == width
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    spread, clumped = IDS.clone(), IDS.clone()
    spread[:, [1, 3, 5]] = MASK                                           # same λ, other densities
    clumped[:, [3, 4, 5]] = MASK
    lam = torch.full((2,), 0.5)
    a, b = model(spread, noise_level=lam), model(clumped, noise_level=lam)
    assert not torch.allclose(a, b, atol=1e-4)
    density = ablations.mask_density(spread == MASK, radius=2)
    seen = model.conditioning(lam, spread)["nara"]                        # what a forward on spread gets
    assert torch.equal(seen, net(lam, density=density))                  # the input's own density
    with pytest.raises(ValueError, match="needs the input ids"):
        model.conditioning(lam)                                           # no input, no density
    both = torch.cat([spread[:1], clumped[1:]])
    # one density per sequence: the row in a batch of 2 against the batch it came from (other rows)
    assert torch.allclose(model(both, noise_level=lam)[1], b[1], atol=tolerance(b))
    if condition == "density":
        assert torch.allclose(model(spread), a)                           # λ is not read at all


# ------------------------------------------------------------------ the hypernetwork's switches
def test_init_widths_and_embedding_switches():
    lam = torch.tensor([0.2, 0.9])
    assert torch.equal(nara.Hypernetwork(3)(lam), torch.eye(3).expand(2, 3, 3))          # zero_last: C = I
    k = ablations.Hypernetwork(3, init="kaiming")
    assert all(layer.weight.abs().max() > 0 for layer in k.net[::2])
    C = k(lam)
    assert not torch.allclose(C[0], C[1]) and not torch.allclose(C[0], torch.eye(3))
    z = ablations.Hypernetwork(3, init="zero_all")
    assert all(p.abs().max() == 0 for p in z.net.parameters())
    h = ablations.Hypernetwork(4, width=16, hidden=(32, 8))
    assert h.W.shape == (1, 8) and [l.out_features for l in h.net[::2]] == [32, 8, 16]
    m = ablations.Hypernetwork(4, embedding="mlp", width=16)
    assert m.net[0].in_features == 16 and m.encode(lam).shape == (2, 16)
    assert sum(p.numel() for p in nara.Hypernetwork(8).parameters()) == 181_056   # authors' r = 8
    with pytest.raises(ValueError, match="signal='time': choose one of lambda, density, both"):
        nara.add_adapters(random_model(), "nara", signal="time")


def test_freeze_parts_and_warm_start_from_a_lora(tmp_path):
    lora = adapted("lora")
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    interop.save_adapter(lora, tmp_path / "lora")
    interop.export_peft(lora, tmp_path / "peft")
    for source in ("lora", "peft"):
        model = adapted("nara")
        ablations.warm_start(model, tmp_path / source)
        expect = lora(IDS)                                  # C = I: the LoRA, with a (C − I) term of zeros
        assert torch.allclose(model(IDS, noise_level=LAM), expect, atol=tolerance(expect))
    ablations.freeze(model, ["A", "hypernetwork"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".lora_B") for n in trainable)
    with pytest.raises(ValueError, match="has shape"):
        ablations.warm_start(_rank(2), tmp_path / "lora")
    with pytest.raises(ValueError, match="freeze 'C'"):
        ablations.freeze(model, ["C"])


def _rank(r):
    model = random_model()
    nara.add_adapters(model, "nara", r=r, verbose=False)
    return model


def test_sampling_lambda_over_the_answer_or_the_whole_sequence():
    seen = []

    class Spy(torch.nn.Module):
        config = LLaDAConfig.tiny()

        def forward(self, x, attention_mask=None, noise_level=None, logits_at=None):
            seen.append((x.clone(), noise_level.clone()))
            logits = torch.zeros(x.shape[0], x.shape[1], 128)
            logits[..., 7] = 1.0
            return logits[:, logits_at]
    for over, den in (("answer", 8), ("sequence", 3 + 8)):
        seen.clear()
        generate(Spy(), torch.tensor([[1, 2, 3]]), steps=4, gen_length=8, block_length=4, lam_over=over)
        assert [float(l) for _, l in seen] == pytest.approx([float((x == MASK).sum()) / den for x, _ in seen])
    assert seen[0][1].item() == pytest.approx(8 / 11)                    # never 1 with the prompt counted


# ------------------------------------------------------------------ Prompt Tuning and P-Tuning
def test_virtual_tokens_parameter_counts_at_8b():
    for method, count in (("prompt-tuning", 20 * 4096), ("p-tuning", 20 * 4096 + 3 * 4096 * 4096 + 3 * 4096)):
        with torch.device("meta"):
            model = LLaDA(LLaDAConfig())
        nara.add_adapters(model, method, virtual_tokens=20, verbose=False)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert count == 50_425_856


def test_prompt_tuning_starts_from_a_text_and_its_logits_cover_the_real_tokens_only():
    model = adapted("prompt-tuning", virtual_tokens=5, prompt_init=[7, 8, 9])
    assert torch.equal(model.prompt.embedding, model.transformer.wte.weight[[7, 8, 9, 7, 8]])
    assert model(IDS).shape == (2, 6, 128)
    sel = torch.zeros(2, 6, dtype=torch.bool)
    sel[0, 2], sel[1, 5] = True, True
    full = model(IDS)                          # the head on other shapes: the same numbers, other sums
    assert torch.allclose(model(IDS, logits_at=sel), full[sel], atol=tolerance(full))
    assert torch.allclose(model(IDS, logits_at=slice(2, 4)), full[:, 2:4], atol=tolerance(full))


@pytest.mark.parametrize("method", PROMPT)
def test_virtual_tokens_change_the_output_only_through_attention(method, monkeypatch):
    """At init the real tokens attend to the virtual ones, so the logits differ from the base; with
    the virtual tokens hidden as keys the base comes back: moving every real position by n does
    nothing, since RoPE only sees relative positions."""
    base, model = random_model(), adapted(method, virtual_tokens=3)
    assert not torch.allclose(model(IDS), base(IDS), atol=1e-3)
    insert = baselines.VirtualTokens.forward

    def hidden(self, x, pad):
        x, pad, real = insert(self, x, pad)
        keys = torch.ones(x.shape[:2], dtype=torch.bool)
        keys.scatter_(1, real, False)                                     # True at the virtual positions
        return x, keys, real
    monkeypatch.setattr(baselines.VirtualTokens, "forward", hidden)
    expect = base(IDS)                         # n more keys, all hidden: the same numbers, other sums
    assert torch.allclose(model(IDS), expect, atol=tolerance(expect))


@pytest.mark.parametrize("method", PROMPT)
def test_virtual_tokens_train_never_get_masked_and_keep_batches_exact(method):
    model = adapted(method, virtual_tokens=3).train()
    answer = torch.arange(6).expand(2, 6) >= 2
    loss, _ = sft_loss(model, IDS, answer)
    loss.backward()
    assert model.prompt.embedding.grad.abs().max() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prompt."))
    # A padded row is another shape than the row alone: in float64 their logits agree to ~1e-15, so the
    # greedy tokens agree on any kernel path (in fp32 a near-tie between two candidates could flip one)
    model.double().eval()
    a, b = [5, 6, 7, 8, 9], [10, 11]
    batch = torch.tensor([a, [125] * 3 + b])
    mask = torch.tensor([[1] * 5, [0] * 3 + [1] * 2])
    out = generate(model, batch, attention_mask=mask, steps=8, gen_length=8, block_length=4)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], batch) and not (out == MASK).any()
    assert torch.equal(out[0], generate(model, torch.tensor([a]), steps=8, gen_length=8, block_length=4)[0])
    alone = generate(model, torch.tensor([b]), steps=8, gen_length=8, block_length=4)[0]
    assert torch.equal(out[1, 3:], alone)
    with pytest.raises(ValueError, match="nothing to merge"):
        adapters.merge(model, 0.5)


# ------------------------------------------------------------------ the authors' checkpoints
def authors_dir(tmp_path, model_config, mode="nl", groups=None, seed=0):
    """A directory laid out like the authors' PeftModel.save_pretrained: adapter_config.json
    (their NARAConfig fields) and adapter_model.bin (torch.save of their stripped key names)."""
    g = torch.Generator().manual_seed(seed)
    r, d, hid = 2, model_config.d_model, (6, 5)
    body = {"peft_type": "NARA", "r_ab": r, "lora_alpha": 32, "lora_dropout": 0.05,
            "scale_ab": 0.5, "c_scale": 0.1,
            "fnn_hidden_size_1": hid[0], "fnn_hidden_size_2": hid[1], "embedding_dim": 8,
            "embedding_type": "fourier", "input_mode": mode,
            "density_radius": 3 if mode in ("nd", "both") else None, "init_c": "zero_last",
            "target_modules": ["q_proj", "v_proj"], "mapper_groups": groups, "bias": "none",
            "fan_in_fan_out": False, "modules_to_save": None,
            "base_model_name_or_path": "GSAI-ML/LLaDA-8B-Instruct", "inference_mode": True}
    t = {}
    for i in range(model_config.n_layers):
        for name in ("q_proj", "v_proj"):
            t[f"base_model.model.model.transformer.blocks.{i}.{name}.lora_A"] = torch.randn(r, d, generator=g)
            t[f"base_model.model.model.transformer.blocks.{i}.{name}.lora_B"] = torch.randn(d, r, generator=g)
    if mode == "constant":
        t["base_model.constant_c"] = torch.randn(r, r, generator=g)
    else:
        width = 8 * (2 if mode == "both" else 1)
        for prefix in ([f"{k}." for k in groups] if groups else [""]):
            for j, (a, b) in enumerate(zip([width, *hid], [*hid, r * r])):
                key = f"base_model.global_mapper.{prefix}model.{2 * j}"
                t[key + ".weight"] = torch.randn(b, a, generator=g) * 0.5
                t[key + ".bias"] = torch.randn(b, generator=g) * 0.5
        for short in {"nl": ["NL"], "nd": ["ND"], "both": ["NL", "ND"]}[mode]:
            t[f"base_model.embedding_layers.{short}_emb.W"] = torch.randn(1, 4, generator=g) * 16
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(body))
    torch.save(t, tmp_path / "adapter_model.bin")
    return body, t


def authors_layer(x, W0, t, prefix, value_embeddings, scale_ab=0.5, c_scale=0.1, r=2, mapper=""):
    """The authors' NARALinear.forward, re-stated: W0 x + scale_ab · ((x Aᵀ) M) Bᵀ, M = I + c_scale ·
    mapper(e).view(r, r), mapper = Linear, SiLU, Linear, SiLU, Linear, e = [sin(vW), cos(vW)] per input."""
    if value_embeddings is None:
        M = torch.eye(r) + c_scale * t["base_model.constant_c"]
    else:
        e = torch.cat([torch.cat([torch.sin(v * W), torch.cos(v * W)], -1) for v, W in value_embeddings], -1)
        for j in (0, 2, 4):
            e = F.linear(e, t[f"base_model.global_mapper.{mapper}model.{j}.weight"],
                         t[f"base_model.global_mapper.{mapper}model.{j}.bias"])
            e = F.silu(e) if j < 4 else e
        M = torch.eye(r) + c_scale * e.view(r, r)
    A, B = t[f"{prefix}.lora_A"], t[f"{prefix}.lora_B"]
    return x @ W0.T + scale_ab * ((x @ A.T) @ M) @ B.T


@pytest.mark.parametrize("mode, groups", [("nl", None), ("both", None), ("nd", None), ("constant", None),
                                          ("nl", {"q": ["q_proj"], "v": ["v_proj"]})])
def test_the_authors_checkpoint_gives_the_authors_layer_outputs(tmp_path, mode, groups):
    model = random_model()
    body, t = authors_dir(tmp_path, model.config, mode, groups)
    model = interop.load_adapter(model, tmp_path, verbose=False).eval()       # recognised by peft_type NARA
    assert model.adapter_config["method"] == ("nara-c" if mode == "constant" else "nara")
    ids = IDS[:1].clone()
    ids[0, 2:5] = MASK
    lam = 0.3
    density = float(ablations.mask_density(ids == MASK, radius=3)[0])
    cond = adapters.cond_at(model, lam, density=density)
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(5))
    emb = {"nl": [(lam, t.get("base_model.embedding_layers.NL_emb.W"))],
           "nd": [(density, t.get("base_model.embedding_layers.ND_emb.W"))], "constant": None}
    emb["both"] = emb["nl"] + [(density, t.get("base_model.embedding_layers.ND_emb.W"))]
    for i in range(2):
        for name in ("q_proj", "v_proj"):
            layer = model.transformer.blocks[i].get_submodule(name)
            ours = layer(x, cond)
            key = f"base_model.model.model.transformer.blocks.{i}.{name}"
            theirs = authors_layer(x, layer.weight, t, key, emb[mode], mapper=f"{name[0]}." if groups else "")
            assert torch.allclose(ours, theirs, atol=tolerance(theirs)), (i, name)   # another order of sums


def test_authors_checkpoints_with_unsupported_settings_are_refused(tmp_path):
    body, _ = authors_dir(tmp_path, LLaDAConfig.tiny())
    for key, value, words in (("bias", "all", "bias='all' is not supported"),
                              ("input_mode", "nx", "input_mode='nx'"),
                              ("target_modules", ".*proj", "only a list")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**body, key: value}))
        with pytest.raises(ValueError, match=words):
            interop.load_authors(random_model(), tmp_path, verbose=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**body, "r_ab": 3}))
    with pytest.raises(ValueError, match="has shape"):
        interop.load_authors(random_model(), tmp_path, verbose=False)
