#!/usr/bin/env python3
"""Generate GGUF mixture-of-experts fixtures for candle-glu's `GluExperts`.

What it makes
-------------
One tiny one-layer model per llama.cpp architecture that has experts, written by the `gguf`
package (llama.cpp's own Python writer), with the experts stacked as llama.cpp stores them
(`blk.0.ffn_{gate,up,down}_exps` [E, out, in], or `ffn_gate_up_exps` [E, 2I, H] gate rows
first) and quantized by that package's quantizers (q4k, which it only decodes, by the small
quantizer below):

    case       arch       experts          routing                                  types
    mixtral    llama      8 of 256 -> 256  softmax, top-2, renormalised              q4k
    qwen2moe   qwen2moe   8, 192 -> 64     softmax, top-3, + gated shared (192->64)  Q4_1, shared q8_0
    qwen3moe   qwen3moe   8, 192 -> 64     softmax, top-2, renormalised              q8_0
    olmoe      olmoe      8, 192 -> 64     softmax, top-2                            Q4_1
    deepseek2  deepseek2  8, 192 -> 64     sigmoid + exp_probs_b, 4 groups of which  gate_up q8_0,
                                           2 compete, top-3, renormalised, x 2.5,    down Q4_1
                                           + shared (192 -> 64)

Rows of 192 and 64 values hold an even number of 32-value blocks: the crate dequantizes a Q4_1
weight with an odd number per row at load (candle's Q4_1 dot product takes them in pairs), and
the fixtures are for the weights that stay quantized.

    tests/fixtures/moe_gguf/<case>.gguf          the model (router `ffn_gate_inp` in f32)
    tests/fixtures/moe_gguf/<case>.io.safetensors  for each of 1, 18 and 160 tokens: x_<n>
                                                 and y_<n> (f32): the layer in float64 over
                                                 the weights as `gguf` dequantizes them,
                                                 rounded once to f32
    tests/fixtures/moe_gguf/manifest.json        versions, cases, tokens per expert

The float64 reference routes as llama.cpp does for each architecture (its `build_moe_ffn`):
scores from x.W_router^T (softmax, or DeepSeek's sigmoid), the selection bias added to choose
but not to weight, groups ranked by their two best scores, top-k, the k weights renormalised
where the architecture does, times `expert_weights_scale`; Qwen2-MoE's shared expert times
sigmoid(x.g). The seed is searched until, at 18 tokens, some expert has at most one token
(and at 1 token most have none), at 160 one has at least 44 (where the AMX tiles take q4k), and no token has a
near-tie (the k-th and (k+1)-th selection scores, and
the groups' scores, at least 2e-4 apart), so that f32 rounding cannot change a choice.

How to run (from the repository root)
-------------------------------------
    pip install gguf numpy safetensors && python3 scripts/make_moe_gguf_fixtures.py

Deterministic: running it twice writes byte-identical files.
"""

import json
import pathlib
from importlib.metadata import version

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants
from safetensors.numpy import save_file

# Beside this script, wherever it is run from.
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "moe_gguf"
TOKENS = (1, 18, 160)

CASES = [
    dict(case="mixtral", arch="llama", H=256, I=256, E=8, k=2, norm=True,
         types=dict(gate=Q.Q4_K, up=Q.Q4_K, down=Q.Q4_K)),
    dict(case="qwen2moe", arch="qwen2moe", H=192, I=64, E=8, k=3, norm=False, shared=64,
         shared_gate=True, types=dict(gate=Q.Q4_1, up=Q.Q4_1, down=Q.Q4_1, shared=Q.Q8_0)),
    dict(case="qwen3moe", arch="qwen3moe", H=192, I=64, E=8, k=2, norm=True,
         types=dict(gate=Q.Q8_0, up=Q.Q8_0, down=Q.Q8_0)),
    dict(case="olmoe", arch="olmoe", H=192, I=64, E=8, k=2, norm=False,
         types=dict(gate=Q.Q4_1, up=Q.Q4_1, down=Q.Q4_1)),
    dict(case="deepseek2", arch="deepseek2", H=192, I=64, E=8, k=3, norm=True, sigmoid=True,
         bias=True, groups=(4, 2), scale=2.5, shared=64, fused=True,
         types=dict(gate=Q.Q8_0, up=Q.Q8_0, down=Q.Q4_1, shared=Q.Q8_0)),
]


