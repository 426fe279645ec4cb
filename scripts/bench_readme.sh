#!/usr/bin/env bash
# Reproduces the README's performance tables, in one sitting (about 20 minutes on 2 cores):
#   1. candle-glu against the naive candle MLP, in one process, alternating (dense dtypes);
#   2. the same for the GGUF types against candle's QMatMul MLP (Q4_1 at fewer token counts:
#      candle's scalar Q4_1 takes seconds a run);
#   3. candle-glu alone, alternating with PyTorch per configuration (needs `pip install torch`;
#      skipped without it).
# Results go to bench-results/ (git-ignored): the printed tables and their JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench-results
mkdir -p "$out"
cargo bench --bench compare -- --shape 7b,small --dtype bf16,f32,f16 --tokens 1,16,128,512 \
    --json "$out/dense.json" | tee "$out/dense.txt"
cargo bench --bench compare -- --shape 7b,small --dtype q8_0,q4k --tokens 1,2,4,8,16,128,512 \
    --rounds 10 --json "$out/quantized.json" | tee "$out/quantized.txt"
cargo bench --bench compare -- --shape 7b,small --dtype q4_1 --tokens 1,16,128 \
    --rounds 10 --json "$out/q4_1.json" | tee "$out/q4_1.txt"
if python3 -c "import torch" 2>/dev/null; then
    python3 scripts/bench_torch.py --vs-ours 3 --runs 10 --json "$out/torch.json" \
        | tee "$out/torch.txt"
else
    echo "torch is not installed: skipping the PyTorch comparison"
fi
