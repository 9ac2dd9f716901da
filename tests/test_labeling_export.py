"""Labeling, hole filling and region statistics under torch.export and ONNX Runtime."""

import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from tests._shapes import checkerboard, serpentine, spiral
from torchdefects.components import connected_components
from torchdefects.morphology import fill_holes
from torchdefects.regions import _label_regions, region_stats, select_regions


class _Label(torch.nn.Module):
    def __init__(self, connectivity: int) -> None:
        super().__init__()
        self.connectivity = connectivity

    def forward(self, mask):
        return connected_components(mask, self.connectivity)


class _Fill(torch.nn.Module):
    def forward(self, mask):
        return fill_holes(mask)


def _dims():
    d = torch.export.Dim
    return ({0: d("b", min=1, max=64), 1: d("h", min=2, max=4096), 2: d("w", min=2, max=4096)},)


def _cases():
    rng = np.random.default_rng(17)
    yield rng.random((3, 17, 23)) < 0.5
    yield rng.random((2, 9, 40)) < 0.7
    yield spiral(21)[None]
    yield serpentine(15, 12)[None]
    yield np.stack([checkerboard(8, 8), np.ones((8, 8), bool), np.zeros((8, 8), bool)])


def _scipy_label(mask, connectivity):
    return ndi.label(mask, structure=None if connectivity == 4 else np.ones((3, 3), int))


@pytest.fixture(scope="module")
def exported():
    example = (torch.rand(2, 9, 11) < 0.5,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            4: torch.export.export(_Label(4), example, dynamic_shapes=_dims()).module(),
            8: torch.export.export(_Label(8), example, dynamic_shapes=_dims()).module(),
            "fill": torch.export.export(_Fill(), example, dynamic_shapes=_dims()).module(),
        }


@pytest.mark.slow
@pytest.mark.parametrize("connectivity", [4, 8])
def test_exported_labels_match_scipy(exported, connectivity):
    for masks in _cases():
        labels, counts = exported[connectivity](torch.from_numpy(masks))
        for i, m in enumerate(masks):
            ref, n = _scipy_label(m, connectivity)
            assert counts[i].item() == n
            np.testing.assert_array_equal(labels[i].numpy(), ref)


@pytest.mark.slow
def test_exported_fill_holes_matches_scipy(exported):
    for masks in _cases():
        out = exported["fill"](torch.from_numpy(masks)).numpy()
        np.testing.assert_array_equal(out, np.stack([ndi.binary_fill_holes(m) for m in masks]))


@pytest.mark.slow
def test_onnx_labels_and_fill_match_scipy(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    example = (torch.rand(2, 9, 11) < 0.5,)
    sessions = {}
    for name, module in (("label", _Label(8)), ("fill", _Fill())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, example, dynamic_shapes=_dims(), dynamo=True, verbose=False
            )
        path = tmp_path / f"{name}.onnx"
        program.save(str(path))
        sessions[name] = ort.InferenceSession(str(path))
    for masks in _cases():
        feed = {sessions["label"].get_inputs()[0].name: masks}
        labels, counts = sessions["label"].run(None, feed)
        for i, m in enumerate(masks):
            ref, n = _scipy_label(m, 8)
            assert counts[i] == n
            np.testing.assert_array_equal(labels[i], ref)
        feed = {sessions["fill"].get_inputs()[0].name: masks}
        (filled,) = sessions["fill"].run(None, feed)
        np.testing.assert_array_equal(filled, np.stack([ndi.binary_fill_holes(m) for m in masks]))


class _Stats(torch.nn.Module):
    def forward(self, mask, amap):
        labels, counts = connected_components(mask, 8)
        return tuple(region_stats(labels, counts, amap))


class _Both(torch.nn.Module):
    def forward(self, mask, amap):
        labels, counts = connected_components(mask, 8)
        return (labels, counts, *region_stats(labels, counts, amap))


class _Fused(torch.nn.Module):
    # The head's path: labeling and statistics sharing the runs.
    def forward(self, mask, amap):
        labels, counts, regions = _label_regions(mask, 8, amap)
        return (labels, counts, *regions)


class _Select(torch.nn.Module):
    def forward(self, mask, amap):
        labels, counts = connected_components(mask, 8)
        regions = region_stats(labels, counts, amap)
        kept_labels, kept, num = select_regions(labels, regions, mask.shape[0], 3, 2)
        return (kept_labels, num, *kept)


def _stats_cases():
    rng = np.random.default_rng(23)
    for masks in _cases():
        yield masks, rng.random(masks.shape).astype(np.float32)


def _assert_same(got, expected, exact_scores):
    for g, e in zip(got, expected):
        g = np.asarray(g)
        if exact_scores or not np.issubdtype(g.dtype, np.floating):
            np.testing.assert_array_equal(g, e.numpy())
        else:
            np.testing.assert_allclose(g, e.numpy(), rtol=1e-6)


@pytest.mark.slow
def test_exported_stats_and_selection_match_eager():
    example = (torch.rand(2, 9, 11) < 0.5, torch.rand(2, 9, 11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        programs = [
            (m, torch.export.export(m, example, dynamic_shapes=_dims() * 2).module())
            for m in (_Stats(), _Select(), _Fused())
        ]
    for masks, amap in _stats_cases():
        args = (torch.from_numpy(masks), torch.from_numpy(amap))
        for module, program in programs:
            if isinstance(module, _Fused):
                module = _Both()  # the same outputs from the public functions
            # Region scores: float64 sums by scatter while exporting, rounded to float32.
            _assert_same(program(*args), module(*args), exact_scores=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, reference",
    [(_Stats, _Stats), (_Fused, _Both)],
    ids=["region_stats", "fused_labeling_and_stats"],
)
def test_onnx_matches_eager(tmp_path, module, reference):
    """region_stats alone, and the fused labeling + stats against the public functions."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    example = (torch.rand(2, 9, 11) < 0.5, torch.rand(2, 9, 11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module(), example, dynamic_shapes=_dims() * 2, dynamo=True, verbose=False
        )
    path = tmp_path / "graph.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    ref = reference()
    for masks, amap in _stats_cases():
        got = session.run(None, dict(zip(names, (masks, amap))))
        _assert_same(got, ref(torch.from_numpy(masks), torch.from_numpy(amap)), False)
