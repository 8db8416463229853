"""Every method the paper compares, by name, with every switch: what train.py, eval.py and the adapter
files (interop.py) build. The paper's three methods with the paper's hypernetwork are nara.add_adapters;
the rest is built here.

    adapters.attach(model, "dora", r=8)                # any of METHODS, with AdapterConfig's options
    adapters.merge(model, lam=0.5)                     # W0 <- W0 + ΔW(λ): a plain LLaDA again
    with adapters.base_only(model): ...                # the base model, adapters bypassed

`AdapterConfig` is the one list of options, with their defaults (the NaRA authors' where they have one);
it is saved as adapter_config.json, so a saved adapter rebuilds exactly.
"""
import contextlib
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

import nara
from extras import ablations, baselines
from model import Linear, LLaDA, check_keys

METHODS = ("lora", "nara", "nara-c", "multi-lora", "hira", "dora", "nara-dora", "prompt-tuning", "p-tuning")
NOISE_AWARE = ("nara", "multi-lora", "nara-dora")      # their update depends on λ
PROMPT = ("prompt-tuning", "p-tuning")                 # they add input tokens instead of a weight update


@dataclass
class AdapterConfig:
    """What attach builds. Low-rank methods: rank r on the target layers, s = alpha / r (None:
    s = 1, as NaRA's authors), dropout on A's input, core scale eta (NaRA, NaRA-C, NaRA-DoRA), Multi-LoRA's
    noise bins; PEFT's per-layer rank_pattern / alpha_pattern {module name: r / alpha} and rslora (s =
    alpha/√r) for lora, dora and hira. NaRA's ablation switches (ablations.Hypernetwork): embedding
    fourier|mlp|raw, its width, the hidden widths, init zero_last|kaiming|zero_all, signal lambda|density|
    both (what C is conditioned on), the density radius, and groups {name: layers} (one hypernetwork per
    group). Prompt methods (baselines.VirtualTokens): virtual_tokens, prompt_init (token ids of an initial
    text), encoder_hidden (P-Tuning's MLP width, default d_model)."""
    method: str = "nara"
    r: int = 32
    targets: list = field(default_factory=lambda: list(nara.TARGETS))
    alpha: float = None
    dropout: float = 0.05
    eta: float = 0.1
    bins: int = 5
    rank_pattern: dict = None
    alpha_pattern: dict = None
    rslora: bool = False
    embedding: str = "fourier"
    width: int = 64
    hidden: list = field(default_factory=lambda: [256, 512])
    init: str = "zero_last"
    signal: str = "lambda"
    radius: int = 5
    groups: dict = None
    virtual_tokens: int = 20
    prompt_init: list = None
    encoder_hidden: int = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("r", "bins", "virtual_tokens", "radius", "width"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        per_layer = self.rank_pattern or self.alpha_pattern or self.rslora
        if per_layer and self.method not in ("lora", "dora", "hira"):
            raise ValueError(f"per-layer ranks and scales (rank_pattern, alpha_pattern, rslora) are for "
                             f"lora, dora and hira, not {self.method}: its core C is r x r in every layer")
        self.targets, self.hidden = list(self.targets), list(self.hidden)

    @classmethod
    def from_dict(cls, body):
        """From adapter_config.json; earlier releases called `signal` "condition"."""
        body = dict(body)
        if "condition" in body:
            body["signal"] = body.pop("condition")
        unknown = sorted(set(body) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown adapter option {unknown[0]!r}")
        return cls(**body)


def attach(model, method="nara", verbose=True, **options):
    """Freeze `model` and add the adapters of `method` (one of METHODS) with AdapterConfig's options:
    lora, nara and multi-lora without a switch by nara.add_adapters; the other low-rank methods replace
    each linear layer of transformer.blocks whose name ends with a target (the LM head never); prompt
    methods add virtual tokens (model.prompt). The options are kept in model.adapter_config."""
    try:
        cfg = AdapterConfig(method=method, **options)
    except TypeError as e:
        raise ValueError(f"attach: {e}") from None
    plain = not (cfg.rank_pattern or cfg.alpha_pattern or cfg.rslora or cfg.groups)
    if method in ("lora", "nara", "multi-lora") and plain and ablations.switches(cfg) == ablations.PAPER:
        nara.add_adapters(model, method, cfg.r, cfg.targets, cfg.alpha, cfg.dropout, cfg.eta, bins=cfg.bins,
                          verbose=verbose)
        model.adapter_config = asdict(cfg)
        return model
    if getattr(model, "adapter_config", None):
        raise ValueError(f"this model already has {model.adapter_config['method']} adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    device = model.transformer.wte.weight.device
    if method in PROMPT:
        model.prompt = baselines.VirtualTokens(model.transformer.wte, cfg.virtual_tokens,
                                             model.config.vocab_size,
                                             cfg.prompt_init, (cfg.encoder_hidden or model.config.d_model)
                                             if method == "p-tuning" else None)
        what = f"{cfg.virtual_tokens} virtual tokens"
    else:
        group_of = {t: "nara" for t in cfg.targets}                      # which hypernetwork each layer reads
        if cfg.groups and method in ("nara", "nara-dora"):
            group_of = {t: f"nara_{g}" for g, members in cfg.groups.items() for t in members}
            if set(group_of) != set(cfg.targets):
                raise ValueError(f"groups {cfg.groups} must cover the targets {cfg.targets} exactly once")
        if method in ("nara", "nara-dora"):                             # the hypernetworks first (RNG order)
            for key in sorted(set(group_of.values())):
                model.noise_nets[key] = ablations.hypernetwork(cfg).to(device)
            ablations.watch_input(model)                                # density-conditioned ones
        elif method == "nara-c":
            model.noise_nets["nara"] = baselines.StaticCore(cfg.r, cfg.eta).to(device)

        def make(name, base):
            r = (cfg.rank_pattern or {}).get(name, cfg.r)
            a = (cfg.alpha_pattern or {}).get(name, cfg.alpha)
            s = 1.0 if a is None else a / (math.sqrt(r) if cfg.rslora else r)       # PEFT's rules
            key = group_of[next(t for t in cfg.targets if name == t or name.endswith("." + t))]
            return {"lora": lambda: nara.LoRALinear(base, r, s, cfg.dropout),
                    "nara": lambda: nara.NaRALinear(base, r, s, cfg.dropout, key),
                    "nara-c": lambda: nara.NaRALinear(base, r, s, cfg.dropout, "nara"),
                    "multi-lora": lambda: nara.MultiLoRALinear(base, r, s, cfg.dropout, cfg.bins),
                    "hira": lambda: baselines.HiRALinear(base, r, s, cfg.dropout),
                    "dora": lambda: baselines.DoRALinear(base, r, s, cfg.dropout),
                    "nara-dora": lambda: baselines.DoRALinear(base, r, s, cfg.dropout, key)}[method]()
        n = nara.replace_linears(model, cfg.targets, make)
        what = f"adapted {n} layers ({', '.join(cfg.targets)} in {len(model.transformer.blocks)} blocks)"
    model.adapter_config = asdict(cfg)
    model.train(model.training)   # new modules follow the model's mode (eval: no dropout)
    return nara.report(model, f"{method}: {what}", verbose)


@torch.no_grad()
def merge(model, lam, cond=None):
    """W0 <- W0 + ΔW(λ) in every adapted layer at one fixed λ (NaRA's update depends on it): a plain LLaDA
    again. The sum is taken in fp32 and stored in W0's dtype (with bf16, a line says so). cond: what the
    layers receive (default: model.conditioning at λ; cond_at for a noise density)."""
    if model.prompt is not None:
        raise ValueError(f"{model.adapter_config['method']} adds input tokens, not a weight update: "
                         "nothing to merge")
    wte = model.transformer.wte.weight
    cond = cond or model.conditioning(torch.tensor([float(lam)], device=wte.device))
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, nara.LoRALinear)]:
        with torch.device("meta"):                                        # no throw-away d x d init
            plain = Linear(layer.weight.shape[1], layer.weight.shape[0])
        plain.weight = nn.Parameter(layer.merged_weight(cond).to(layer.weight.dtype), requires_grad=False)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, plain)
    model.noise_nets.clear()
    model.adapter_config = None
    if wte.dtype != torch.float32:
        print(f"merge: W0 + ΔW(λ={lam}) summed in float32, stored in {str(wte.dtype)[6:]} (that rounding is "
              "the merged model's only difference)")
    return model


