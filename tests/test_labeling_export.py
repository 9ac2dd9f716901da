"""Labeling and hole filling under torch.export and ONNX (the ``while_loop`` path)."""

import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from tests._shapes import checkerboard, serpentine, spiral
from torchdefects.components import connected_components
from torchdefects.morphology import fill_holes


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
