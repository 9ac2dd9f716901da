import numpy as np
import pytest
import torch

from torchdefects.normalize import normalize_map, sensitivity_threshold


def anomalib_normalize(preds, norm_min, norm_max, threshold):
    """anomalib PostProcessor._normalize, written from its definition."""
    if np.isnan(threshold):
        threshold = (norm_max + norm_min) / 2
    return np.clip((preds - threshold) / (norm_max - norm_min) + 0.5, 0, 1)


def test_matches_anomalib_formula(device):
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((3, 1, 9, 11)) * 4).astype(np.float64)
    thr, lo, hi = (
        np.array([1.0, 0.5, np.nan]),
        np.array([-3.0, -1.0, -2.0]),
        np.array([5.0, 2.0, 4.0]),
    )
    out = normalize_map(
        torch.from_numpy(m).to(device),
        torch.from_numpy(thr),
        torch.from_numpy(lo),
        torch.from_numpy(hi),
    )
    for b in range(3):
        np.testing.assert_allclose(
            out[b].cpu().numpy(), anomalib_normalize(m[b], lo[b], hi[b], thr[b]), rtol=1e-15, atol=0
        )
    out32 = normalize_map(
        torch.from_numpy(m).float(), torch.tensor(1.0), torch.tensor(-3.0), torch.tensor(5.0)
    )
    assert out32.dtype == torch.float32
    assert (
        float(
            normalize_map(
                torch.tensor([[[1.0]]]), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(9.0)
            )
        )
        == 0.5
    )


def test_sensitivity_equivalence():
    # anomalib: label = normalized > 1 - sensitivity; ours: raw >= shifted threshold.
    rng = np.random.default_rng(1)
    m = torch.from_numpy(rng.random((2, 1, 30, 30)) * 10)
    thr, lo, hi = (
        torch.tensor(4.0, dtype=torch.float64),
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(10.0, dtype=torch.float64),
    )
    for s in [0.1, 0.3, 0.5, 0.8]:
        raw, nthr = sensitivity_threshold(thr, lo, hi, s)
        norm = normalize_map(m, thr, lo, hi)
        assert torch.equal(norm > nthr, m > raw)
    with pytest.raises(ValueError, match="sensitivity must be in"):
        sensitivity_threshold(thr, lo, hi, 1.5)


def test_script_batch_nan_errors():
    m = torch.rand(4, 1, 6, 6)
    m[0, 0, 0, 0] = float("nan")
    args = (torch.tensor(0.5), torch.tensor(0.0), torch.tensor(1.0))
    out = normalize_map(m, *args)
    assert torch.isnan(out[0, 0, 0, 0])
    scripted = torch.jit.script(normalize_map)(m, *args)
    torch.testing.assert_close(scripted, out, equal_nan=True, rtol=0, atol=0)
    for i in range(4):
        torch.testing.assert_close(
            normalize_map(m[i : i + 1], *args), out[i : i + 1], equal_nan=True, rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="threshold must be a scalar or have shape"):
        normalize_map(m, torch.rand(3), torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match="anomaly_map must be float"):
        normalize_map(m > 0, *args)
