import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import REFERENCE, random_model, rank, tolerance, train_tokenizer
from safetensors.torch import load_file, save_file

import nara
import extras  # noqa: F401  (the other methods)
from extras.files import save_pretrained
from extras.tasks import chat_ids, chat_text, load_tokenizer, sft_pair
from model import LLaDA, LLaDAConfig, apply_rope, rope_table


# ------------------------------------------------------------------ the real checkpoint's metadata
def test_real_config_gives_the_defaults_and_the_real_key_table():
    config = LLaDAConfig.from_json(REFERENCE / "config.json")
    assert config == LLaDAConfig()
    with torch.device("meta"):
        model = LLaDA(config)
    index = json.loads((REFERENCE / "model.safetensors.index.json").read_text())
    shapes = model.base_shapes()
    assert set(shapes) == set(index["weight_map"]) and len(shapes) == 291
    assert sum(math.prod(s) for s in shapes.values()) == 8_015_581_184
    assert sum(math.prod(s) * 2 for s in shapes.values()) == index["metadata"]["total_size"]


# ------------------------------------------------------------------ an independent reference
def numpy_llada(sd, cfg, ids, key_keep=None):
    """LLaDA's forward from docs/architecture.md alone, in float64 numpy (per-head loops, explicit pairs)."""
    W = {k: v.double().numpy() for k, v in sd.items()}
    hs, nh, nkv = cfg.d_model // cfg.n_heads, cfg.n_heads, cfg.n_kv_heads
    L = ids.shape[0]

    def rms(x, w):
        return w * (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps))

    def rope(v, pos):                      # pairs (i, i + hs/2) rotated by pos * theta^(-2i/hs)
        out = v.copy()
        for i in range(hs // 2):
            a = pos * cfg.rope_theta ** (-2 * i / hs)
            out[i] = v[i] * math.cos(a) - v[i + hs // 2] * math.sin(a)
            out[i + hs // 2] = v[i + hs // 2] * math.cos(a) + v[i] * math.sin(a)
        return out

    x = W["transformer.wte.weight"][ids]
    for b in range(cfg.n_layers):
        p = lambda name: W[f"transformer.blocks.{b}.{name}.weight"]  # noqa: E731
        h = rms(x, p("attn_norm"))
        q, k, v = h @ p("q_proj").T, h @ p("k_proj").T, h @ p("v_proj").T
        att = np.zeros_like(q)
        for head in range(nh):
            kvh = head // (nh // nkv)
            qs = np.stack([rope(q[i, head * hs:(head + 1) * hs], i) for i in range(L)])
            ks = np.stack([rope(k[j, kvh * hs:(kvh + 1) * hs], j) for j in range(L)])
            s = qs @ ks.T / math.sqrt(hs)
            if key_keep is not None:
                s[:, ~key_keep] = -np.inf
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            att[:, head * hs:(head + 1) * hs] = w @ v[:, kvh * hs:(kvh + 1) * hs]
        x = x + att @ p("attn_out").T
        h = rms(x, p("ff_norm"))
        g, u = h @ p("ff_proj").T, h @ p("up_proj").T
        x = x + (g / (1 + np.exp(-g)) * u) @ p("ff_out").T
    return rms(x, W["transformer.ln_f.weight"]) @ W["transformer.ff_out.weight"].T


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_logits_match_an_independent_float64_reference(n_kv_heads):
    cfg = LLaDAConfig.tiny(n_kv_heads=n_kv_heads, rope_theta=10.0)   # small theta: rotations matter
    model = random_model(cfg)
    ids = torch.tensor([[3, 17, 99, 5, 42, 7, 64]])
    ours = model(ids)[0].detach().double().numpy()
    ref = numpy_llada(model.state_dict(), cfg, ids[0].numpy())
    assert np.abs(ours - ref).max() < 2e-4 * np.abs(ref).max()


def test_hand_sized_golden_value():
    """d=2, one head, one layer, identity-ish weights: the logits follow by hand from the formulas."""
    cfg = LLaDAConfig.tiny(d_model=2, n_heads=1, n_kv_heads=1, n_layers=1, mlp_hidden_size=1,
                           vocab_size=2, embedding_size=2, mask_token_id=1, eos_token_id=0, pad_token_id=0)
    model = LLaDA(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name in ("attn_norm", "ff_norm"):
            getattr(model.transformer.blocks[0], name).weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wte.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        model.transformer.ff_out.weight.copy_(torch.eye(2))
    # attention and MLP outputs are zero (zero weights), so logits = RMSNorm(wte[id]):
    # [3, 4] / sqrt((9 + 16) / 2 + 1e-5) and [1, 0] / sqrt(1/2 + 1e-5)
    out = model(torch.tensor([[0, 1]]))[0]
    expect = torch.tensor([[3 / math.sqrt(12.5 + 1e-5), 4 / math.sqrt(12.5 + 1e-5)],
                           [1 / math.sqrt(0.5 + 1e-5), 0.0]])
    assert torch.allclose(out, expect, atol=1e-6)


def test_rope_depends_only_on_relative_position():
    sin, cos = rope_table(64, 16, 500000.0, "cpu")
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 64, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 64, 16)
    rq, rk = apply_rope(q, sin, cos)[0, 0], apply_rope(k, sin, cos)[0, 0]
    for m, n in [(5, 2), (40, 37), (63, 60)]:
        assert torch.allclose(rq[m] @ rk[n], rq[3] @ rk[0], atol=1e-4)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[0], atol=1e-3)


# ------------------------------------------------------------------ padding
def test_all_ones_mask_is_exactly_no_mask_and_left_padding_is_ignored():
    cfg = LLaDAConfig.tiny()
    model = random_model(cfg)
    ids = torch.tensor([[5, 9, 33, 8]])
    assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), model(ids))
    pad = cfg.pad_token_id
    padded = torch.tensor([[pad, pad, 5, 9, 33, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    expect = model(ids)[0]                     # 2 more keys, masked: the same numbers, other sums
    assert torch.allclose(model(padded, attention_mask=mask)[0, 2:], expect, atol=tolerance(expect))
    assert not torch.allclose(model(padded)[0, 2:], model(ids)[0], atol=1e-3)   # the mask matters


def test_bf16_forward_runs_in_bf16_and_bad_shapes_are_refused():
    model = random_model().to(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert model(ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]])).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="noise_level"):
        model(ids, noise_level=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = random_model()
        model.train().gradient_checkpointing = ckpt
        model(torch.tensor([[1, 2, 3, 4]])).square().mean().backward()
        grads.append(model.transformer.blocks[0].q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------ loading and saving
def test_load_real_layout_in_fp32_and_bf16(tiny_checkpoint):
    path, source = tiny_checkpoint
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    expect = LLaDA(source.config)
    expect.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in source.state_dict().items()})
    model = LLaDA.from_pretrained(path)
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(model(ids), expect(ids))
    model16 = LLaDA.from_pretrained(path, dtype=torch.bfloat16)
    assert model16(ids).dtype == torch.bfloat16
    assert torch.equal(model16(ids), expect.to(torch.bfloat16)(ids))