def quantize_q4_k(w):
    """Q4_K blocks for rows of a multiple of 256 values: per 32 values a 6-bit scale and
    minimum against the super-block's f16 `d` and `dmin`, codes 0..15 (a plain, not optimal,
    quantizer: the reference is what `gguf` decodes, whatever the encoding)."""
    rows = w.reshape(-1, 256).astype(np.float32)
    out = []
    for r in rows:
        sub = r.reshape(8, 32)
        mins = np.minimum(sub.min(axis=1), 0.0)
        scales = (sub.max(axis=1) - mins) / 15.0
        d = np.float16(max(scales.max(), 1e-8) / 63.0)
        dmin = np.float16(max((-mins).max(), 1e-8) / 63.0)
        sc = np.clip(np.rint(scales / np.float32(d)), 0, 63).astype(np.uint8)
        mn = np.clip(np.rint(-mins / np.float32(dmin)), 0, 63).astype(np.uint8)
        eff_s = np.float32(d) * sc.astype(np.float32)
        eff_m = np.float32(dmin) * mn.astype(np.float32)
        codes = np.zeros((8, 32), dtype=np.uint8)
        for j in range(8):
            if eff_s[j] > 0:
                codes[j] = np.clip(np.rint((sub[j] + eff_m[j]) / eff_s[j]), 0, 15)
        packed = np.zeros(12, dtype=np.uint8)
        packed[0:4] = (sc[0:4] & 63) | ((sc[4:8] >> 4) << 6)
        packed[4:8] = (mn[0:4] & 63) | ((mn[4:8] >> 4) << 6)
        packed[8:12] = (sc[4:8] & 15) | ((mn[4:8] & 15) << 4)
        qs = np.zeros(128, dtype=np.uint8)
        for pair in range(4):
            lo, hi = codes[2 * pair], codes[2 * pair + 1]
            qs[pair * 32:(pair + 1) * 32] = lo | (hi << 4)
        block = np.concatenate([np.array([d, dmin], dtype=np.float16).view(np.uint8), packed, qs])
        out.append(block)
    return np.stack(out).reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)


