#!/usr/bin/env python3
"""Generate PyTorch/transformers parity fixtures for candle-glu.

What it makes
-------------
For each case below it builds the *real* transformers module (LlamaMLP, GemmaMLP,
Phi3MLP, T5DenseGatedActDense, MixtralExperts), fills it with seeded random
float32 weights (uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases too), runs a
seeded input x ~ 1.5 * N(0, 1) of shape [2, 5, 72] through it, and writes

    tests/fixtures/parity/<case>/config.json        config written by transformers itself
    tests/fixtures/parity/<case>/model.safetensors  f32 FFN weights under real checkpoint names
    tests/fixtures/parity/<case>/io.safetensors     x (f32), y_f64 (f64), y_torch_f32 (f32),
                                                    y_torch_f16 (f16), y_torch_bf16 (bf16)
    tests/fixtures/parity/manifest.json             {"torch", "transformers", "cases": [...]}

hidden = 72 and intermediate = 184 (deliberately not multiples of 16).

* y_f64        : module.to(float64)(x.to(float64)) - the "truth" (f32 weights upcast exactly)
* y_torch_f32  : the f32 module on x
* y_torch_f16  : module.to(float16)(x.to(float16)) on CPU - torch's own half output
* y_torch_bf16 : same in bfloat16
Every variant is deep-copied from the same f32 module before casting.

Mixtral: transformers 5 keeps experts fused in memory (MixtralExperts.gate_up_proj
[E, 2I, H], down_proj [E, H, I]) but checkpoints on disk use per-expert
`block_sparse_moe.experts.{e}.w1/w3/w2`. The reference is expert 2 evaluated by
MixtralExperts.forward with every token routed to expert 2 with weight 1.0; only
expert 2's w1/w3/w2 are saved.

The script also asserts a number of self-consistency checks (exact vs tanh GELU
differ, f32 close to f64, the saved tensors re-evaluated by an independent
formula reproduce y_f64, Phi3/Mixtral splits are right, ...). It is deterministic:
running it twice produces byte-identical files.

How to run (from the repository root)
-------------------------------------
    pip install torch transformers safetensors numpy && python3 scripts/make_fixtures.py

Versions used to generate the committed fixtures: torch 2.15.0, transformers 5.24.0,
safetensors 0.8.0, numpy 2.4.6 (CPU only). The torch and transformers versions are
also recorded in manifest.json.
"""

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file
from transformers import GemmaConfig, LlamaConfig, MixtralConfig, Phi3Config, T5Config
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.phi3.modeling_phi3 import Phi3MLP
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

HIDDEN = 72
INTER = 184
X_SHAPE = (2, 5, HIDDEN)
X_SCALE = 1.5
MIXTRAL_EXPERTS = 4
MIXTRAL_EXPERT = 2

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "parity"

# Attention heads only matter for config validation (hidden must divide evenly).
DECODER_KW = dict(num_attention_heads=6, num_key_value_heads=6, num_hidden_layers=1)

LLAMA_ACTS = [
    "silu",
    "swish",
    "sigmoid",
    "linear",
    "relu",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "quick_gelu",
]


# --------------------------------------------------------------------------------------
# independent float64 activation formulas, used only for self-checks
# --------------------------------------------------------------------------------------
def _gelu_tanh(v):
    return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


REF_ACT = {
    "silu": lambda v: v * torch.sigmoid(v),
    "swish": lambda v: v * torch.sigmoid(v),
    "swish(1.5)": lambda v: v * torch.sigmoid(1.5 * v),
    "sigmoid": torch.sigmoid,
    "linear": lambda v: v,
    "relu": lambda v: torch.clamp(v, min=0.0),
    "gelu": lambda v: 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda v: v * torch.sigmoid(1.702 * v),
}