@pytest.mark.parametrize("max_shard_bytes", [2**30, 20_000])
def test_save_then_load_is_exact(tmp_path, max_shard_bytes):
    model = random_model()
    save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 2**30)
    assert not list(tmp_path.glob(".*tmp*"))
    again = LLaDA.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    save_pretrained(model, tmp_path)                      # re-save as one file: the stale index goes
    assert not (tmp_path / "model.safetensors.index.json").exists()
    LLaDA.from_pretrained(tmp_path)


def _edit_index(path, fn):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    fn(index)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_shard(path, name, fn):
    tensors = load_file(str(path / name))
    fn(tensors)
    save_file(tensors, str(path / name), metadata={"format": "pt"})


WTE = "model.transformer.wte.weight"
SHARD1 = "model-00001-of-00006.safetensors"


@pytest.mark.parametrize("damage, error, words", [
    (lambda p: shutil.rmtree(p), FileNotFoundError, "model directory not found"),
    (lambda p: (p / "config.json").unlink(), FileNotFoundError, "config.json: config file not found"),
    (lambda p: (p / "config.json").write_text("{oops"), ValueError, "config.json: invalid JSON"),
    (lambda p: (p / "model.safetensors.index.json").write_text("[1,"), ValueError,
     "index.json: invalid JSON"),
    (lambda p: (p / SHARD1).unlink(), FileNotFoundError, f"{SHARD1}: shard listed"),
    (lambda p: _edit_index(p, lambda i: i["weight_map"].pop(WTE)), ValueError,
     f"index.json: key '{WTE}' is missing"),
    (lambda p: _edit_index(p, lambda i: i["weight_map"].update({"model.extra.weight": SHARD1})),
     ValueError, "index.json: unexpected key 'model.extra.weight'"),
    (lambda p: _edit_shard(p, SHARD1, lambda t: t.pop(WTE)), ValueError, f"{SHARD1}: key '{WTE}' is missing"),
    (lambda p: _edit_shard(p, SHARD1, lambda t: t.update({"model.stray": torch.zeros(1)})),
     ValueError, f"{SHARD1}: unexpected key 'model.stray'"),
    (lambda p: _edit_shard(p, SHARD1, lambda t: t.update({WTE: torch.zeros(128, 65)})),
     ValueError, f"{SHARD1}: {WTE} has shape \\(128, 65\\), expected \\(128, 64\\)"),
    (lambda p: _edit_index(p, lambda i: i["metadata"].update(total_size=12)), ValueError, "total_size=12"),
])
def test_bad_checkpoints_give_errors_naming_the_file_and_key(tiny_checkpoint, damage, error, words):
    path, _ = tiny_checkpoint
    damage(path)
    with pytest.raises(error, match=words):
        LLaDA.from_pretrained(path)