@contextlib.contextmanager
def base_only(model):
    """Inside this block the model computes exactly as its base: every adapted layer skips its update and
    the virtual tokens are taken out (no second copy of the base is loaded); leaving restores them."""
    layers, prompt = [m for m in model.modules() if isinstance(m, nara.LoRALinear)], model.prompt
    for m in layers:
        m.active = False
    model.prompt = None
    try:
        yield model
    finally:
        for m in layers:
            m.active = True
        model.prompt = prompt


def adapter_state(model):
    """Only the adapter tensors (the base keys are left out): what training changes."""
    base = {k[len("model."):] for k in model.base_shapes()}
    return {k: v for k, v in model.state_dict().items() if k not in base}


def load_state(model, state, where):
    """Load exactly the adapter tensors `state` into model, every key and shape checked first."""
    expected = adapter_state(model)
    check_keys(where, state, expected)
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)                        # exactly the adapter keys
    return model


def cond_at(model, lam, density=None):
    """What the adapted layers receive for one sequence at noise level `lam` (and, for a density-
    conditioned NaRA, at noise density `density`, which then no input has to supply)."""
    dev = model.transformer.wte.weight.device
    lam = torch.tensor([float(lam)], device=dev)
    if density is None:
        return model.conditioning(lam)
    d = torch.tensor([float(density)], device=dev)
    return {"lam": lam, **{k: net(lam, density=d) if isinstance(net, ablations.Hypernetwork) else net(lam)
                           for k, net in model.noise_nets.items()}}


