"""The path users run on a GPU, checked on a CPU: the recipe's dtypes (bf16 base, fp32 adapters, bf16
autocast), randomness from explicit generators (never a global reseed), tensors created on the
model's device, one model in memory at a time, and two ranks under torchrun."""
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import random_model, rank, train_args
from torch.overrides import TorchFunctionMode

import eval as ev
import nara
import train
from diffusion import generate, log_likelihood, sft_loss
from extras import adapters, files, figures, interop
from model import LLaDA

ROOT = Path(__file__).resolve().parents[1]
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def recipe_dtypes(method="nara", b_scale=1.0, seed=0, **kw):
    """A tiny model as the recipe builds it on CUDA: bf16 base weights, fp32 adapters (B non-zero)."""
    model = random_model(seed=seed).to(torch.bfloat16)
    torch.manual_seed(3 + seed)
    nara.add_adapters(model, method, verbose=False, **rank(method, 4, dropout=0.0), **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nara.LoRALinear):
                m.lora_B.normal_(0, b_scale)
    return model.eval()


def set_core(model, delta):
    """C = I + delta · D for every sequence, D = diag(1, -1, 1, -1), through the hypernetwork's last bias."""
    D = torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    with torch.no_grad():
        model.noise_nets["nara"].net[-1].bias.copy_((delta / 0.1 * D).T.flatten())   # F read column-major


# ------------------------------------------------------------------ bf16 and autocast
def core_share(seed):
    """What the first q_proj and the whole model apply of C − I = 1e-3·D in the recipe's dtypes, as the
    slope of their output change regressed on fp64's (1 = all of it, 0 = rounded away)."""
    torch.manual_seed(seed)
    lam, ids = torch.rand(32), torch.randint(0, 120, (32, 32))
    changes = {}
    for dtype in (torch.bfloat16, torch.float64):
        model = recipe_dtypes(seed=seed)
        if dtype == torch.float64:
            model.double()
        out = {}
        for delta in (1e-3, 0.0):
            set_core(model, delta)
            with torch.no_grad(), torch.autocast(**BF16, enabled=dtype == torch.bfloat16):
                layer = model.transformer.blocks[0].q_proj
                x = model.transformer.wte(ids).to(dtype)
                out[delta] = (layer(x, model.conditioning(lam)).double(),
                              model(ids, noise_level=lam).double())
        changes[dtype] = [a - b for a, b in zip(out[1e-3], out[0.0])]
    return [float((bf * exact).sum() / (exact * exact).sum())
            for bf, exact in zip(changes[torch.bfloat16], changes[torch.float64])]


def test_a_core_of_i_plus_1e_3_survives_bf16_in_the_layer_and_the_model():
    """C − I = 1e-3·D is below half a bf16 ulp of 1: the rank-2r path keeps it (0.00 when C is applied in
    bf16). One seed's slope is noisy at that size (the signal is mostly rounding-dithered), so the mean
    over seeds 0-5 is what must be near 1, for the layer and for the whole model."""
    shares = [core_share(seed) for seed in range(6)]
    for where, values in zip(("layer", "model"), zip(*shares)):
        assert 0.85 < sum(values) / 6 < 1.15 and min(values) > 0.5, (where, values)
    layer, x = recipe_dtypes().transformer.blocks[0].q_proj, torch.randn(2, 5, 64, dtype=torch.bfloat16)
    C = torch.eye(4) + 1e-3 * torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    with torch.no_grad(), torch.autocast(**BF16):
        assert not torch.equal(layer(x, {"nara": C}), layer(x, {"nara": torch.eye(4)}))


def test_training_validation_sampling_and_likelihood_run_in_the_recipe_dtypes(tiny_task, tmp_path):
    model = train.main(train_args(tiny_task, tmp_path / "run", "--dtype", "bfloat16", "--max-updates", "9",
                                  "--dropout", "0.05"))
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and all(torch.isfinite(torch.tensor(vals))) and vals[-1] < vals[0]
    assert model.noise_nets["nara"].net[-1].weight.abs().sum() > 0        # the hypernetwork learned in bf16
    prompt = torch.randint(0, 20, (2, 6))
    with torch.autocast(**BF16):
        out = generate(model.eval(), prompt, steps=8, gen_length=8, block_length=4)
        ll = log_likelihood(model, prompt[0], prompt[1, :3], mc_num=8, batch_size=4)
    assert torch.equal(out[:, :6], prompt) and not (out == model.config.mask_token_id).any()
    assert torch.isfinite(torch.tensor(ll)) and ll < 0