@pytest.mark.parametrize("key, value", [("block_type", "sequential"), ("alibi", True), ("include_bias", True),
                                        ("attention_layer_norm", True), ("weight_tying", True),
                                        ("layer_norm_type", "default"), ("activation_type", "gelu"),
                                        ("residual_dropout", 0.1), ("scale_logits", True)])
def test_unsupported_switches_are_refused_by_name(tmp_path, key, value):
    raw = json.loads((REFERENCE / "config.json").read_text())
    raw[key] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        LLaDAConfig.from_json(tmp_path / "config.json")


def test_bad_config_values_are_refused(tmp_path):
    raw = json.loads((REFERENCE / "config.json").read_text())
    for change, words in [({"n_kv_heads": 5}, "not divisible by n_kv_heads=5"),
                          ({"mask_token_id": 999999}, "mask_token_id=999999"),
                          ({"d_model": None}, "d_model")]:
        (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(ValueError, match=words):
            LLaDAConfig.from_json(tmp_path / "config.json")
    del raw["mask_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'mask_token_id' is missing"):
        LLaDAConfig.from_json(tmp_path / "config.json")


# ------------------------------------------------------------------ tokenizer and chat template
def test_chat_template_renders_the_instruct_format():
    messages = [{"role": "user", "content": " Hi there \n"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]
    assert chat_text(messages) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_trained_tokenizer_round_trips_and_builds_sft_pairs(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "Answer: 42", "solution1 or solution2?"] * 20
    train_tokenizer(tmp_path, texts)
    tok = load_tokenizer(tmp_path)
    for text in texts[:3] + ["ünïcödé and 123,456 $"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    ids = chat_ids(tok, [{"role": "user", "content": "Answer: 42"}])
    bos, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|eot_id|>")
    assert ids[0] == bos and ids.count(bos) == 1 and eot in ids
    assert tok.decode(ids, skip_special_tokens=False) == chat_text([{"role": "user", "content": "Answer: "
                                                                                                "42"}])
    eos = tok.token_to_id("<|endoftext|>")
    prompt, answer = sft_pair(tok, "Answer: 42", "solution1", eos)
    assert prompt == ids and answer[-1] == eos and tok.decode(answer[:-1]) == "solution1"
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize("method", ["nara", "hira", "dora", "p-tuning"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputing_cheap_ops_changes_no_bit_of_the_loss_or_gradients(method, dtype):
    """Norms, SiLU and the adapters' dropout recomputed in backward (model.recompute, the default)
    against keeping every intermediate: the same loss and gradients, bit for bit, with dropout on."""
    from diffusion import sft_loss
    results = []
    for recompute in (True, False):
        model = random_model()
        nara.add_adapters(model, method, verbose=False, **rank(method, 4))
        model.to(dtype).train()
        model.recompute = recompute
        torch.manual_seed(3)
        ids = torch.randint(0, 120, (3, 12))
        answer = torch.arange(12).expand(3, 12) >= 4
        loss, _ = sft_loss(model, ids, answer)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                        torch.rand(1)))                                    # the RNG is where it would be
    (l1, g1, r1), (l2, g2, r2) = results
    assert torch.equal(l1, l2) and torch.equal(r1, r2) and g1.keys() == g2.keys()
    assert all(torch.equal(g1[n], g2[n]) for n in g1), [n for n in g1 if not torch.equal(g1[n], g2[n])]
