#!/usr/bin/env python3
"""SmolLM2-135M-Instruct end to end: `examples/generate.rs` against llama.cpp, alternating.

Each round runs our `generate` example as a process (greedy, 64 tokens after a 128-token
paragraph; it prints its own prompt and decode timings), then llama.cpp (llama-cpp-python, in
this process, model loaded once) on the same GGUF, the same token ids and the same number of
greedy steps. Reports prompt tokens/s and decode tokens/s of both, per round and as medians, and
ours ÷ llama.cpp per round: their median and range (the rounds' own ratios, so that a phase of
the machine hits both sides of a round alike). Loading is never timed.

    pip install llama-cpp-python      # about 12 minutes: builds llama.cpp from source
    cargo build --release --example generate
    python3 scripts/bench_e2e.py [--rounds 5] [--threads 2] [--json out.json]

llama.cpp runs with its defaults (its repacked CPU buffers included), except on a CPU with AMX,
where its AMX path crashes on Q4_1: there it loads with its extra buffer types off
(`use_extra_bufts = False`), i.e. on its AVX-512 kernels. Not part of the tests or CI.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# 128 tokens with SmolLM2's tokenizer.
PROMPT = (
    "The history of bread is as old as farming itself. Around ten thousand years ago, people in "
    "the Fertile Crescent began to grow wheat and barley, grinding the grains between stones and "
    "baking flat cakes on hot embers. Leavened bread came later, probably by accident, when wild "
    "yeasts settled into a dough that was left out too long. The Egyptians learned to keep a "
    "piece of old dough to start the next batch, and they built the first closed ovens. Greek "
    "and Roman bakers turned the craft into a trade, with guilds, mills turned by animals, and "
    "dozens of kinds of loaves. In the centuries that followed,"
)


def default_gguf() -> Path:
    cache = os.environ.get("CANDLE_GLU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "candle-glu")
    return Path(cache) / NAME


def run_ours(exe: Path, gguf: Path, tokens: int, extra: list[str]) -> dict:
    cmd = [str(exe), "--weights", str(gguf), "--prompt", PROMPT, "--max-tokens", str(tokens),
           "--ignore-eos", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    prompt = re.search(r"prompt\s+(\d+) tokens in ([\d.]+) ms", out.stderr)
    decode = re.search(r"(\d+) decode steps in ([\d.]+) ms", out.stderr)
    if not prompt or not decode:
        raise SystemExit(f"unexpected output from generate:\n{out.stderr}")
    n, ms = int(prompt[1]), float(prompt[2])
    steps, dms = int(decode[1]), float(decode[2])
    return {"prompt_tokens": n, "prompt_tps": n / ms * 1e3, "decode_steps": steps,
            "decode_tps": steps / dms * 1e3, "text": out.stdout}


def run_llama(llm, ids: list[int], tokens: int) -> dict:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - start
    out = []
    start = time.perf_counter()
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(nxt)
    for _ in range(tokens - 1):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
    decode_s = time.perf_counter() - start
    return {"prompt_tokens": len(ids), "prompt_tps": len(ids) / prompt_s,
            "decode_steps": tokens - 1, "decode_tps": (tokens - 1) / decode_s,
            "text": llm.detokenize(out).decode("utf-8", errors="replace")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=default_gguf())
    ap.add_argument("--exe", type=Path, default=ROOT / "target/release/examples/generate")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-args", default="", help="extra arguments for generate")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"no GGUF at {args.gguf}: run scripts/fetch_smollm2.sh")
    if not args.exe.is_file():
        raise SystemExit(f"no {args.exe}: run cargo build --release --example generate")
    try:
        from llama_cpp import Llama, __version__ as llama_version
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")

    amx = "amx_tile" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    if amx:
        # `Llama(...)` ignores unknown keyword arguments: set the model parameter at its source.
        import llama_cpp
        defaults = llama_cpp.llama_model_default_params

        def no_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = no_extra_bufts
        llama_cpp.llama.llama_cpp.llama_model_default_params = no_extra_bufts
    llm = Llama(model_path=str(args.gguf), n_ctx=512, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    env_threads = {"RAYON_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)
    extra = args.ours_args.split()
    # Warm-up: page cache, CPU frequency.
    run_ours(args.exe, args.gguf, 8, extra)
    run_llama(llm, ids, 8)
    rounds = []
    for r in range(args.rounds):
        pair = {}
        # Alternate which goes first.
        order = ["ours", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "ours"]
        for who in order:
            pair[who] = (run_ours(args.exe, args.gguf, args.tokens, extra) if who == "ours"
                         else run_llama(llm, ids, args.tokens))
        rounds.append(pair)
        print(f"round {r}: ours prompt {pair['ours']['prompt_tps']:7.1f} decode "
              f"{pair['ours']['decode_tps']:6.1f} tokens/s | llama.cpp prompt "
              f"{pair['llama.cpp']['prompt_tps']:7.1f} decode "
              f"{pair['llama.cpp']['decode_tps']:6.1f} tokens/s", flush=True)
    med = {who: {k: statistics.median(r[who][k] for r in rounds)
                 for k in ("prompt_tps", "decode_tps")} for who in ("ours", "llama.cpp")}
    ratios = {k: [r["ours"][k] / r["llama.cpp"][k] for r in rounds]
              for k in ("prompt_tps", "decode_tps")}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    spread = {k: f"{min(v):.2f}–{max(v):.2f}" for k, v in ratios.items()}
    print(f"\n{len(ids)}-token prompt, {args.tokens} greedy tokens, {args.threads} threads, "
          f"{args.rounds} rounds (medians)")
    print("| | prompt, tokens/s | decode, tokens/s |\n|---|---:|---:|")
    print(f"| llama.cpp (llama-cpp-python {llama_version}) | {med['llama.cpp']['prompt_tps']:.0f} "
          f"| {med['llama.cpp']['decode_tps']:.1f} |")
    print(f"| examples/generate.rs | {med['ours']['prompt_tps']:.0f} "
          f"| {med['ours']['decode_tps']:.1f} |")
    print(f"| ours ÷ llama.cpp, per round: median (range) | {ratio['prompt_tps']:.2f} "
          f"({spread['prompt_tps']}) | {ratio['decode_tps']:.2f} ({spread['decode_tps']}) |")
    # generate prints the prompt, the continuation and a newline; llama.cpp's is the
    # continuation alone.
    same = all(r["ours"]["text"].rstrip("\n").endswith(r["llama.cpp"]["text"]) for r in rounds)
    print(f"same greedy text in every round: {same}; llama.cpp extra buffer types: "
          f"{'off (AMX)' if amx else 'on'}")
    if args.json:
        args.json.write_text(json.dumps({"llama_cpp_python": llama_version, "threads":
                                         args.threads, "prompt_tokens": len(ids),
                                         "tokens": args.tokens, "rounds": rounds,
                                         "medians": med, "ratios": ratios,
                                         "same_text": same}, indent=1) + "\n")


if __name__ == "__main__":
    main()