# ---------------------------------------------------------------- train.py's flags for all of the above
def add_flags(ap):
    ap.add_argument("--method", default="nara", choices=METHODS, help="adapter method")
    ap.add_argument("--adapter-rank", dest="r", type=int,
                    help="adapter rank r (recipe: 32; bundled run: 8)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha, s = alpha/r (default: s = 1)")
    ap.add_argument("--eta", type=float, default=0.1, help="NaRA core scale η")
    ap.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapters' input")
    ap.add_argument("--targets", default=",".join(nara.TARGETS),
                    help="comma-separated layer names (default: %(default)s)")
    ap.add_argument("--bins", type=int, default=5, help="Multi-LoRA noise bins K")
    ap.add_argument("--embedding", default="fourier", choices=("fourier", "mlp", "raw"),
                    help="NaRA: λ embedding")
    ap.add_argument("--embedding-width", type=int, default=64,
                    help="NaRA: width of the λ (and density) embedding")
    ap.add_argument("--hyper-hidden", default="256,512", help="NaRA: the hypernetwork's hidden widths")
    ap.add_argument("--hyper-init", default="zero_last", choices=("zero_last", "kaiming", "zero_all"),
                    help="NaRA: hypernetwork init (zero_last: C = I at step 0)")
    ap.add_argument("--condition", default="lambda", choices=("lambda", "density", "both"),
                    help="NaRA: condition C on λ, on the input's noise density, or both")
    ap.add_argument("--density-radius", type=int, default=5,
                    help="NaRA: neighbours on each side for the density")
    ap.add_argument("--groups", default=None, help="NaRA: one hypernetwork per group, e.g. "
                    "qk=q_proj+k_proj,vo=v_proj+attn_out")
    ap.add_argument("--stage1", type=float, default=0.0,
                    help="NaRA: fraction of updates with C = I, hypernetwork frozen")
    ap.add_argument("--freeze", default="", help="adapter parts kept at their init: any of A,B,hypernetwork")
    ap.add_argument("--warm-start", default=None,
                    help="adapter directory of a saved LoRA: start A and B from it")
    ap.add_argument("--virtual-tokens", type=int, default=20,
                    help="prompt-tuning / p-tuning: number of virtual tokens")
    ap.add_argument("--prompt-init-text", default=None,
                    help="prompt-tuning: initial text (default: random rows)")
    ap.add_argument("--encoder-hidden", type=int, default=None,
                    help="p-tuning: prompt encoder width (default d_model)")


