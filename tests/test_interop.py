"""Moving adapters and models to and from PEFT and transformers. The file formats and PEFT's rules
are checked here on every run; the round trips through PEFT itself run when peft is installed
(`pip install peft`), and those through transformers' AutoModel with the official remote code in
benchmarks/interop_check.py (README: "Moving adapters to and from PEFT / transformers")."""
import json
import math

import pytest
import torch
from conftest import REFERENCE, random_model, rank, tolerance, write_real_layout
from safetensors import safe_open
from safetensors.torch import save_file

import nara
from benchmarks.interop_check import wrap
from extras import adapters, interop
from extras.files import config_json, save_pretrained
from model import LLaDA, LLaDAConfig, read_json

IDS = torch.tensor([[5, 9, 33, 8, 71, 2], [1, 4, 100, 3, 3, 60]])
# The fields of LoraConfig and PeftConfig in PEFT 0.13.2 (read from its dataclasses): the oldest
# release this project supports rejects any other key in adapter_config.json.
PEFT_0_13_FIELDS = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
                    "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
                    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
                    "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
                    "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora"}


def noisy(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


# ------------------------------------------------------------------ transformers' model directory
def test_config_json_is_the_released_one():
    raw = read_json(REFERENCE / "config.json")
    ours = config_json(LLaDAConfig.from_json(REFERENCE / "config.json"), base=raw, local_code=True)
    assert {k: ours[k] for k in raw} == raw                               # every key and value of the release
    hub = config_json(LLaDAConfig())
    assert hub["architectures"] == ["LLaDAModelLM"]
    assert hub["auto_map"]["AutoModel"] == "GSAI-ML/LLaDA-8B-Instruct--modeling_llada.LLaDAModelLM"


def test_save_pretrained_brings_the_code_and_tokenizer_along(tmp_path):
    source = write_real_layout(random_model(), tmp_path / "src")
    for name in ("configuration_llada.py", "modeling_llada.py", "tokenizer.json", "tokenizer_config.json"):
        (source / name).write_text(f"# {name}\n")
    model = LLaDA.from_pretrained(source)
    merged = adapters.merge(nara.add_adapters(model, "lora", r=2, verbose=False), 0.5)
    save_pretrained(merged, tmp_path / "merged")
    for name in ("configuration_llada.py", "modeling_llada.py", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).read_text() == f"# {name}\n"
    auto_map = read_json(tmp_path / "merged" / "config.json")["auto_map"]
    assert auto_map["AutoModel"] == "modeling_llada.LLaDAModelLM"
    again = LLaDA.from_pretrained(tmp_path / "merged")                     # and it loads here as well
    assert torch.equal(again(IDS), model(IDS))
    bare = random_model()
    save_pretrained(bare, tmp_path / "bare")   # no source: the hub's code by reference
    auto_map = read_json(tmp_path / "bare" / "config.json")["auto_map"]
    assert auto_map["AutoConfig"].startswith("GSAI-ML/LLaDA-8B-Instruct--")


# ------------------------------------------------------------------ PEFT's format, both ways
@pytest.mark.parametrize("method", ["lora", "nara", "multi-lora", "dora", "nara-dora"])
def test_export_writes_only_what_every_peft_knows(tmp_path, method):
    source = write_real_layout(random_model(), tmp_path / "src")
    model = noisy(nara.add_adapters(LLaDA.from_pretrained(source), method, r=4, alpha=8, verbose=False))
    interop.export_peft(model, tmp_path / "out", lam=0.25)
    body = read_json(tmp_path / "out" / "adapter_config.json")
    assert set(body) <= PEFT_0_13_FIELDS and body["peft_type"] == "LORA" and body["task_type"] == "CAUSAL_LM"
    assert body["base_model_name_or_path"] == str(source.resolve()) and body["use_dora"] == ("dora" in method)
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["nara_method"] == method and f.metadata()["nara_noise_level"] == "0.25"
    back = interop.load_peft(LLaDA.from_pretrained(source), tmp_path / "out", verbose=False)
    expect = model(IDS, noise_level=torch.full((2,), 0.25))             # B C A as (B C) A: another order
    assert torch.allclose(back(IDS), expect, rtol=0, atol=tolerance(expect))
    for refused in ("hira", "prompt-tuning"):
        with pytest.raises(ValueError, match="cannot hold it"):
            model = nara.add_adapters(random_model(), refused, verbose=False, **rank(refused, 2))
            interop.export_peft(model, tmp_path / "x")


def peft_dir(directory, model, body, ranks, dora=False, seed=1, suffix=".weight"):
    """A PEFT LoRA directory written by hand: random A (r_i, d_in), B (d_out, r_i) per module name."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name, r in ranks.items():
        W = model.get_submodule(name).weight
        key = f"base_model.model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, W.shape[1], generator=g) * 0.3
        tensors[f"{key}.lora_B.weight"] = torch.randn(W.shape[0], r, generator=g) * 0.3
        if dora:
            tensors[f"{key}.lora_magnitude_vector{suffix}"] = torch.rand(W.shape[0], generator=g) + 0.5
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                               "lora_dropout": 0.0, **body}))
    return tensors


def peft_output(x, W, t, name, scale, dora=False, suffix=".weight"):
    """PEFT's LoRA layer at inference, re-stated: W0 x + s B A x; DoRA: m / ‖W0 + s B A‖_row · (that)."""
    key = f"base_model.model.model.{name}"
    A, B = t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"]
    out = x @ W.T + scale * (x @ A.T) @ B.T
    if dora:
        m = t[f"base_model.model.model.{name}.lora_magnitude_vector{suffix}"]
        out = out * (m / (W + scale * B @ A).norm(dim=1))
    return out


@pytest.mark.parametrize("body, ranks, alphas", [
    ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, {"q_proj": 4, "v_proj": 4},
     {"q_proj": 8, "v_proj": 8}),
    ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_rslora": True}, {"q_proj": 4},
     {"q_proj": 8 / math.sqrt(4) * 4}),
    ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2},
      "alpha_pattern": {"blocks.1.q_proj": 32}}, {"q_proj": 4, "v_proj": 2}, {"q_proj": 8, "v_proj": 8}),
    ({"r": 2, "lora_alpha": 2, "target_modules": r"model\.transformer\.blocks\.1\.(q_proj|attn_out)"},
     {"blocks.1.q_proj": 2, "blocks.1.attn_out": 2}, {"q_proj": 2, "attn_out": 2}),
    ({"r": 2, "lora_alpha": 4, "target_modules": ["k_proj"],
      "exclude_modules": ["transformer.blocks.0.k_proj"]},
     {"blocks.1.k_proj": 2}, {"k_proj": 4}),
])
def test_load_peft_follows_peft_rules(tmp_path, body, ranks, alphas):
    model = random_model()
    names = [n for n, m in model.named_modules() if n.startswith("transformer.blocks.") and
             any(n.endswith("." + k) for k in ranks) and hasattr(m, "weight") and m.weight.dim() == 2]
    per_layer = {n: next(v for k, v in ranks.items() if n.endswith("." + k)) for n in names}
    t = peft_dir(tmp_path, model, body, per_layer)
    loaded = interop.load_peft(random_model(), tmp_path, verbose=False).eval()
    assert {n for n, m in loaded.named_modules() if isinstance(m, nara.LoRALinear)} == set(names)
    x = torch.randn(1, 3, 64)
    for n in names:
        r = per_layer[n]
        alpha = 32 if (n.endswith("blocks.1.q_proj") and "alpha_pattern" in body) else next(
            v for k, v in alphas.items() if n.endswith(k))
        scale = alpha / (math.sqrt(r) if body.get("use_rslora") else r)
        if body.get("use_rslora"):
            scale = 8 / math.sqrt(4)
        got = loaded.get_submodule(n)(x, {"lam": None})
        expect = peft_output(x, model.get_submodule(n).weight, t, n, scale)   # PEFT's order of sums
        assert torch.allclose(got, expect, atol=tolerance(expect)), n


