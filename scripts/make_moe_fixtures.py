#!/usr/bin/env python3
"""Generate mixture-of-experts parity fixtures for candle-glu's `GluExperts`.

What it makes
-------------
For each family below it builds transformers' own sparse-MoE block (Mixtral's
`MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock` with its gated shared expert,
`Qwen3MoeSparseMoeBlock`, `OlmoeSparseMoeBlock`, DeepSeek-V3's `DeepseekV3MoE` with its
sigmoid, group-limited router and shared expert), fills every parameter with seeded
uniform(-b, b) values (b = 1/sqrt(fan_in); the router's rows 3x that, so that its choices
are decisive), runs a seeded input x of shape [2, 9, 72] (18 tokens) through it, and writes

    tests/fixtures/moe/<case>/config.json        config written by transformers itself
    tests/fixtures/moe/<case>/model.safetensors  f32 weights under the names checkpoints use
                                                 on disk (per-expert tensors)
    tests/fixtures/moe/<case>/fused.safetensors  (Mixtral, DeepSeek-V3) the same weights under transformers 5's
                                                 in-memory names (experts.gate_up_proj
                                                 [E, 2I, H], experts.down_proj [E, H, I])
    tests/fixtures/moe/<case>/io.safetensors     x (f32), y_f64 (f64), y_torch_f32 (f32),
                                                 y_torch_bf16 (bf16), top_k (i64, the experts
                                                 chosen per token, sorted), counts (i64,
                                                 tokens per expert)
    tests/fixtures/moe/manifest.json             versions and cases

hidden = 72, expert intermediate = 40, shared intermediate 56 (not multiples of 16);
Mixtral 8 experts top-2, Qwen2-MoE 16 top-4, Qwen3-MoE 16 top-3, OLMoE 8 top-2,
DeepSeek-V3 16 top-3 in 4 groups of which 2 compete.

* y_f64: the block in float64 (f32 weights upcast exactly). transformers' routers compute
  their softmax (and DeepSeek's sigmoid) in float32 even there, so the experts chosen and
  their weights are those of f32 routing, as in the crate.
* The seed is searched (deterministically) until the routing has an expert with no token,
  one with exactly one and one with five or more, and no near-tie: the gap between the k-th
  and the (k+1)-th score of every token is at least 1e-3 of the scores, so that f32 rounding
  differences cannot change a choice.

How to run (from the repository root)
-------------------------------------
    pip install torch transformers safetensors numpy && python3 scripts/make_moe_fixtures.py

Deterministic: running it twice writes byte-identical files.
"""

import copy
import json
import math
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

H, I, SHARED_I = 72, 40, 56
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "moe"
PREFIX = "model.layers.0.mlp."
# The cases also written under transformers 5's in-memory (stacked) names.
FUSED = ("mixtral", "deepseek_v3")

COMMON = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
              vocab_size=32, hidden_act="silu")


def cases():
    yield "mixtral", MixtralConfig(**COMMON, intermediate_size=I, num_local_experts=8,
                                   num_experts_per_tok=2), MixtralSparseMoeBlock, "block_sparse_moe."
    yield "qwen2_moe", Qwen2MoeConfig(**COMMON, moe_intermediate_size=I, num_experts=16,
                                      num_experts_per_tok=4, norm_topk_prob=False,
                                      shared_expert_intermediate_size=SHARED_I,
                                      intermediate_size=SHARED_I), Qwen2MoeSparseMoeBlock, "mlp."
    yield "qwen3_moe", Qwen3MoeConfig(**COMMON, moe_intermediate_size=I, num_experts=16,
                                      num_experts_per_tok=3, norm_topk_prob=True,
                                      intermediate_size=SHARED_I), Qwen3MoeSparseMoeBlock, "mlp."
    yield "olmoe", OlmoeConfig(**COMMON, intermediate_size=I, num_experts=8,
                               num_experts_per_tok=2, norm_topk_prob=False), OlmoeSparseMoeBlock, "mlp."
    yield "deepseek_v3", DeepseekV3Config(**COMMON, moe_intermediate_size=I, n_routed_experts=16,
                                          num_experts_per_tok=3, n_group=4, topk_group=2,
                                          n_shared_experts=1, routed_scaling_factor=2.5,
                                          norm_topk_prob=True, intermediate_size=SHARED_I,
                                          first_k_dense_replace=0, q_lora_rank=None,
                                          kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                          v_head_dim=8), DeepseekV3MoE, "mlp."


def fill(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()) + sorted(module.named_buffers()):
            fan_in = p.shape[-1] if p.dim() >= 2 else H
            bound = 1.0 / math.sqrt(fan_in)
            if name.startswith("gate.") and name.endswith("weight"):
                bound *= 3.0
            if name.endswith("e_score_correction_bias"):
                bound = 0.1
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)


