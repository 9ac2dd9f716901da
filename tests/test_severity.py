import numpy as np
import pytest
import torch

from torchdefects import connected_components, region_stats
from torchdefects.severity import (
    SEVERITY_KEYS,
    parse_severity_rules,
    region_units,
    severity_classes,
    severity_features,
)
from torchdefects.shape import shape_stats

RULES = [
    {"name": "critical", "min_area_mm2": 0.5},
    {"name": "major", "min_score_max": 0.9, "min_area": 3},
    {"name": "minor", "min_score_max": 0.7},
]


def setup(seed=0):
    rng = np.random.default_rng(seed)
    m = torch.from_numpy(rng.random((4, 20, 25)) < 0.3)
    amap = torch.from_numpy(rng.random((4, 20, 25)).astype(np.float32))
    labels, counts = connected_components(m, 8)
    return region_stats(labels, counts, amap)


def test_units_by_hand():
    regions = setup()
    u = region_units(regions, 0.05, (2.0, 3.0))
    mx, my = 0.1, 0.15
    for i in range(regions.area.shape[0]):
        x1, y1, x2, y2 = regions.bbox_xyxy[i].tolist()
        assert float(u.area_mm2[i]) == pytest.approx(int(regions.area[i]) * mx * my, rel=1e-15)
        np.testing.assert_allclose(
            u.bbox_xyxy_mm[i].numpy(), [x1 * mx, y1 * my, (x2 + 1) * mx, (y2 + 1) * my], rtol=1e-15
        )
        cx, cy = regions.centroid_xy[i].tolist()
        np.testing.assert_allclose(
            u.centroid_xy_mm[i].numpy(), [(cx + 0.5) * mx, (cy + 0.5) * my], rtol=1e-15
        )
        assert float(u.length_mm[i]) == pytest.approx(
            max((x2 - x1 + 1) * mx, (y2 - y1 + 1) * my), rel=1e-15
        )
    with pytest.raises(ValueError, match="pixel_size_mm must be a finite number > 0"):
        region_units(regions, 0.0)
    with pytest.raises(ValueError, match=r"map_to_image\[1\] must be a finite number > 0"):
        region_units(regions, 0.1, (1.0, -2.0))


def oracle_classes(feat_rows, rules):
    out = []
    for f in feat_rows:
        cls = -1
        for i, rule in enumerate(rules):
            if all(f[SEVERITY_KEYS.index(k)] >= v for k, v in rule.items() if k != "name"):
                cls = i
                break
        out.append(cls)
    return out


def test_classes_against_python_rules(device):
    regions = setup(1)
    u = region_units(regions, 0.2)
    feats = severity_features(regions, u.area_mm2, u.length_mm, shape_stats(regions).aspect_ratio)
    rules = parse_severity_rules(RULES)
    rc, ic = severity_classes(
        feats.to(device), rules.thresholds, rules.active, regions.batch_index.to(device), 5
    )
    exp = oracle_classes(feats.tolist(), RULES)
    assert rc.cpu().tolist() == exp
    for b in range(5):
        cls = [c for c, bi in zip(exp, regions.batch_index.tolist()) if bi == b and c >= 0]
        assert int(ic[b]) == (min(cls) if cls else -1)
    scripted = torch.jit.script(severity_classes)
    a = scripted(feats, rules.thresholds, rules.active, regions.batch_index, 5)
    b = severity_classes(feats, rules.thresholds, rules.active, regions.batch_index, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_missing_features_never_match_and_empty():
    regions = setup(2)
    feats = severity_features(regions)  # no mm columns: NaN
    rules = parse_severity_rules([{"name": "critical", "min_area_mm2": 0.0}, {"name": "rest"}])
    rc, ic = severity_classes(feats, rules.thresholds, rules.active, regions.batch_index, 4)
    assert (rc == 1).all()
    none = parse_severity_rules([])
    rc, ic = severity_classes(feats, none.thresholds, none.active, regions.batch_index, 4)
    assert (rc == -1).all() and (ic == -1).all()
    rc, ic = severity_classes(feats[:0], rules.thresholds, rules.active, regions.batch_index[:0], 2)
    assert rc.shape == (0,) and ic.tolist() == [-1, -1]


def test_rule_errors():
    with pytest.raises(TypeError, match="severity_rules must be a list"):
        parse_severity_rules({"name": "x"})
    with pytest.raises(TypeError, match=r"severity_rules\[0\] must be a dict"):
        parse_severity_rules(["x"])
    with pytest.raises(ValueError, match=r"severity_rules\[0\].name must be a non-empty string"):
        parse_severity_rules([{"min_area": 3}])
    with pytest.raises(ValueError, match="is used by an earlier rule"):
        parse_severity_rules([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="unknown condition 'min_aera'"):
        parse_severity_rules([{"name": "a", "min_aera": 3}])
    with pytest.raises(ValueError, match=r"severity_rules\[0\].min_area must be a finite number"):
        parse_severity_rules([{"name": "a", "min_area": float("nan")}])
    with pytest.raises(ValueError, match="needs pixel_size_mm"):
        parse_severity_rules([{"name": "a", "min_area_mm2": 1.0}], has_units=False)
