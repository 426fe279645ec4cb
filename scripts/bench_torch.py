#!/usr/bin/env python3
"""Times PyTorch's Llama MLP on the shapes of candle-glu's benchmark, for side-by-side ratios.

    pip install torch
    python3 scripts/bench_torch.py [--threads 2] [--runs 20] [--json results.json]
    python3 scripts/bench_torch.py --vs-ours 3 --shapes small --dtypes bf16 [--tokens 1,16]

For each shape (7B: hidden 4096, intermediate 11008; small: SmolLM2's 576 -> 1536), dtype (f32,
bf16, f16) and token count (1, 16, 128, 512) it builds `down(silu(gate(x)) * up(x))` from
`torch.nn.Linear` without bias (what transformers' LlamaMLP computes), warms up, and prints the
median latency in ms and GFLOP/s (6·tokens·H·I flops). As the compare bench does, 7B runs take
turns over copies of the weights (1 GiB in all, `--copies` to change), so that every run reads
them from memory rather than from the L3. Optional: torch is never needed by the tests or CI.

The machine's speed drifts by up to 2x for minutes at a time, so a ratio between two separate runs
can mislead. `--vs-ours N` alternates, for every configuration, N times: PyTorch here, then
candle-glu's own forward in `cargo bench --bench compare -- --no-naive` (a fresh process on the
same shape, dtype and token count), and prints both medians and the median of the N per-round
ratios (PyTorch ms / candle-glu ms: above 1 means candle-glu is faster).
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

SHAPES = {"7b": (4096, 11008), "small": (576, 1536)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOKENS = [1, 16, 128, 512]


# As the compare bench's `--copies 0`: 7b runs take turns over copies of the weights that add up
# to 1 GiB, so that every run reads its weights from memory, as a model's layers do.
COLD_BYTES = 1 << 30


def time_one(h, i, dtype, tokens, runs, copies):
    gen = torch.Generator().manual_seed(0)
    layers = [
        tuple((torch.randn(o, n, generator=gen) * 0.02).to(dtype) for o, n in [(i, h), (i, h), (h, i)])
        for _ in range(copies)
    ]
    x = torch.randn(tokens, h, generator=gen).to(dtype)
    turn = [0]

    def mlp():
        wg, wu, wd = layers[turn[0]]
        turn[0] = (turn[0] + 1) % len(layers)
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    with torch.inference_mode():
        for _ in range(max(3, copies)):
            mlp()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            mlp()
            times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return ms, 6 * tokens * h * i / (ms / 1e3) / 1e9


def time_ours(shape, dname, tokens, runs, copies, threads):
    """candle-glu's median ms for one configuration, from the repository's compare bench, on
    `threads` threads as torch runs (candle's pool otherwise takes every CPU)."""
    # A built compare binary (CANDLE_GLU_COMPARE_BIN), or cargo's.
    bench = os.environ.get("CANDLE_GLU_COMPARE_BIN")
    command = [bench] if bench else ["cargo", "bench", "-q", "--bench", "compare", "--"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ours.json")
        subprocess.run(
            command + ["--no-naive", "--shape", shape,
             "--copies", str(copies),
             "--dtype", dname, "--tokens", str(tokens), "--rounds", str(runs), "--json", path],
            check=True, capture_output=True,
            env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
        with open(path) as f:
            (row,) = json.load(f)
    return row["ours_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--shapes", default="7b,small")
    ap.add_argument("--dtypes", default="f32,bf16,f16")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--vs-ours", type=int, default=0, metavar="N",
                    help="alternate with candle-glu's compare bench, N rounds per configuration")
    ap.add_argument("--copies", type=int, default=0,
                    help="copies of the weights that runs take in turn (0: as the compare bench)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads")
    for shape in args.shapes.split(","):
        h, i = SHAPES[shape]
        for dname in args.dtypes.split(","):
            for tokens in map(int, args.tokens.split(",")):
                runs = args.runs if tokens <= 128 or shape == "small" else max(5, args.runs // 4)
                size = 3 * h * i * DTYPES[dname].itemsize
                copies = args.copies or (-(-COLD_BYTES // size) if shape == "7b" else 1)
                if args.vs_ours:
                    theirs, ours = [], []
                    for _ in range(args.vs_ours):
                        theirs.append(time_one(h, i, DTYPES[dname], tokens, runs, copies)[0])
                        ours.append(time_ours(shape, dname, tokens, runs, copies, args.threads))
                    ratio = statistics.median(t / o for t, o in zip(theirs, ours))
                    ms, o_ms = statistics.median(theirs), statistics.median(ours)
                    gflops = 6 * tokens * h * i / (ms / 1e3) / 1e9
                    rows.append({"shape": shape, "dtype": dname, "tokens": tokens, "ms": ms,
                                 "gflops": gflops, "ours_ms": o_ms, "torch_over_ours": ratio})
                    print(f"{shape:>5} {dname:>4} {tokens:>4} tokens: torch {ms:9.3f} ms, "
                          f"candle-glu {o_ms:9.3f} ms, torch/candle-glu {ratio:5.2f}", flush=True)
                    continue
                ms, gflops = time_one(h, i, DTYPES[dname], tokens, runs, copies)
                rows.append({"shape": shape, "dtype": dname, "tokens": tokens, "ms": ms,
                             "gflops": gflops})
                print(f"{shape:>5} {dname:>4} {tokens:>4} tokens: {ms:9.3f} ms {gflops:8.1f} GFLOP/s",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
