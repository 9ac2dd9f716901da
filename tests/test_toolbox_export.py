"""The toolbox stages the head calls export with torch.export (dynamic sizes) and ONNX."""

import numpy as np
import pytest
import torch
from torch.export import Dim

from torchdefects.ellipse import dilate_ellipse
from torchdefects.filters import border_ignore, smooth_map
from torchdefects.normalize import normalize_map
from torchdefects.region_filters import quantile_keep, region_keep
from torchdefects.regions import Regions
from torchdefects.severity import parse_severity_rules, severity_classes
from torchdefects.shape import shape_stats

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

B, H, W = Dim("B", min=1, max=64), Dim("H", min=2, max=1024), Dim("W", min=2, max=1024)
R = Dim("R", min=0, max=1 << 20)
MAP = {0: B, 2: H, 3: W}
RULES = parse_severity_rules([{"name": "a", "min_area": 3}, {"name": "b", "min_score_max": 0.5}])


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _regions(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    bi = (torch.arange(n) >= n // 2).long()
    box = torch.randint(0, 10, (n, 4), generator=g)
    box[:, 2:] += box[:, :2]
    return (
        bi,
        torch.arange(n) + 1,
        torch.randint(1, 50, (n,), generator=g),
        box,
        torch.rand(n, 2, dtype=torch.float64, generator=g),
        torch.rand(n, generator=g),
        torch.rand(n, generator=g),
    )


def _map(b, h, w, seed=0):
    return torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(seed))


CASES = {
    "border_ignore": (lambda x: border_ignore(x, 3), lambda s: (_map(2, 33, 40, s),), (MAP,)),
    "gaussian": (
        lambda x: smooth_map(x, "gaussian", 5, 0.0),
        lambda s: (_map(2, 33, 40, s),),
        (MAP,),
    ),
    "box": (lambda x: smooth_map(x, "box", 4, 0.0), lambda s: (_map(2, 33, 40, s),), (MAP,)),
    "median": (lambda x: smooth_map(x, "median", 3, 0.0), lambda s: (_map(2, 33, 40, s),), (MAP,)),
    "dilate_ellipse": (
        lambda x: dilate_ellipse(x, 5),
        lambda s: (_map(2, 33, 40, s) > 0.95,),
        (MAP,),
    ),
    "normalize_map": (
        normalize_map,
        lambda s: (_map(2, 33, 40, s), torch.tensor([0.5, 0.4]), torch.zeros(2), torch.ones(2)),
        (MAP, {0: B}, {0: B}, {0: B}),
    ),
    "shape_stats": (
        lambda *r: tuple(shape_stats(Regions(*r))),
        lambda s: _regions(8, s),
        ({0: R},) * 7,
    ),
    "region_keep": (
        lambda *r: region_keep(Regions(*r), 2, 0.3, 0.2, 0.3, 3.0),
        lambda s: _regions(8, s),
        ({0: R},) * 7,
    ),
    "quantile_keep": (
        lambda k, *r: quantile_keep(Regions(*r), k, 2, 0.5),
        lambda s: (torch.arange(8) % 3 != 0,) + _regions(8, s),
        ({0: R},) * 8,
    ),
    "severity_classes": (
        lambda f, bi: severity_classes(f, RULES.thresholds, RULES.active, bi, 2),
        lambda s: (
            torch.rand(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) * 5,
            _regions(8)[0],
        ),
        ({0: R}, {0: R}),
    ),
}


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_and_onnx(name, tmp_path):
    fn, make, dyn = CASES[name]
    args = make(0)
    ep = torch.export.export(_Fn(fn), args, dynamic_shapes=(dyn,), strict=False)
    other = make(1)
    if name in ("border_ignore", "gaussian", "box", "median", "dilate_ellipse", "normalize_map"):
        other = tuple(a[:1] if a.dim() == 1 else a for a in other)
        other = (other[0][:1, :, :17, :29],) + other[1:]
    for a, b in zip(_as_tuple(ep.module()(*other)), _as_tuple(fn(*other))):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    path = str(tmp_path / f"{name}.onnx")
    torch.onnx.export(ep, args, f=path, dynamo=True)
    sess = ort.InferenceSession(path)
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), other)}
    for got, ref in zip(sess.run(None, feeds), _as_tuple(fn(*other))):
        ref = ref.numpy()
        if ref.dtype.kind == "f":
            # onnxruntime's kernels may order float sums differently: float32 rounding.
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, ref)
