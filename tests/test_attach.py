"""attach: the map (and the image score) from every detector output shape, anomalib's included."""

import dataclasses
from typing import Dict, NamedTuple, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import torchdefects as td
from torchdefects.attach import attach

CFG = td.DefectsConfig(pixel_threshold=0.6, open_ksize=3, min_area=2, max_regions=4)


class InferenceBatch(NamedTuple):
    """anomalib's output structure (anomalib.data.InferenceBatch): None fields included."""

    pred_score: Optional[Tensor] = None
    pred_label: Optional[Tensor] = None
    anomaly_map: Optional[Tensor] = None
    pred_mask: Optional[Tensor] = None


@dataclasses.dataclass
class DataclassOutput:
    anomaly_map: Tensor
    pred_score: Tensor


def _map(images: Tensor) -> Tensor:
    return torch.sigmoid(images.mean(1, keepdim=True) * 4.0)


def _score(images: Tensor) -> Tensor:
    # Deliberately not the map's max: a test can tell the detector's score from the ROI max.
    return images.mean((1, 2, 3)) + 10.0


class AnomalibLike(nn.Module):
    def forward(self, images: Tensor) -> InferenceBatch:
        return InferenceBatch(pred_score=_score(images), anomaly_map=_map(images))


class AnomalibNoScore(nn.Module):
    def forward(self, images: Tensor) -> InferenceBatch:
        return InferenceBatch(anomaly_map=_map(images))


class DataclassDetector(nn.Module):
    def forward(self, images: Tensor) -> DataclassOutput:
        return DataclassOutput(anomaly_map=_map(images), pred_score=_score(images))


class DictDetector(nn.Module):
    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        return {"map": _map(images), "score": _score(images)}


class TupleDetector(nn.Module):
    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        return _score(images), _map(images)


class TensorDetector(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        return _map(images)


@pytest.fixture
def images() -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 24, 20, generator=g)


def _expected(images: Tensor, with_score: bool):
    head = td.DefectHead(CFG)
    return head(_map(images), None, _score(images) if with_score else None)


def _same(a, b) -> None:
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.num_regions, b.num_regions)
    assert torch.equal(a.image_score, b.image_score)
    assert torch.equal(a.image_label, b.image_label)
    for x, y in zip(a.regions, b.regions):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "detector, kwargs, with_score",
    [
        (AnomalibLike(), {}, True),  # the defaults recognise InferenceBatch
        (AnomalibLike(), {"output": "anomaly_map", "score_output": "pred_score"}, True),
        (AnomalibLike(), {"output": "anomaly_map"}, True),
        (AnomalibLike(), {"score_output": False}, False),
        (AnomalibLike(), {"output": 2, "score_output": 0}, True),
        (AnomalibNoScore(), {}, False),  # pred_score None: the head scores by ROI max
        (DataclassDetector(), {}, True),
        (DataclassDetector(), {"output": "anomaly_map", "score_output": "pred_score"}, True),
        (DictDetector(), {"output": "map", "score_output": "score"}, True),
        (DictDetector(), {"output": "map"}, False),
        (TupleDetector(), {"output": 1, "score_output": 0}, True),
        (TupleDetector(), {"output": 1}, False),
        (TensorDetector(), {}, False),
    ],
)
def test_attach_picks_map_and_score(detector, kwargs, with_score, images):
    model = attach(detector, td.DefectHead(CFG), **kwargs)
    _same(model(images), _expected(images, with_score))


@pytest.mark.parametrize(
    "detector, kwargs, with_score",
    [
        (DictDetector(), {"output": "map", "score_output": "score"}, True),
        (TupleDetector(), {"output": 1, "score_output": 0}, True),
        (TupleDetector(), {"output": 1}, False),
        (TensorDetector(), {}, False),
    ],
)
def test_attach_scripts(detector, kwargs, with_score, images):
    model = torch.jit.script(attach(torch.jit.script(detector), td.DefectHead(CFG), **kwargs))
    _same(model(images), _expected(images, with_score))


def test_detector_score_sets_label_with_image_threshold(images):
    cfg = td.DefectsConfig(pixel_threshold=0.99, image_threshold=10.0)
    out = attach(AnomalibLike(), td.DefectHead(cfg))(images)
    assert torch.equal(out.image_score, _score(images).float())
    assert out.image_label.tolist() == [int(s >= 10.0) for s in _score(images).tolist()]


def test_attach_errors(images):
    head = td.DefectHead(CFG)
    with pytest.raises(KeyError, match=r"no field 'heat'.*pred_score, pred_label, anomaly_map"):
        attach(AnomalibLike(), head, output="heat")(images)
    with pytest.raises(KeyError, match=r"score_output='score'.*no field 'score'"):
        attach(AnomalibLike(), head, score_output="score")(images)
    with pytest.raises(TypeError, match="not a tensor and without an 'anomaly_map' field"):
        attach(TupleDetector(), head)(images)
    with pytest.raises(TypeError, match="output=0 needs a sequence"):
        attach(TensorDetector(), head, output=0)(images)
    with pytest.raises(IndexError, match="output=5 is out of range"):
        attach(TupleDetector(), head, output=5)(images)
    with pytest.raises(TypeError, match="must be a tensor, got NoneType"):
        attach(AnomalibLike(), head, output="pred_mask")(images)
    with pytest.raises(TypeError, match="output must be None, an int or a str"):
        attach(TensorDetector(), head, output=1.5)
    with pytest.raises(TypeError, match="score_output must be None, False"):
        attach(TensorDetector(), head, score_output=True)
    with pytest.raises(TypeError, match="score_output must be an int like output=1"):
        attach(TupleDetector(), head, output=1, score_output="x")
    with pytest.raises(TypeError, match=r"detector must be an nn\.Module"):
        attach(lambda x: x, head)