def test_noise_density_is_the_same_with_and_without_autocast():
    model = recipe_dtypes(signal="density")
    ids = torch.randint(0, 120, (3, 40))
    ids[:, 10:] = torch.where(torch.rand(3, 30) < 0.37, model.config.mask_token_id, ids[:, 10:])
    seen = []
    model.noise_nets["nara"].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model.noise_nets["nara"].net[-1].weight.normal_()                 # C depends on the density
        model(ids)
        with torch.autocast(**BF16):
            model(ids)
    plain, mixed = seen
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


def test_recompute_with_block_checkpointing_and_dropout_gives_the_same_gradients():
    def grads(recompute, checkpointing):
        model = recipe_dtypes(b_scale=0.1)
        for m in model.modules():
            if isinstance(m, nara.LoRALinear):
                m.dropout.p = 0.3
        model.train()
        model.recompute, model.gradient_checkpointing = recompute, checkpointing
        torch.manual_seed(5)
        x, answer = torch.randint(0, 120, (3, 12)), torch.arange(12)[None].expand(3, 12) >= 4
        with torch.autocast(**BF16):
            loss, _ = sft_loss(model, x, answer)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    reference = grads(False, False)
    assert len(reference) == 2 * 8 + 6 and any(g.abs().sum() > 0 for n, g in reference.items()
                                               if "noise_nets" in n)
    for setting in ((True, False), (False, True), (True, True)):
        assert all(torch.equal(reference[k], v) for k, v in grads(*setting).items()), setting


# ------------------------------------------------------------------ randomness
def test_no_global_reseed_in_validation_noise_curves_likelihood_or_generation(monkeypatch):
    model = recipe_dtypes().float()

    def refuse(*a, **k):
        raise AssertionError("the global random stream was reseeded")
    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, refuse)
        monkeypatch.setattr(torch.random, name, refuse)
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    ids, answer = torch.randint(0, 120, (4, 10)), torch.arange(10)[None].expand(4, 10) >= 3
    state = torch.get_rng_state()
    first = train.validation_loss(model, ids, answer, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)                    # the training stream is untouched
    torch.rand(5)                                                       # whatever training draws meanwhile
    assert train.validation_loss(model, ids, answer, 2, seed=7) == first  # the same masks every time
    assert figures.noise_curve(model, ids, answer, [0.5, 1.0]) == figures.noise_curve(model,
                                                                                      ids, answer, [0.5, 1.0])
    g = torch.Generator().manual_seed(1)
    log_likelihood(model, ids[0, :3], ids[0, 3:], mc_num=4, batch_size=2, generator=g)
    generate(model, ids[:, :3], steps=4, gen_length=4, block_length=4, temperature=1.0,
             remasking="random", generator=g)


def test_explicit_generators_make_sampling_and_likelihood_repeatable():
    model = recipe_dtypes().float()
    prompt = torch.randint(0, 120, (2, 4))
    runs = [generate(model, prompt, steps=4, gen_length=8, block_length=4,
                     temperature=1.0, remasking="random",
                     generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*runs)
    lls = [log_likelihood(model, prompt[0], prompt[1], mc_num=4, batch_size=2,
                          generator=torch.Generator().manual_seed(3))
           for _ in range(2)]
    assert lls[0] == lls[1]


# ------------------------------------------------------------------ devices
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.rand, torch.randn,
             torch.randint, torch.randperm, torch.eye, torch.linspace}