def routing(module, x):
    """The experts chosen per token (sorted), the smallest gap between chosen and not, k."""
    flat = x.reshape(-1, H)
    gate = module.gate
    E = gate.num_experts
    k = gate.top_k
    with torch.no_grad():
        if isinstance(module, DeepseekV3MoE):
            logits = torch.nn.functional.linear(flat.float(), gate.weight.float())
            scores = logits.sigmoid() + gate.e_score_correction_bias
            # The group limit: only the chosen groups' experts compete.
            _, _, idx = gate(flat)
            grouped = scores.view(-1, gate.num_group, E // gate.num_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
            chosen_groups = group_scores.topk(gate.topk_group, dim=-1)[1]
            mask = torch.zeros_like(group_scores).scatter_(1, chosen_groups, 1).bool()
            scores = scores.masked_fill(~mask.repeat_interleave(E // gate.num_group, 1), -1e9)
            gs = group_scores.sort(dim=-1, descending=True)[0]
            group_gap = (gs[:, gate.topk_group - 1] - gs[:, gate.topk_group]).min().item()
        else:
            logits = torch.nn.functional.linear(flat, gate.weight)
            scores = torch.softmax(logits.float(), dim=-1)
            _, _, idx = gate(flat)
            group_gap = math.inf
    s = scores.sort(dim=-1, descending=True)[0]
    gap = (s[:, k - 1] - s[:, k]).min().item()
    return idx.sort(dim=-1)[0], min(gap, group_gap), k


def acceptable(module, x):
    idx, gap, _ = routing(module, x)
    E = module.gate.num_experts
    counts = torch.bincount(idx.flatten(), minlength=E)
    ok = (counts == 0).any() and (counts == 1).any() and (counts >= 5).any() and gap >= 1e-3
    return ok, idx, counts, gap


def fused_state(module):
    return {PREFIX + k: v.detach().clone().float().contiguous() for k, v in module.state_dict().items()}


def disk_state(case, module, prefix):
    s = {}
    p = "model.layers.0." + prefix
    s[p + "gate.weight"] = module.gate.weight
    if case == "deepseek_v3":
        s[p + "gate.e_score_correction_bias"] = module.gate.e_score_correction_bias
    gate_up, down = module.experts.gate_up_proj, module.experts.down_proj
    names = ("w1", "w3", "w2") if case == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for e in range(module.gate.num_experts):
        s[f"{p}experts.{e}.{names[0]}.weight"] = gate_up[e, :I]
        s[f"{p}experts.{e}.{names[1]}.weight"] = gate_up[e, I:]
        s[f"{p}experts.{e}.{names[2]}.weight"] = down[e]
    shared = getattr(module, "shared_expert", None) or getattr(module, "shared_experts", None)
    if shared is not None:
        sp = p + ("shared_expert." if case == "qwen2_moe" else "shared_experts.")
        for n in ("gate_proj", "up_proj", "down_proj"):
            s[sp + n + ".weight"] = getattr(shared, n).weight
    if case == "qwen2_moe":
        s[p + "shared_expert_gate.weight"] = module.shared_expert_gate.weight
    return {k: v.detach().clone().float().contiguous() for k, v in s.items()}


def main():
    torch.set_num_threads(1)
    manifest = {"torch": torch.__version__, "transformers": transformers.__version__, "cases": []}
    for case, config, cls, prefix in cases():
        for seed in range(1000):
            module = cls(config).eval()
            fill(module, 1000 * len(case) + seed)
            g = torch.Generator().manual_seed(7 + seed)
            x = 1.5 * torch.randn((2, 9, H), generator=g, dtype=torch.float32)
            ok, idx, counts, gap = acceptable(module, x)
            if ok:
                break
        else:
            raise SystemExit(f"{case}: no acceptable seed")
        with torch.no_grad():
            y32 = module(x.clone())
            y64 = copy.deepcopy(module).double()(x.double())
            ybf = copy.deepcopy(module).to(torch.bfloat16)(x.to(torch.bfloat16))
        err32 = ((y32.double() - y64).abs().max() / y64.abs().max()).item()
        errbf = ((ybf.double() - y64).abs().max() / y64.abs().max()).item()
        assert err32 < 1e-5, (case, err32)
        d = OUT / case
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(config.to_json_string(use_diff=False))
        save_file(disk_state(case, module, prefix), str(d / "model.safetensors"))
        if case in FUSED:
            save_file(fused_state(module), str(d / "fused.safetensors"))
        save_file({"x": x.contiguous(), "y_f64": y64.contiguous(), "y_torch_f32": y32.contiguous(),
                   "y_torch_bf16": ybf.contiguous(), "top_k": idx.contiguous(),
                   "counts": counts.contiguous()}, str(d / "io.safetensors"))
        entry = {"case": case, "class": cls.__name__, "prefix": "model.layers.0." + prefix,
                 "seed": seed, "tokens_per_expert": counts.tolist(), "min_gap": gap,
                 "torch_f32_rel_err": err32, "torch_bf16_rel_err": errbf}
        manifest["cases"].append(entry)
        print(json.dumps(entry))
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
