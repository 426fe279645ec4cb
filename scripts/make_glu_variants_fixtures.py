#!/usr/bin/env python3
"""Fixtures for examples/glu_variants.rs and tests/glu_variants.rs.

1. tests/fixtures/glu_variants/plain_ffn.safetensors: the plain feed-forward baselines of the
   experiment, `W2·act(x·W1)`, as PyTorch computes them: torch.nn.Linear(bias=False) layers
   around torch.nn.ReLU / torch.nn.GELU() (exact, erf) / torch.nn.SiLU, with seeded weights
   (uniform ±1/sqrt(fan_in)) and a seeded input x ~ N(0, 1.5²) of shape [3, 5, 37]
   (d_model 37, d_ff 148: not multiples of the vector width). For each activation `a`:

     a.up_proj.weight [148, 37], a.down_proj.weight [37, 148]   f32, the module's weights
     a.y_f64        the module in float64 on x: the truth
     a.y_torch_f32  the f32 module on x (torch's own f32 error)
     a.grad_up, a.grad_down, a.grad_x   float64 gradients of sum(y * g) (g a seeded upstream
                                        gradient, shared) w.r.t. W1, W2 and x
   plus x (f32) and g (f64). The versions are in the file's metadata.

2. tests/fixtures/glu_variants/text/: a small slice of the training text for the example's
   process test: the first 48 KiB of King Lear (trained on) and the first 12 KiB of Hamlet
   (held out), from scripts/fetch_shakespeare.sh's folder.

Run from the repository root, after scripts/fetch_shakespeare.sh:

    pip install torch safetensors numpy && python3 scripts/make_glu_variants_fixtures.py

Deterministic: running it twice writes byte-identical files. Versions used for the committed
fixtures: torch 2.15.0 (run on the CPU), safetensors 0.8.0, numpy 2.4.6.
"""

import os
import subprocess
from pathlib import Path

import numpy
import safetensors
import torch
import torch.nn as nn
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "glu_variants"
D_MODEL, D_FF = 37, 148
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}


class PlainFFN(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up_proj = nn.Linear(D_MODEL, D_FF, bias=False)
        self.act = act()
        self.down_proj = nn.Linear(D_FF, D_MODEL, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


def plain_ffn_fixture():
    gen = torch.Generator().manual_seed(2020)
    x = 1.5 * torch.randn(3, 5, D_MODEL, generator=gen)
    g = torch.randn(3, 5, D_MODEL, generator=gen, dtype=torch.float64)
    out = {"x": x, "g": g}
    for name, act in ACTS.items():
        module = PlainFFN(act)
        with torch.no_grad():
            for lin in (module.up_proj, module.down_proj):
                bound = 1.0 / lin.in_features**0.5
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=gen) * 2 - 1) * bound)
        out[f"{name}.up_proj.weight"] = module.up_proj.weight.detach().clone()
        out[f"{name}.down_proj.weight"] = module.down_proj.weight.detach().clone()
        with torch.no_grad():
            out[f"{name}.y_torch_f32"] = module(x)
        m64 = module.to(torch.float64)
        x64 = x.to(torch.float64).requires_grad_(True)
        y64 = m64(x64)
        (y64 * g).sum().backward()
        out[f"{name}.y_f64"] = y64.detach()
        out[f"{name}.grad_up"] = m64.up_proj.weight.grad.detach()
        out[f"{name}.grad_down"] = m64.down_proj.weight.grad.detach()
        out[f"{name}.grad_x"] = x64.grad.detach()
        # An independent formula for the same thing.
        w1 = out[f"{name}.up_proj.weight"].double()
        w2 = out[f"{name}.down_proj.weight"].double()
        h = x.double() @ w1.T
        a = {"relu": torch.relu, "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / 2**0.5)),
             "swish": lambda v: v * torch.sigmoid(v)}[name](h)
        assert torch.allclose(a @ w2.T, out[f"{name}.y_f64"], rtol=0, atol=1e-12), name
        err = (out[f"{name}.y_torch_f32"].double() - y64).abs().max() / y64.abs().max()
        print(f"{name}: torch f32 relative error {err:.2e}")
    OUT.mkdir(parents=True, exist_ok=True)
    # One key: safetensors writes its metadata map in no fixed order.
    metadata = {
        "generated_by": f"scripts/make_glu_variants_fixtures.py with torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, numpy {numpy.__version__}",
    }
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "plain_ffn.safetensors"),
              metadata=metadata)


def text_slice():
    texts = Path(subprocess.check_output(["scripts/fetch_shakespeare.sh"], text=True).strip())
    d = OUT / "text"
    d.mkdir(parents=True, exist_ok=True)
    for name, size in (("lear_gut", 48 * 1024), ("hamlet_gut", 12 * 1024)):
        (d / f"{name}.txt").write_bytes((texts / f"{name}.txt").read_bytes()[:size])


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    plain_ffn_fixture()
    text_slice()