HOST_BY_DESIGN = {   # (file, function): why a tensor is made on the host there
    ("tasks.py", "pad_sft"): "dataset rows live in host memory; batches are moved when used",
    ("diffusion.py", "log_likelihood"): "the stratified counts m_i (b integers) are computed on the host, "
                                        "then moved",
    ("figures.py", "noise_curve"): "one integer seed per batch from a host generator",
    ("model.py", "__init__"): "RMSNorm's weight at construction (meta device in from_pretrained)",
    ("nara.py", "add_embedding"): "e_λ's Fourier matrix at construction; the module is then moved with "
                                  ".to(device)",
    ("ablations.py", "add_embedding"): "the same, for the ablations' embeddings",
    ("baselines.py", "__init__"): "NaRA-C's P at construction, then moved with .to(device); Prompt Tuning "
                                  "draws its initial rows on the host, then moves them",
    ("train.py", "main"): "the data order comes from a CPU generator, whatever the device",
    ("runs.py", "split"): "the data split comes from a CPU generator, whatever the device",
    ("runs.py", "save_checkpoint"): "an empty CUDA RNG state on a CPU run",
}


class DeviceSpy(TorchFunctionMode):
    """Records tensor factories called from the project's own files without device=."""
    def __init__(self):
        super().__init__()
        self.found = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            file = Path(frame.f_code.co_filename)
            while frame.f_code.co_name.startswith("<") and frame.f_back.f_code.co_filename == str(file):
                frame = frame.f_back                        # a comprehension or lambda: its function
            ours = file.parent in (ROOT, ROOT / "extras")
            if ours and (file.name, frame.f_code.co_name) not in HOST_BY_DESIGN:
                self.found.add(f"{file.name}:{frame.f_lineno} ({frame.f_code.co_name}) torch.{func.__name__}")
        return func(*args, **kwargs)


def spy(fn, *args, **kwargs):
    with DeviceSpy() as s:
        result = fn(*args, **kwargs)
    assert not s.found, sorted(s.found)
    return result


def short_test_file(directory, n=8):
    test = json.loads((ROOT / "data" / "arith" / "test.json").read_text())[:n]
    (directory / "test.json").write_text(json.dumps(test))
    return str(directory / "test.json")


SHORT = ["--max-updates", "2", "--eval-every", "2", "--batch-size", "4", "--val-size", "4"]


def test_every_entry_point_makes_its_tensors_on_the_models_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    test_file = short_test_file(tmp_path)
    spy(train.main, ["--out", str(tmp_path / "runs" / "default"), "--test", test_file, *SHORT])
    adapter = str(tmp_path / "runs" / "default" / "adapter")
    spy(ev.main, ["--adapter", adapter, "--limit", "4", "--out", str(tmp_path / "e1")])
    spy(ev.main, ["--adapter", adapter, "--noise-curve", "--limit", "4", "--out", str(tmp_path / "e2")])
    (tmp_path / "he.jsonl").write_text(json.dumps({"task_id": "t/0",
                                                   "prompt": "def f(x):\n", "entry_point": "f",
                                                   "test": "def check(c):\n    assert c(1) == 1\n"}) + "\n")
    spy(ev.main, ["--task", "humaneval", "--data", str(tmp_path / "he.jsonl"), "--gen-length", "8",
                  "--steps", "8", "--block-length", "8", "--adapter", "none", "--out", str(tmp_path / "e3"),
                  "--allow-unsandboxed-code"])
    model = recipe_dtypes().float()
    prompt = torch.randint(0, 120, (2, 4))
    spy(generate, model, prompt, torch.ones(2, 4, dtype=torch.long), steps=4, gen_length=4,
        block_length=4, cfg_scale=1.0,
        temperature=1.0, till_eos=True)
    spy(log_likelihood, model, prompt[0], prompt[1], mc_num=4, batch_size=2, cfg_scale=1.0)
    spy(interop.export_peft, model, tmp_path / "peft", lam=0.5)
    P, Q = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    spy(nara.decompose, [P @ torch.randn(3, 3, dtype=torch.float64) @ Q for _ in range(3)], 4)
    spy(adapters.merge, model, 0.5)
    spy(files.save_pretrained, model, tmp_path / "merged")


# ------------------------------------------------------------------ model lifetimes
@pytest.fixture
def one_model_at_a_time(monkeypatch):
    """Patches LLaDA.from_pretrained to fail when another model it loaded is still alive."""
    alive, load = [], LLaDA.from_pretrained.__func__

    def checked(cls, *args, **kwargs):
        still = [r for r in alive if r() is not None]
        assert not still, f"{len(still)} model(s) still in memory while the next one loads"
        model = load(cls, *args, **kwargs)
        alive.append(weakref.ref(model))
        return model
    monkeypatch.setattr(LLaDA, "from_pretrained", classmethod(checked))
    return alive