def check_flags(args):
    """A one-line error naming the flag for every impossible adapter setting, before anything loads."""
    for name in ("r", "bins", "virtual_tokens", "density_radius", "embedding_width", "encoder_hidden"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            flag = "--" + {"r": "adapter-rank"}.get(name, name.replace("_", "-"))
            raise ValueError(f"{flag} must be at least 1, got {getattr(args, name)}")
    for flag, ok, what in (("--dropout", 0 <= args.dropout < 1, "in [0, 1)"),
                           ("--eta", math.isfinite(args.eta) and args.eta >= 0, "finite and >= 0"),
                           ("--stage1", 0 <= args.stage1 <= 1, "in [0, 1]")):
        if not ok:
            raise ValueError(f"{flag} must be {what}, got {getattr(args, flag[2:])}")
    try:
        assert min(int(h) for h in args.hyper_hidden.split(",")) >= 1
    except (ValueError, AssertionError):
        raise ValueError(f"--hyper-hidden {args.hyper_hidden!r}: give positive widths, e.g. "
                         "256,512") from None
    if args.groups and not all(item.count("=") == 1 and all(item.split("="))
                               for item in args.groups.split(",")):
        raise ValueError(f"--groups {args.groups!r}: write name=layer+layer,..., e.g. "
                         "qk=q_proj+k_proj,vo=v_proj+attn_out")
    frozen = {p for p in args.freeze.split(",") if p}
    if frozen - {"A", "B", "hypernetwork"}:
        bad = sorted(frozen - {"A", "B", "hypernetwork"})[0]
        raise ValueError(f"--freeze {bad!r}: choose among A, B, hypernetwork")
    parts = {"A", "B"} | ({"hypernetwork"} if args.method in ("nara", "nara-c") else set())
    if args.method in ("lora", "nara", "nara-c", "multi-lora", "hira") and parts <= frozen:
        raise ValueError(f"--freeze {args.freeze}: leaves nothing of {args.method} to train")
    if not all(args.targets.split(",")):
        raise ValueError(f"--targets {args.targets!r}: give comma-separated layer names")


def check_on_meta(config, method, options):
    """attach on a weightless copy of the model (the meta device): a bad --targets or adapter option
    fails in a second, before an 8B model loads. The random streams are left as they were. Returns
    `options`."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        attach(LLaDA(config), method, verbose=False, **options)
    return options


def from_flags(args, tok):
    """attach's options from train.py's flags."""
    pairs = [item.split("=", 1) for item in args.groups.split(",")] if args.groups else []
    groups = {g: tuple(members.split("+")) for g, members in pairs}
    text = args.prompt_init_text
    return dict(r=args.r, targets=args.targets.split(","), alpha=args.alpha, dropout=args.dropout,
                eta=args.eta, bins=args.bins, groups=groups or None, embedding=args.embedding,
                width=args.embedding_width, hidden=[int(h) for h in args.hyper_hidden.split(",")],
                init=args.hyper_init, signal=args.condition, radius=args.density_radius,
                virtual_tokens=args.virtual_tokens, encoder_hidden=args.encoder_hidden,
                prompt_init=tok.encode(text, add_special_tokens=False).ids if text else None)