def quantize(w, qtype):
    """(stored bytes, the values as `gguf` dequantizes them, float64)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    data = quantize_q4_k(w) if qtype == Q.Q4_K else quants.quantize(w, qtype)
    return data, quants.dequantize(data, qtype).astype(np.float64).reshape(w.shape)


def silu(v):
    return v / (1.0 + np.exp(-v))


def choose(c, logits, bias):
    """llama.cpp's choice: (experts [T, k], weights [T, k]), and the smallest gap."""
    E, k = c["E"], c["k"]
    if c.get("sigmoid"):
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
    sel = probs + (bias if bias is not None else 0.0)
    gap = np.inf
    if "groups" in c:
        n_group, used = c["groups"]
        grouped = sel.reshape(-1, n_group, E // n_group)
        gscore = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)
        order = np.argsort(-gscore, axis=1, kind="stable")
        gs = np.take_along_axis(gscore, order, axis=1)
        gap = min(gap, (gs[:, used - 1] - gs[:, used]).min())
        allowed = np.zeros_like(gscore, dtype=bool)
        np.put_along_axis(allowed, order[:, :used], True, axis=1)
        sel = np.where(np.repeat(allowed, E // n_group, axis=1), sel, -np.inf)
    order = np.argsort(-sel, axis=1, kind="stable")
    s = np.take_along_axis(sel, order, axis=1)
    gap = min(gap, (s[:, k - 1] - s[:, k]).min())
    experts = order[:, :k]
    w = np.take_along_axis(probs, experts, axis=1)
    if c["norm"]:
        w = w / w.sum(axis=1, keepdims=True)
    w = w * c.get("scale", 1.0)
    return experts, w, gap


def forward(c, ref, x):
    xs = x.astype(np.float64)
    experts, w, _ = choose(c, xs @ ref["router"].T, ref.get("bias"))
    y = np.zeros_like(xs)
    for e in range(c["E"]):
        rows, slots = np.nonzero(experts == e)
        if len(rows) == 0:
            continue
        xe = xs[rows]
        h = silu(xe @ ref["gate"][e].T) * (xe @ ref["up"][e].T)
        y[rows] += w[rows, slots][:, None] * (h @ ref["down"][e].T)
    if "shared" in c:
        h = silu(xs @ ref["shexp_gate"].T) * (xs @ ref["shexp_up"].T)
        s = h @ ref["shexp_down"].T
        if c.get("shared_gate"):
            s = s / (1.0 + np.exp(-(xs @ ref["shexp_inp"])))[:, None]
        y += s
    return y


def routing(c, router, bias, x):
    """Tokens per expert, and the smallest gap, of the routing of x."""
    experts, _, gap = choose(c, x.astype(np.float64) @ router.astype(np.float64).T,
                             None if bias is None else bias.astype(np.float64))
    return np.bincount(experts.flatten(), minlength=c["E"]), gap


def router(c, seed):
    """The router (and selection bias) and the inputs: all that the routing depends on."""
    rng = np.random.default_rng(seed)
    H, E = c["H"], c["E"]
    r = (rng.uniform(-1, 1, (E, H)) * 3.0 / np.sqrt(H)).astype(np.float32)
    bias = rng.uniform(-0.1, 0.1, E).astype(np.float32) if c.get("bias") else None
    xs = {n: (1.5 * rng.standard_normal((n, H))).astype(np.float32) for n in TOKENS}
    return r, bias, xs


def experts(c, seed):
    rng = np.random.default_rng(seed)
    H, I, E = c["H"], c["I"], c["E"]
    u = lambda shape, fan_in: (rng.uniform(-1, 1, shape) / np.sqrt(fan_in)).astype(np.float32)
    raw = dict(gate=u((E, I, H), H), up=u((E, I, H), H), down=u((E, H, I), I))
    if "shared" in c:
        S = c["shared"]
        raw.update(shexp_gate=u((S, H), H), shexp_up=u((S, H), H), shexp_down=u((H, S), S))
        if c.get("shared_gate"):
            raw["shexp_inp"] = u((H,), H)
    return raw


def write(c, raw, path):
    t = c["types"]
    w = gguf.GGUFWriter(str(path), c["arch"])
    a = c["arch"]
    H, I, E = c["H"], c["I"], c["E"]
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(4)
    w.add_uint32(f"{a}.expert_count", E)
    w.add_uint32(f"{a}.expert_used_count", c["k"])
    if a != "llama" and a != "olmoe":
        w.add_uint32(f"{a}.expert_feed_forward_length", I)
    if a == "qwen2moe":
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", c["shared"])
    if a == "deepseek2":
        w.add_uint32(f"{a}.expert_shared_count", c["shared"] // I)
        w.add_bool(f"{a}.expert_weights_norm", c["norm"])
        w.add_float32(f"{a}.expert_weights_scale", c["scale"])
        w.add_uint32(f"{a}.expert_gating_func", 2)
        w.add_uint32(f"{a}.expert_group_count", c["groups"][0])
        w.add_uint32(f"{a}.expert_group_used_count", c["groups"][1])
        w.add_uint32(f"{a}.leading_dense_block_count", 0)
    ref = {"router": raw["router"].astype(np.float64)}
    w.add_tensor("blk.0.ffn_gate_inp.weight", raw["router"])
    if "bias" in raw:
        w.add_tensor("blk.0.exp_probs_b.bias", raw["bias"])
        ref["bias"] = raw["bias"].astype(np.float64)

    def q(name, arr, qtype):
        data, deq = quantize(arr, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        return deq

    if c.get("fused"):
        deq = q("blk.0.ffn_gate_up_exps.weight", np.concatenate([raw["gate"], raw["up"]], axis=1), t["gate"])
        ref["gate"], ref["up"] = deq[:, :I], deq[:, I:]
    else:
        ref["gate"] = q("blk.0.ffn_gate_exps.weight", raw["gate"], t["gate"])
        ref["up"] = q("blk.0.ffn_up_exps.weight", raw["up"], t["up"])
    ref["down"] = q("blk.0.ffn_down_exps.weight", raw["down"], t["down"])
    if "shared" in c:
        for n in ("gate", "up", "down"):
            ref[f"shexp_{n}"] = q(f"blk.0.ffn_{n}_shexp.weight", raw[f"shexp_{n}"], t["shared"])
        if "shexp_inp" in raw:
            w.add_tensor("blk.0.ffn_gate_inp_shexp.weight", raw["shexp_inp"])
            ref["shexp_inp"] = raw["shexp_inp"].astype(np.float64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {"gguf": version("gguf"),
                "numpy": np.__version__, "cases": []}
    for c in CASES:
        path = OUT / f"{c['case']}.gguf"
        for seed in range(10000):
            r, bias, xs = router(c, 1000 * len(c["case"]) + seed)
            routed = {n: routing(c, r, bias, xs[n]) for n in TOKENS}
            gap = min(g for _, g in routed.values())
            mid, big = routed[18][0], routed[160][0]
            if gap >= 2e-4 and mid.min() <= 1 and big.max() >= 44:
                break
        else:
            raise SystemExit(f"{c['case']}: no acceptable seed")
        raw = experts(c, 7 + seed)
        raw["router"] = r
        if bias is not None:
            raw["bias"] = bias
        ref = write(c, raw, path)
        results = {n: forward(c, ref, xs[n]) for n in TOKENS}
        io = {}
        for n in TOKENS:
            io[f"x_{n}"] = xs[n]
            io[f"y_{n}"] = results[n].astype(np.float32)
        save_file(io, str(OUT / f"{c['case']}.io.safetensors"))
        entry = {"case": c["case"], "arch": c["arch"], "seed": seed,
                 "types": {k: v.name for k, v in c["types"].items()},
                 "tokens_per_expert": {n: routed[n][0].tolist() for n in TOKENS},
                 "min_gap": float(gap)}
        manifest["cases"].append(entry)
        print(json.dumps(entry))
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