@pytest.mark.parametrize("suffix", [".weight", ""])
def test_peft_dora_loads_as_our_dora(tmp_path, suffix):
    model = random_model()
    names = ["transformer.blocks.0.v_proj", "transformer.blocks.1.v_proj"]
    t = peft_dir(tmp_path, model, {"r": 2, "lora_alpha": 4, "target_modules": ["v_proj"], "use_dora": True},
                 {n: 2 for n in names}, dora=True, suffix=suffix)
    loaded = interop.load_peft(random_model(), tmp_path, verbose=False).eval()
    assert loaded.adapter_config["method"] == "dora"
    x = torch.randn(1, 3, 64)
    for n in names:
        expect = peft_output(x, model.get_submodule(n).weight, t, n, 2.0, dora=True, suffix=suffix)
        assert torch.allclose(loaded.get_submodule(n)(x, {"lam": None}), expect, atol=tolerance(expect))


@pytest.mark.parametrize("extra, words", [
    ({"layers_to_transform": [0]}, "layers_to_transform=[0] is not supported"),
    ({"modules_to_save": ["ln_f"]}, "modules_to_save=['ln_f'] is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
    ({"use_bdlora": True}, "use_bdlora=True is not supported"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base weights"),
    ({"target_modules": ["ff_out"]}, "adapters on transformer.ff_out (the LM head"),
    ({"target_modules": ["o_proj"]}, "matches no layer of this model"),
    ({"peft_type": "IA3"}, "peft_type='IA3': only LORA"),
    ({"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"blocks.0.q_proj": 4}}, "PEFT releases disagree"),
])
def test_what_load_peft_cannot_represent_is_refused_by_name(tmp_path, extra, words):
    model = random_model()
    peft_dir(tmp_path, model, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **extra},
             {"transformer.blocks.0.q_proj": 2, "transformer.blocks.1.q_proj": 2})
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        interop.load_peft(random_model(), tmp_path, verbose=False)


# ------------------------------------------------------------------ through PEFT itself (optional)
@pytest.mark.parametrize("options", [dict(), dict(use_rslora=True), dict(alpha_pattern={"v_proj": 32}),
                                     dict(rank_pattern={"q_proj": 2}),
                                     dict(target_modules=r".*\.blocks\.1\.(q_proj|attn_out)"),
                                     dict(use_dora=True)])
def test_peft_adapters_load_here_unchanged(tmp_path, options):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                          **{"target_modules": ["q_proj", "v_proj"], **options})
    pm = peft.get_peft_model(wrap(random_model()), cfg).eval()
    pm.save_pretrained(tmp_path)
    ours = interop.load_peft(random_model(), tmp_path, verbose=False).eval()
    expect = pm(IDS)                                    # PEFT's layers: the same numbers, other sums
    assert torch.allclose(ours(IDS), expect, atol=tolerance(expect))


@pytest.mark.parametrize("method", ["lora", "nara", "dora"])
def test_exported_adapters_load_into_peft_unchanged(tmp_path, method):
    peft = pytest.importorskip("peft")
    model = noisy(nara.add_adapters(random_model(), method, r=4, dropout=0.0, verbose=False), 0.1)
    interop.export_peft(model, tmp_path, lam=0.5)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    config.task_type = None   # a bare PeftModel: ours is no transformers model (interop_check.py is)
    pm = peft.PeftModel.from_pretrained(wrap(random_model()), tmp_path, config=config).eval()
    expect = model(IDS, noise_level=torch.full((2,), 0.5))
    assert torch.allclose(pm(IDS), expect, rtol=0, atol=tolerance(expect))
