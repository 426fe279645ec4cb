#!/usr/bin/env python3
"""Writes the committed seed corpora in fuzz/corpus/: tiny valid files of every kind the loaders
read, and a few broken ones. Standard library only; every byte is written here by hand.

    python3 fuzz/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- safetensors -------------------------------------------------------------------------------

def floats(n, scale=0.01):
    return struct.pack(f"<{n}f", *[((i * 7) % 13 - 6) * scale for i in range(n)])


def safetensors(tensors, header_extra=None):
    """tensors: list of (name, dtype, shape, bytes)."""
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if header_extra:
        header.update(header_extra)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def block(prefix, names, h=4, i=8, bias=False, fused=False):
    gate, up, down = names
    ts = []
    if fused:
        ts.append((f"{prefix}.{gate}.weight", "F32", [2 * i, h], floats(2 * i * h)))
    else:
        ts.append((f"{prefix}.{gate}.weight", "F32", [i, h], floats(i * h)))
        ts.append((f"{prefix}.{up}.weight", "F32", [i, h], floats(i * h, 0.02)))
    ts.append((f"{prefix}.{down}.weight", "F32", [h, i], floats(h * i, 0.03)))
    if bias:
        for name, n in [(gate, i), (up, i), (down, h)]:
            ts.append((f"{prefix}.{name}.bias", "F32", [n], floats(n)))
    return ts


LLAMA = ("gate_proj", "up_proj", "down_proj")
llama = block("model.layers.0.mlp", LLAMA)
st = {
    "llama": safetensors(llama),
    "llama_bias": safetensors(block("model.layers.0.mlp", LLAMA, bias=True)),
    "phi3": safetensors(block("model.layers.0.mlp", ("gate_up_proj", None, "down_proj"), fused=True)),
    "t5": safetensors(block("encoder.block.0.layer.1.DenseReluDense", ("wi_0", "wi_1", "wo"))),
    "mixtral": safetensors(block("model.layers.0.block_sparse_moe.experts.0", ("w1", "w3", "w2"))),
    "gguf_names": safetensors(block("blk.0", ("ffn_gate", "ffn_up", "ffn_down"))),
    "bf16": safetensors([(n, "BF16", s, raw[: len(raw) // 2]) for n, _, s, raw in llama]),
    "int": safetensors([(n, "I32", s, raw) for n, _, s, raw in llama]),
    "metadata": safetensors(llama, {"__metadata__": {"format": "pt"}}),
}
good = st["llama"]
st["truncated"] = good[: len(good) - 40]
st["huge_header"] = struct.pack("<Q", 1 << 62) + good[8:]
st["bad_header_len"] = struct.pack("<Q", 100) + good[8:]
# The up weight's offsets moved onto the gate's bytes.
header_len = struct.unpack("<Q", good[:8])[0]
header = json.loads(good[8 : 8 + header_len])
header["model.layers.0.mlp.up_proj.weight"]["data_offsets"] = [0, 128]
h = json.dumps(header).encode()
st["overlapping"] = struct.pack("<Q", len(h)) + h + good[8 + header_len :]
for name, data in st.items():
    out("safetensors", f"file_{name}", b"\x00" + data)

index = {"metadata": {"total_size": 0},
         "weight_map": {f"model.layers.0.mlp.{p}.{w}": "model-00001-of-00001.safetensors"
                        for p in LLAMA for w in ("weight", "bias")}}
out("safetensors", "index", b"\x01" + json.dumps(index).encode())
out("safetensors", "index_escape", b"\x01" + json.dumps({"weight_map": {"a": "../x.safetensors"}}).encode())
out("safetensors", "index_missing", b"\x01" + json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}).encode())

CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 4, "intermediate_size": 8, "hidden_act": "silu", "mlp_bias": True, "num_hidden_layers": 1},
    "gemma": {"model_type": "gemma", "hidden_size": 4, "intermediate_size": 8, "hidden_act": "gelu"},
    "gemma2": {"model_type": "gemma2", "hidden_size": 4, "intermediate_size": 8, "hidden_activation": "gelu_pytorch_tanh", "mlp_bias": True},
    "t5": {"model_type": "t5", "d_model": 4, "d_ff": 8, "feed_forward_proj": "gated-gelu", "num_layers": 1},
    "phi3": {"model_type": "phi3", "hidden_size": 4, "intermediate_size": 8},
    "mixtral": {"model_type": "mixtral", "hidden_size": 4, "intermediate_size": 8},
    "nested": {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 4, "intermediate_size": 8, "hidden_activation": "gelu_pytorch_tanh"}},
    "swish": {"hidden_size": 4, "intermediate_size": 8, "hidden_act": "swish(1.5)", "mlp_bias": True},
    "zero": {"hidden_size": 0, "intermediate_size": 8},
    "huge": {"hidden_size": 4, "intermediate_size": 10 ** 12},
}
for name, cfg in CONFIGS.items():
    text = json.dumps(cfg)
    out("config", name, text)
    out("safetensors", f"config_{name}", b"\x02" + text.encode())


# --- GGUF --------------------------------------------------------------------------------------

def gstr(s, v1=False):
    b = s.encode()
    return (struct.pack("<I", len(b)) if v1 else struct.pack("<Q", len(b))) + b


def gvalue(t, v, v1=False):
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    if t == 8:
        return gstr(v, v1)
    if t == 9:
        et, items = v
        n = struct.pack("<I", len(items)) if v1 else struct.pack("<Q", len(items))
        return struct.pack("<I", et) + n + b"".join(gvalue(et, x, v1) for x in items)
    return struct.pack(fmt[t], v)


def f16(x):
    return struct.pack("<e", x)


def quant(typ, rows, cols):
    """Bytes of a rows × cols tensor of ggml type `typ` (F32, F16, Q4_0, Q8_0)."""
    n = rows * cols
    if typ == 0:
        return floats(n)
    if typ == 1:
        return b"".join(f16(((i * 7) % 13 - 6) * 0.01) for i in range(n))
    if typ == 2:  # Q4_0: f16 scale + 16 bytes of nibbles per 32 values
        return b"".join(f16(0.01) + bytes((j * 37 + k) % 256 for k in range(16)) for j in range(n // 32))
    if typ == 3:  # Q4_1: f16 scale, f16 minimum + 16 bytes of nibbles per 32 values
        return b"".join(f16(0.01) + f16(-0.08) + bytes((j * 29 + k) % 256 for k in range(16)) for j in range(n // 32))
    if typ == 8:  # Q8_0: f16 scale + 32 int8 per 32 values
        return b"".join(f16(0.01) + bytes((j * 11 + k) % 256 for k in range(32)) for j in range(n // 32))
    raise ValueError(typ)


def gguf(tensors, metadata, version=3, alignment=32):
    """tensors: (name, [out, in], type id, bytes); metadata: (key, type id, value)."""
    v1 = version == 1
    n = (lambda x: struct.pack("<I", x)) if v1 else (lambda x: struct.pack("<Q", x))
    head = b"GGUF" + struct.pack("<I", version) + n(len(tensors)) + n(len(metadata))
    for k, t, v in metadata:
        head += gstr(k, v1) + struct.pack("<I", t) + gvalue(t, v, v1)
    data, offsets = b"", []
    for name, dims, typ, raw in tensors:
        offsets.append(len(data))
        data += raw + b"\0" * ((-len(raw)) % alignment)
    for (name, dims, typ, raw), off in zip(tensors, offsets):
        head += gstr(name, v1) + struct.pack("<I", len(dims)) + b"".join(n(d) for d in reversed(dims))
        head += struct.pack("<I", typ) + struct.pack("<Q", off)
    head += b"\0" * ((-len(head)) % alignment)
    return head + data


def llama_gguf(typ, h=32, i=64, version=3, extra=(), gate_type=None):
    meta = [("general.architecture", 8, "llama"), ("llama.embedding_length", 4, h),
            ("llama.feed_forward_length", 4, i), ("llama.block_count", 4, 1)] + list(extra)
    ts = [("blk.0.ffn_gate.weight", [i, h], gate_type if gate_type is not None else typ, quant(typ, i, h)),
          ("blk.0.ffn_up.weight", [i, h], typ, quant(typ, i, h)),
          ("blk.0.ffn_down.weight", [h, i], typ, quant(typ, h, i))]
    return gguf(ts, meta, version)


g = {
    "f32": llama_gguf(0, 32, 32),
    "f16_v2": llama_gguf(1, 32, 32, version=2),
    "q4_0": llama_gguf(2),
    "q8_0": llama_gguf(8),
    # Q4_1 with an even number of blocks per row: the AVX-512 fused kernels' path.
    "q4_1": llama_gguf(3, 64, 64),
    "q4_1_odd_blocks": llama_gguf(3),
    "v1_q4_0": llama_gguf(2, version=1),
    "tokenizer": llama_gguf(2, extra=[("tokenizer.ggml.tokens", 9, (8, ["<s>", "a", "b"])),
                                      ("tokenizer.ggml.scores", 9, (6, [0.0, -1.0, -2.0])),
                                      ("general.alignment", 4, 32)]),
    "iq2_xxs_gate": llama_gguf(2, gate_type=16),
    "q8_k_gate": llama_gguf(2, gate_type=15),
    "gemma": gguf([], [("general.architecture", 8, "gemma"), ("gemma.embedding_length", 4, 32),
                       ("gemma.feed_forward_length", 4, 64)]),
}
g["truncated"] = g["q4_0"][: len(g["q4_0"]) - 100]
g["alignment_0"] = llama_gguf(2, extra=[("general.alignment", 4, 0)])
for name, data in g.items():
    out("gguf", name, data)

total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(HERE, "corpus")) for f in fs)
print(f"wrote fuzz/corpus: {total} bytes")
