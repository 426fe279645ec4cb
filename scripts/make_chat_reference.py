#!/usr/bin/env python3
"""The SmolLM2 GGUF's chat template rendered as transformers renders it, for tests/e2e.rs.

Reads `tokenizer.chat_template` from the GGUF with the `gguf` package (llama.cpp's own reader)
and renders it with jinja2 in the environment transformers' `apply_chat_template` uses
(`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`, `add_generation_prompt`),
for a user message alone (the template adds its own system message) and after a system message.
Writes tests/fixtures/smollm2/chat.json.

    pip install gguf jinja2
    python3 scripts/make_chat_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
from importlib.metadata import version
import sys
from pathlib import Path

import gguf
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smollm2_gguf import checked_gguf, default_gguf_path

ROOT = Path(__file__).resolve().parent.parent
GGUF = Path(sys.argv[1]) if len(sys.argv) > 1 else default_gguf_path()
checked_gguf(GGUF)

reader = gguf.GGUFReader(GGUF)
field = reader.fields["tokenizer.chat_template"]
template = bytes(field.parts[field.data[0]]).decode()

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.globals["raise_exception"] = raise_exception
compiled = env.from_string(template)

cases = [
    {"system": None, "user": "What is the capital of France?"},
    {"system": "You answer in one word.", "user": "What is the capital of Germany?"},
    {"system": None, "user": "Line one\n  indented {{ braces }} and <|im_end|> text"},
]
for case in cases:
    messages = ([{"role": "system", "content": case["system"]}] if case["system"] else []) + [
        {"role": "user", "content": case["user"]}
    ]
    case["rendered"] = compiled.render(messages=messages, add_generation_prompt=True)

out = {
    "source": "scripts/make_chat_reference.py",
    "gguf": GGUF.name,
    "jinja2": jinja2.__version__,
    "gguf_package": version("gguf"),
    "template": template,
    "cases": cases,
}
path = ROOT / "tests/fixtures/smollm2/chat.json"
path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
print(f"wrote {path}")
