"""Minimal upstream repro: torch.compile (Inductor, CPU) fails to build the C++ kernel of a
bool mask padded in two passes (what a separable flat-square erosion or dilation does).

    error: operands to '?:' have different types 'VecMask<int, 1>' and 'VecMask<float, 1>'

Seen with torch 2.13.0+cpu (g++, AVX-512). It blocks ``torch.compile(DefectHead(...))`` on CPU
with Inductor's default (vectorized) C++ backend. Work-arounds, each checked:
``torch._inductor.config.cpp.simdlen = 1`` (no vectorization), ``backend="aot_eager"``, or
padding uint8 instead of bool (``m.to(torch.uint8)``, ``value=1``), which compiles.

Run: ``python scripts/repro_inductor_bool_pad.py`` (prints ``True`` once fixed upstream).
"""

import torch
import torch.nn.functional as F


def erode3(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    m = x >= t  # bool
    a = F.pad(m, [1, 1, 0, 0], value=1.0)  # rows: pad with True, AND over a 3-window
    r = a[..., :-2] & a[..., 1:-1] & a[..., 2:]
    b = F.pad(r, [0, 0, 1, 1], value=1.0)  # columns: the same
    return b[..., :-2, :] & b[..., 1:-1, :] & b[..., 2:, :]


if __name__ == "__main__":
    x, t = torch.rand(2, 1, 24, 28), torch.tensor(0.5)
    print(torch.__version__, torch.equal(torch.compile(erode3)(x, t), erode3(x, t)))