class SwishBeta(nn.Module):
    """Swish with beta = 1.5 (not in transformers' ACT2FN table)."""

    def forward(self, v):
        return v * torch.sigmoid(1.5 * v)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def init_params(module: nn.Module, fan_in_of) -> None:
    """uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every parameter, in sorted-name order."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            bound = 1.0 / math.sqrt(fan_in_of(name, p))
            p.uniform_(-bound, bound)
            assert p.dtype == torch.float32


def linear_fan_in(module: nn.Module):
    """fan_in for nn.Linear parameters: in_features of the owning linear (weight and bias)."""
    mods = dict(module.named_modules())

    def f(name, p):
        owner = name.rsplit(".", 1)[0]
        lin = mods[owner]
        assert isinstance(lin, nn.Linear), name
        return lin.in_features

    return f


def run_variants(module: nn.Module, x: torch.Tensor, call):
    """Return (y_f64, y_f32, y_f16, y_bf16); every variant deep-copied from the f32 module."""
    outs = {}
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        m = copy.deepcopy(module).to(dt).eval()
        for p in m.parameters():
            assert p.dtype == dt
        with torch.no_grad():
            y = call(m, x.to(dt))
        assert y.dtype == dt, (y.dtype, dt)
        outs[dt] = y.contiguous()
    return outs[torch.float64], outs[torch.float32], outs[torch.float16], outs[torch.bfloat16]


def ref_ffn(x64, gate_w, up_w, down_w, act, gate_b=None, up_b=None, down_b=None):
    """Plain float64 FFN: W2 (act(x Wg^T + bg) * (x Wu^T + bu)) + b2."""
    g = x64 @ gate_w.double().T
    u = x64 @ up_w.double().T
    if gate_b is not None:
        g = g + gate_b.double()
        u = u + up_b.double()
    y = (REF_ACT[act](g) * u) @ down_w.double().T
    if down_b is not None:
        y = y + down_b.double()
    return y


def max_abs(t):
    return float(t.double().abs().max())


def rel_err(y, ref):
    return max_abs(y.double() - ref) / max_abs(ref)


def write_case(case, config, state, io, manifest_entry, config_fixup=None):
    d = OUT / case
    d.mkdir(parents=True, exist_ok=True)
    cfg_path = d / "config.json"
    config.to_json_file(str(cfg_path))
    if config_fixup is not None:
        text = cfg_path.read_text()
        cfg_path.write_text(config_fixup(text))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(d / "io.safetensors"))

    # the saved weights must round-trip exactly
    back = load_file(str(d / "model.safetensors"))
    assert sorted(back) == sorted(state)
    for k in state:
        assert back[k].dtype == torch.float32 and torch.equal(back[k], state[k]), k
    return manifest_entry


def make_x():
    # x is drawn from the global RNG right after the weights (same torch.manual_seed).
    return torch.randn(*X_SHAPE, dtype=torch.float32) * X_SCALE


def standard_io_and_entry(case, module_name, prefix, layout, activation, bias, x, ys, notes=None):
    y64, y32, y16, yb16 = ys
    err32 = rel_err(y32, y64)
    assert err32 < 1e-5, (case, "f32 rel err", err32)
    io = {
        "x": x,
        "y_f64": y64,
        "y_torch_f32": y32,
        "y_torch_f16": y16,
        "y_torch_bf16": yb16,
    }
    assert io["x"].dtype == torch.float32 and io["y_f64"].dtype == torch.float64
    assert io["y_torch_f16"].dtype == torch.float16 and io["y_torch_bf16"].dtype == torch.bfloat16
    for k, v in io.items():
        assert torch.isfinite(v.double()).all(), (case, k)
    entry = {
        "name": case,
        "module": module_name,
        "prefix": prefix,
        "layout": layout,
        "activation": activation,
        "bias": bias,
        "hidden": HIDDEN,
        "intermediate": INTER,
        "torch_err_f16": max_abs(y16.double() - y64),
        "torch_err_bf16": max_abs(yb16.double() - y64),
        "max_abs_ref": max_abs(y64),
    }
    if notes is not None:
        entry["notes"] = notes
    print(
        f"{case:26s} act={activation:18s} max|y|={entry['max_abs_ref']:.4f} "
        f"f32 rel={err32:.2e} f16 err={entry['torch_err_f16']:.3e} bf16 err={entry['torch_err_bf16']:.3e}"
    )
    return io, entry


def gate_preact_range(x, gate_w):
    g = x.double() @ gate_w.double().T
    return float(g.min()), float(g.max())


# --------------------------------------------------------------------------------------
# case builders
# --------------------------------------------------------------------------------------
def llama_like_case(case, seed, cfg, mlp_cls, activation, act_override=None, notes=None,
                    config_fixup=None, expect_act_cls=None):
    prefix = "model.layers.0.mlp"
    bias = bool(getattr(cfg, "mlp_bias", False))
    torch.manual_seed(seed)
    mlp = mlp_cls(cfg)
    if act_override is not None:
        mlp.act_fn = act_override
    if expect_act_cls is not None:
        assert type(mlp.act_fn) is expect_act_cls, (case, type(mlp.act_fn))
    init_params(mlp, linear_fan_in(mlp))
    mlp.eval()
    x = make_x()
    if bias:
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            assert lin.bias is not None and bool((lin.bias != 0).all())
    else:
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            assert lin.bias is None

    ys = run_variants(mlp, x, lambda m, xx: m(xx))
    state = {f"{prefix}.{k}": v.detach().clone() for k, v in mlp.state_dict().items()}
    expected = {f"{prefix}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    if bias:
        expected |= {f"{prefix}.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(state) == expected, sorted(state)
    assert state[f"{prefix}.gate_proj.weight"].shape == (INTER, HIDDEN)
    assert state[f"{prefix}.down_proj.weight"].shape == (HIDDEN, INTER)

    # independent re-evaluation from the saved names
    ref = ref_ffn(
        x.double(),
        state[f"{prefix}.gate_proj.weight"],
        state[f"{prefix}.up_proj.weight"],
        state[f"{prefix}.down_proj.weight"],
        activation,
        *(
            (state[f"{prefix}.gate_proj.bias"], state[f"{prefix}.up_proj.bias"], state[f"{prefix}.down_proj.bias"])
            if bias
            else ()
        ),
    )
    assert max_abs(ref - ys[0]) <= 1e-12 * max(1.0, max_abs(ys[0])), (case, max_abs(ref - ys[0]))

    io, entry = standard_io_and_entry(
        case, type(mlp).__name__, prefix, "llama", activation, bias, x, ys, notes
    )
    write_case(case, cfg, state, io, entry, config_fixup)
    lo, hi = gate_preact_range(x, state[f"{prefix}.gate_proj.weight"])
    return entry, mlp, x, (lo, hi)


def phi3_case(case, seed):
    prefix = "model.layers.0.mlp"
    cfg = Phi3Config(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu", **DECODER_KW)
    torch.manual_seed(seed)
    mlp = Phi3MLP(cfg)
    init_params(mlp, linear_fan_in(mlp))
    mlp.eval()
    x = make_x()
    ys = run_variants(mlp, x, lambda m, xx: m(xx))
    state = {f"{prefix}.{k}": v.detach().clone() for k, v in mlp.state_dict().items()}
    assert set(state) == {f"{prefix}.gate_up_proj.weight", f"{prefix}.down_proj.weight"}
    gu = state[f"{prefix}.gate_up_proj.weight"]
    assert gu.shape == (2 * INTER, HIDDEN)
    # gate = first half, up = second half
    ref = ref_ffn(x.double(), gu[:INTER], gu[INTER:], state[f"{prefix}.down_proj.weight"], "silu")
    assert max_abs(ref - ys[0]) <= 1e-12 * max_abs(ys[0])
    swapped = ref_ffn(x.double(), gu[INTER:], gu[:INTER], state[f"{prefix}.down_proj.weight"], "silu")
    assert max_abs(swapped - ys[0]) > 1e-3 * max_abs(ys[0]), "gate/up halves indistinguishable"
    io, entry = standard_io_and_entry(
        case, "Phi3MLP", prefix, "phi3", "silu", False, x, ys,
        notes="gate_up_proj.weight is [2*intermediate, hidden]; rows [0, intermediate) are the gate "
              "(activated), rows [intermediate, 2*intermediate) are up.",
    )
    write_case(case, cfg, state, io, entry)
    return entry


def t5_case(case, seed, ff_proj, expected_act, expect_act_cls):
    prefix = "encoder.block.0.layer.1.DenseReluDense"
    cfg = T5Config(d_model=HIDDEN, d_ff=INTER, feed_forward_proj=ff_proj, dropout_rate=0.0,
                   num_layers=1, num_decoder_layers=1, num_heads=6, d_kv=12)
    assert cfg.is_gated_act
    assert cfg.dense_act_fn == expected_act, (ff_proj, cfg.dense_act_fn)
    torch.manual_seed(seed)
    mlp = T5DenseGatedActDense(cfg)
    assert type(mlp.act) is expect_act_cls, type(mlp.act)
    init_params(mlp, linear_fan_in(mlp))
    mlp.eval()
    x = make_x()
    ys = run_variants(mlp, x, lambda m, xx: m(xx))
    state = {f"{prefix}.{k}": v.detach().clone() for k, v in mlp.state_dict().items()}
    assert set(state) == {f"{prefix}.wi_0.weight", f"{prefix}.wi_1.weight", f"{prefix}.wo.weight"}
    ref = ref_ffn(x.double(), state[f"{prefix}.wi_0.weight"], state[f"{prefix}.wi_1.weight"],
                  state[f"{prefix}.wo.weight"], expected_act)
    assert max_abs(ref - ys[0]) <= 1e-12 * max_abs(ys[0])
    io, entry = standard_io_and_entry(
        case, "T5DenseGatedActDense", prefix, "t5", expected_act, False, x, ys,
        notes=f'config has feed_forward_proj="{ff_proj}"; transformers sets dense_act_fn="{expected_act}"'
              + (' (legacy mapping gated-gelu -> gelu_new, the tanh approximation)' if ff_proj == "gated-gelu" else "")
              + ". wi_0 = gate (activated), wi_1 = up, wo = down. All weights cast to the variant dtype "
                "(from_pretrained would keep wo in f32 via _keep_in_fp32_modules; not done here).",
    )
    write_case(case, cfg, state, io, entry)
    return entry


def mixtral_case(case, seed):
    prefix = f"model.layers.0.block_sparse_moe.experts.{MIXTRAL_EXPERT}"
    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=MIXTRAL_EXPERTS,
                        hidden_act="silu", **DECODER_KW)
    torch.manual_seed(seed)
    experts = MixtralExperts(cfg)
    assert tuple(experts.gate_up_proj.shape) == (MIXTRAL_EXPERTS, 2 * INTER, HIDDEN)
    assert tuple(experts.down_proj.shape) == (MIXTRAL_EXPERTS, HIDDEN, INTER)
    init_params(experts, lambda name, p: p.shape[-1])  # [E, out, in] -> fan_in = in
    experts.eval()
    x = make_x()
    n_tok = X_SHAPE[0] * X_SHAPE[1]

    def call(m, xx):
        flat = xx.reshape(n_tok, HIDDEN)
        idx = torch.full((n_tok, 1), MIXTRAL_EXPERT, dtype=torch.long)
        w = torch.ones((n_tok, 1), dtype=xx.dtype)
        return m(flat, idx, w).reshape(X_SHAPE)

    ys = run_variants(experts, x, call)

    gu = experts.gate_up_proj.detach()[MIXTRAL_EXPERT]
    w1 = gu[:INTER].clone()  # gate
    w3 = gu[INTER:].clone()  # up
    w2 = experts.down_proj.detach()[MIXTRAL_EXPERT].clone()
    state = {f"{prefix}.w1.weight": w1, f"{prefix}.w3.weight": w3, f"{prefix}.w2.weight": w2}

    # cross-check: plain LlamaMLP with gate=w1, up=w3, down=w2 gives the same f64 result
    lcfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu", mlp_bias=False, **DECODER_KW)
    lm = LlamaMLP(lcfg)
    lm.load_state_dict({"gate_proj.weight": w1, "up_proj.weight": w3, "down_proj.weight": w2})
    lm = lm.double().eval()
    with torch.no_grad():
        y_llama = lm(x.double())
    assert max_abs(y_llama - ys[0]) <= 1e-12 * max_abs(ys[0]), max_abs(y_llama - ys[0])
    # other experts must give something different (routing really selected expert 2)
    with torch.no_grad():
        e64 = copy.deepcopy(experts).double()
        flat = x.double().reshape(n_tok, HIDDEN)
        y_other = e64(flat, torch.full((n_tok, 1), 0, dtype=torch.long), torch.ones(n_tok, 1, dtype=torch.float64))
    assert max_abs(y_other.reshape(X_SHAPE) - ys[0]) > 1e-3 * max_abs(ys[0])
    # the on-disk -> fused conversion (cat([w1, w3], 0)) matches transformers' conversion_mapping
    assert torch.equal(torch.cat([w1, w3], 0), experts.gate_up_proj.detach()[MIXTRAL_EXPERT])

    io, entry = standard_io_and_entry(
        case, "MixtralExperts", prefix, "mixtral", "silu", False, x, ys,
        notes=f"transformers 5 fuses experts in memory (gate_up_proj [E, 2I, H] = per-expert cat([w1, w3], 0), "
              f"down_proj [E, H, I] = w2). Reference = MixtralExperts.forward with every token routed to "
              f"expert {MIXTRAL_EXPERT} with weight 1.0 (num_local_experts={MIXTRAL_EXPERTS}); only expert "
              f"{MIXTRAL_EXPERT}'s on-disk tensors w1 (gate), w3 (up), w2 (down) are saved. "
              f"config._experts_implementation={getattr(cfg, '_experts_implementation', None)!r}.",
    )
    write_case(case, cfg, state, io, entry)
    return entry


# --------------------------------------------------------------------------------------
def main():
    torch.set_num_threads(1)  # reproducible CPU reductions
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)

    # ---- activation sanity: exact vs tanh GELU at x = -3
    v = torch.tensor([-3.0], dtype=torch.float64)
    ge = float(ACT2FN["gelu"](v))
    gt = float(ACT2FN["gelu_new"](v))
    gpt = float(ACT2FN["gelu_pytorch_tanh"](v))
    assert abs(ge - (-0.0040497)) < 1e-6, ge
    assert abs(gt - (-0.0036374)) < 1e-6, gt
    assert abs(gpt - gt) < 1e-12, (gpt, gt)

    cases = []
    seed = 1000
    llama_mods = {}
    for act in LLAMA_ACTS:
        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act=act, mlp_bias=False, **DECODER_KW)
        entry, mlp, x, rng = llama_like_case(f"llama_{act}", seed, cfg, LlamaMLP, act)
        llama_mods[act] = (mlp, x)
        if act == "gelu":
            print(f"  gate pre-activation range (llama_gelu): [{rng[0]:.3f}, {rng[1]:.3f}]")
        cases.append(entry)
        seed += 1

    # ---- exact vs tanh GELU distinguishable on real data (same weights, same x)
    mlp, x = llama_mods["gelu"]
    m_exact = copy.deepcopy(mlp).double()
    m_tanh = copy.deepcopy(mlp).double()
    m_tanh.act_fn = ACT2FN["gelu_new"]
    with torch.no_grad():
        d = max_abs(m_exact(x.double()) - m_tanh(x.double()))
    print(f"  |gelu - gelu_new| on llama_gelu weights (f64): {d:.3e}")
    assert d > 1e-5, d

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu", mlp_bias=True, **DECODER_KW)
    entry, *_ = llama_like_case("llama_bias_silu", seed, cfg, LlamaMLP, "silu")
    cases.append(entry)
    seed += 1

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu", mlp_bias=False, **DECODER_KW)
    entry, *_ = llama_like_case(
        "llama_swish_beta", seed, cfg, LlamaMLP, "swish(1.5)", act_override=SwishBeta(),
        notes='act_fn replaced by x * sigmoid(1.5 * x) (Swish beta=1.5, not in ACT2FN); config.json is the '
              'LlamaConfig as saved and still says hidden_act="silu" - the activation must come from the manifest.',
    )
    cases.append(entry)
    seed += 1

    from transformers.activations import GELUTanh

    cfg = GemmaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="gelu_pytorch_tanh", head_dim=12,
                      **DECODER_KW)
    assert not hasattr(cfg, "hidden_activation") or cfg.hidden_activation is None
    entry, *_ = llama_like_case("gemma_gelu_pytorch_tanh", seed, cfg, GemmaMLP, "gelu_pytorch_tanh",
                                expect_act_cls=GELUTanh)
    cases.append(entry)
    seed += 1

    cfg = GemmaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="gelu", head_dim=12, **DECODER_KW)
    rewritten = cfg.hidden_act
    assert rewritten == "gelu_pytorch_tanh", rewritten  # transformers 5 legacy mapping in __post_init__

    def restore_legacy(text):
        old = '"hidden_act": "gelu_pytorch_tanh"'
        assert text.count(old) == 1, text
        return text.replace(old, '"hidden_act": "gelu"')

    entry, *_ = llama_like_case(
        "gemma_legacy_gelu", seed, cfg, GemmaMLP, "gelu_pytorch_tanh", expect_act_cls=GELUTanh,
        config_fixup=restore_legacy,
        notes='Legacy Gemma checkpoint: config.json says hidden_act="gelu", but GemmaConfig.__post_init__ '
              '(transformers 5) rewrites it to "gelu_pytorch_tanh" (tanh approximation) and GemmaMLP uses '
              'GELUTanh. transformers would save "gelu_pytorch_tanh", so config.json was hand-edited to restore '
              '"hidden_act": "gelu" (the only change). Effective activation = gelu_pytorch_tanh.',
    )
    cases.append(entry)
    # re-reading the hand-edited config through transformers still gives the tanh GELU
    reread = GemmaConfig.from_json_file(str(OUT / "gemma_legacy_gelu" / "config.json"))
    assert reread.hidden_act == "gelu_pytorch_tanh"
    assert json.loads((OUT / "gemma_legacy_gelu" / "config.json").read_text())["hidden_act"] == "gelu"
    assert type(GemmaMLP(reread).act_fn) is GELUTanh
    seed += 1

    cases.append(phi3_case("phi3_silu", seed))
    seed += 1

    from transformers.activations import NewGELUActivation, SiLUActivation

    cases.append(t5_case("t5_gated_gelu", seed, "gated-gelu", "gelu_new", NewGELUActivation))
    seed += 1
    cases.append(t5_case("t5_gated_silu", seed, "gated-silu", "silu", SiLUActivation))
    seed += 1

    cases.append(mixtral_case("mixtral_silu", seed))
    seed += 1

    manifest = {"torch": torch.__version__, "transformers": transformers.__version__, "cases": cases}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(cases)} cases to {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