def test_eval_and_the_training_report_hold_one_model_at_a_time(one_model_at_a_time, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = train.main(["--out", str(tmp_path / "run"), "--test", short_test_file(tmp_path), *SHORT])
    assert len(one_model_at_a_time) == 1                                  # the report loads no second model
    assert "held-out accuracy on 8 items of test.json: base" in capsys.readouterr().out
    del model
    adapter = str(tmp_path / "run" / "adapter")
    ev.main(["--adapter", adapter, "--adapter", adapter, "--limit", "2", "--out", str(tmp_path / "e")])
    assert len(one_model_at_a_time) == 1 + 3                              # base, then each adapter: once each


def test_the_base_inside_base_only_is_the_loaded_base_exactly():
    for method in ("nara", "dora", "hira", "prompt-tuning"):
        base, model = random_model(), random_model()
        nara.add_adapters(model, method, verbose=False, **rank(method, 4))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_()
        ids, lam = torch.randint(0, 120, (2, 7)), torch.tensor([0.2, 0.9])
        with torch.no_grad(), adapters.base_only(model):
            assert torch.equal(model.eval()(ids, noise_level=lam), base.eval()(ids)), method
        assert not torch.equal(model(ids, noise_level=lam), base(ids)), method


# ------------------------------------------------------------------ two ranks
HARNESS = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import diffusion, train
from extras import runs
log, rank = open(os.path.join({out!r}, f"draws{{os.environ['RANK']}}.jsonl"), "a"), int(os.environ["RANK"])
mask = diffusion.sft_mask
def recording(answer, t, *a, **k):
    masked, p = mask(answer, t, *a, **k)
    row = {{"training": train.torch.is_grad_enabled(), "t": t.tolist(), "masked": masked.nonzero().tolist()}}
    log.write(json.dumps(row) + "\\n")
    return masked, p
diffusion.sft_mask = recording
report = runs.report
def timed(*a, **k):
    log.write(json.dumps({{"report_start": time.time()}}) + "\\n"); report(*a, **k)
    log.write(json.dumps({{"report_end": time.time()}}) + "\\n")
runs.report = timed
train.main(sys.argv[1:])
log.write(json.dumps({{"exit": time.time()}}) + "\\n")
"""


def test_two_ranks_draw_their_own_t_and_masks_around_validation_and_nobody_waits_for_the_report(tmp_path):
    (tmp_path / "harness.py").write_text(HARNESS.format(root=str(ROOT), out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "harness.py"), "--out", str(tmp_path / "run"),
           "--test", str(ROOT / "data" / "arith" / "test.json"), "--max-updates", "6",
           "--eval-every", "3", "--batch-size", "2", "--val-size", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**env, "OMP_NUM_THREADS": "1"})
    cause = [line for line in res.stderr.splitlines() if any(w in line for w in ("terminate", "what()", "Error"))]
    assert res.returncode == 0, "\n".join(cause[:20]) + res.stdout[-1000:] + res.stderr[-2000:]
    assert "adapter checksum on 2 ranks: identical" in res.stdout and "held-out accuracy" in res.stdout
    logs = [[json.loads(line) for line in (tmp_path / f"draws{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    draws = [[d for d in log if d.get("training")] for log in logs]
    assert len(draws[0]) == len(draws[1]) == 6                           # one micro-batch per update
    for a, b in zip(*draws):   # updates 1-3, then 4-6 after a validation
        assert a["t"] != b["t"] and a["masked"] != b["masked"]
    for log in draws:                                                    # no stream restarts after validation
        assert all(log[i]["t"] != log[i + 3]["t"] for i in range(3))
    events = {k: v for log in logs for d in log for k, v in d.items() if k in ("report_start", "report_end")}
    rank1_exit = next(d["exit"] for d in logs[1] if "exit" in d)
    assert rank1_exit < events["report_end"], "rank 1 waited for rank 0's report"
