#!/usr/bin/env python3
"""llama.cpp's view of SmolLM2-135M-Instruct, as an independent oracle for the end-to-end tests.

Runs the Q4_1 GGUF through llama.cpp (the `llama-cpp-python` bindings, which build llama.cpp from
source) on the four prompts of tests/fixtures/smollm2/reference.json, and writes
tests/fixtures/smollm2/llamacpp.json: llama.cpp's own token ids for each prompt, the top-5 token ids
and logits at every position, and a greedy continuation of 12 tokens.

    pip install llama-cpp-python      # about 12 minutes: builds llama.cpp
    python3 scripts/make_llamacpp_reference.py [--gguf PATH]

Used once to make the fixture; not needed by the tests or CI.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from llama_cpp import Llama, __version__ as llama_cpp_version

from smollm2_gguf import checked_gguf, default_gguf_path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, default=default_gguf_path())
    args = ap.parse_args()
    checked_gguf(args.gguf)
    ref = json.loads((ROOT / "tests/fixtures/smollm2/reference.json").read_text())
    llm = Llama(model_path=str(args.gguf), n_ctx=128, logits_all=True, n_threads=2,
                n_batch=128, seed=0, verbose=False)
    out = {"generator": "scripts/make_llamacpp_reference.py",
           "llama_cpp_python": llama_cpp_version, "prompts": []}
    for p in ref["prompts"]:
        ids = llm.tokenize(p["text"].encode(), add_bos=False, special=False)
        assert ids == p["ids"], (p["text"], ids, p["ids"])
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
        positions = []
        for pos, row in enumerate(scores):
            top = np.argsort(-row, kind="stable")[:5]
            positions.append({"pos": pos, "argmax": int(top[0]),
                              "top5_ids": [int(t) for t in top],
                              "top5_logits": [float(row[t]) for t in top]})
        greedy = []
        seq = list(ids)
        for _ in range(12):
            llm.reset()
            llm.eval(seq)
            nxt = int(np.argmax(llm.scores[len(seq) - 1]))
            greedy.append(nxt)
            seq.append(nxt)
        text = llm.detokenize(greedy).decode("utf-8", errors="replace")
        out["prompts"].append({"text": p["text"], "ids": ids, "positions": positions,
                               "greedy": {"ids": greedy, "text": text}})
        print(p["text"], "->", repr(text))
    path = ROOT / "tests/fixtures/smollm2/llamacpp.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
