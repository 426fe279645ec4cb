"""The SmolLM2-135M-Instruct Q4_1 GGUF the reference scripts read: where
scripts/fetch_smollm2.sh caches it, and its checksum (shared by those scripts, which import it
from this directory)."""

import hashlib
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_gguf_path() -> Path:
    """`$CANDLE_GLU_CACHE/<name>`, the cache defaulting to `${XDG_CACHE_HOME:-~/.cache}/candle-glu`
    (an empty variable counts as unset), as fetch_smollm2.sh and the tests resolve it."""
    cache = os.environ.get("CANDLE_GLU_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(xdg, "candle-glu")
    return Path(cache) / GGUF_NAME


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_gguf(path: Path) -> str:
    """Exits with a message unless `path` is the GGUF fetch_smollm2.sh fetches; its sha256."""
    if not path.is_file():
        sys.exit(f"error: {path} not found; run scripts/fetch_smollm2.sh first")
    digest = sha256_of(path)
    if digest != GGUF_SHA256:
        sys.exit(f"error: {path} has sha256 {digest}, expected {GGUF_SHA256}")
    return digest
