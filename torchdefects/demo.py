"""``torchdefects demo``: the whole job on made-up parts, with nothing to download.

1. Make textured surfaces (brushed, woven-looking grey metal): normal ones to fit on and
   to calibrate on, and test ones, some with planted scratches, spots and holes whose
   ground-truth masks are kept.
2. Fit :class:`PatchGaussianDetector` on the normal ones: a Gaussian over 7x7 patches,
   the anomaly score of a pixel is the Mahalanobis distance of its patch.
3. Calibrate the pixel threshold on held-out normal maps
   (:func:`~torchdefects.batch.calibrate_maps`, the code of ``torchdefects calibrate``)
   and save the config.
4. Run the batch (:func:`torchdefects.batch.run_folder`, the code of ``torchdefects run``) on the
   test images with the scripted detector: results.jsonl, masks, overlays.
5. Count the planted defects the regions hit and the regions that hit nothing.
"""

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DemoResult", "PatchGaussianDetector", "make_surface", "run_demo"]


class PatchGaussianDetector(nn.Module):
    """Anomaly map from the Mahalanobis distance of each pixel's patch to normal patches.

    The image is turned to grey, every ``patch x patch`` neighbourhood (reflect-padded)
    is whitened by one convolution (``whiten @ (p - mean)``), and the score is the
    root-mean-square of the whitened patch, smoothed by a 3x3 mean. Scriptable.

    Args:
        mean: :math:`(D,)` mean patch, ``D = patch * patch``.
        whiten: :math:`(D, D)` with ``whiten.T @ whiten`` the inverse patch covariance.
        patch: odd patch side.

    Shape:
        - Input: :math:`(B, 3, H, W)` float images in [0, 1].
        - Output: :math:`(B, 1, H, W)` float32 anomaly map.

    Example:
        >>> imgs = torch.rand(4, 3, 32, 32)
        >>> det = PatchGaussianDetector.fit(imgs, patch=3)
        >>> det(imgs).shape
        torch.Size([4, 1, 32, 32])
    """

    def __init__(self, mean: Tensor, whiten: Tensor, patch: int = 7) -> None:
        super().__init__()
        d = patch * patch
        if mean.shape != (d,) or whiten.shape != (d, d):
            raise ValueError(f"mean must be ({d},) and whiten ({d}, {d}) for patch={patch}")
        self.patch = patch
        self.register_buffer("weight", whiten.float().reshape(d, 1, patch, patch).contiguous())
        self.register_buffer("bias", -(whiten.float() @ mean.float()))

    def forward(self, x: Tensor) -> Tensor:
        gray = x.mean(dim=1, keepdim=True)
        r = self.patch // 2
        z = F.conv2d(F.pad(gray, [r, r, r, r], mode="reflect"), self.weight, self.bias)
        score = z.pow(2).mean(dim=1, keepdim=True).sqrt()
        return F.avg_pool2d(F.pad(score, [1, 1, 1, 1], mode="replicate"), 3, stride=1)

    @staticmethod
    def fit(
        images: Tensor, patch: int = 7, max_patches: int = 60000, seed: int = 0
    ) -> "PatchGaussianDetector":
        """Fit the patch Gaussian on normal images :math:`(N, 3, H, W)`."""
        gray = images.float().mean(dim=1, keepdim=True)
        r = patch // 2
        cols = F.unfold(F.pad(gray, [r, r, r, r], mode="reflect"), patch)  # (N, D, H*W)
        p = cols.permute(0, 2, 1).reshape(-1, patch * patch).double()
        if p.shape[0] > max_patches:
            g = torch.Generator().manual_seed(seed)
            p = p[torch.randperm(p.shape[0], generator=g)[:max_patches]]
        mean = p.mean(0)
        c = p - mean
        cov = c.T @ c / max(p.shape[0] - 1, 1)
        cov = cov + 1e-4 * torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
        chol = torch.linalg.cholesky(cov)
        whiten = torch.linalg.solve_triangular(
            chol, torch.eye(cov.shape[0], dtype=cov.dtype), upper=False
        )
        return PatchGaussianDetector(mean.float(), whiten.float(), patch)


# ----------------------------------------------------------------------------
# Surfaces and planted defects
# ----------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit std (FFT, periodic)."""
    n = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    g = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    s = np.real(np.fft.ifft2(np.fft.fft2(n) * g))
    s = s - s.mean()
    return s / (s.std() + 1e-12)


def make_surface(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A normal surface: fine diagonal weave, grain and slow shading; float (H, W) in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = np.deg2rad(30 + rng.uniform(-4, 4))
    period = 8.0 + rng.uniform(-0.5, 0.5)
    phase = rng.uniform(0, 2 * np.pi)
    weave = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period + phase)
    grain = _smooth_noise(rng, size, size, 1.0)
    shade = _smooth_noise(rng, size, size, 24.0 * size / 128)
    img = 0.55 + 0.10 * weave + 0.04 * grain + 0.03 * shade
    return np.clip(img, 0.0, 1.0)


def _disk(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _plant(rng: np.random.Generator, img: np.ndarray, kind: str) -> np.ndarray:
    """Plant one defect in ``img`` (in place); return its ground-truth mask."""
    size = img.shape[0]
    m = 16  # keep defects off the border
    if kind == "scratch":
        length = rng.uniform(30, 60)
        ang = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(m + 15, size - m - 15, size=2)
        bend = rng.uniform(-0.01, 0.01)
        t = np.linspace(-length / 2, length / 2, int(length * 4))
        py = cy + t * np.sin(ang) + bend * t**2
        px = cx + t * np.cos(ang)
        gt = np.zeros_like(img, dtype=bool)
        rr = np.clip(np.round(py).astype(int), 0, size - 1)
        cc = np.clip(np.round(px).astype(int), 0, size - 1)
        gt[rr, cc] = True
        thick = gt.copy()
        thick[:, 1:] |= gt[:, :-1]
        thick[1:, :] |= gt[:-1, :]
        sign = 1.0 if rng.random() < 0.5 else -1.0
        img[thick] = np.clip(img[thick] + sign * 0.35, 0, 1)
        return thick
    if kind == "spot":
        cy, cx = rng.uniform(m, size - m, size=2)
        ry, rx = rng.uniform(3, 6, size=2)
        gt = _disk(size, cy, cx, ry, rx)
        img[gt] = np.clip(img[gt] * 0.35 + 0.05, 0, 1)
        return gt
    if kind == "hole":
        cy, cx = rng.uniform(m, size - m, size=2)
        r = rng.uniform(4, 7)
        inner = _disk(size, cy, cx, r, r)
        rim = _disk(size, cy, cx, r + 1.5, r + 1.5) & ~inner
        img[inner] = 0.03
        img[rim] = 0.95
        return inner | rim
    raise ValueError(f"kind must be scratch, spot or hole, got {kind!r}")


def _to_rgb_u8(gray: np.ndarray) -> np.ndarray:
    tint = np.array([0.96, 1.0, 1.05])  # cool steel
    return np.clip(np.round(gray[:, :, None] * tint * 255), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class DemoResult:
    """What the demo found.

    Attributes:
        out: the output folder; ``results/`` holds results.jsonl, masks and overlays.
        pixel_threshold: the calibrated threshold.
        planted: defects planted in the test images.
        hit: planted defects overlapped by a found region.
        regions: regions found over all test images.
        false_regions: regions that overlap no planted defect.
        images: test images (``defective`` of them with defects).
        defective: test images with planted defects.
        seconds: wall time.
        exit_code: the batch run's exit code.
    """

    out: str
    pixel_threshold: float
    planted: int
    hit: int
    regions: int
    false_regions: int
    images: int
    defective: int
    seconds: float
    exit_code: int


def run_demo(
    out: str = "torchdefects_demo",
    seed: int = 0,
    n_train: int = 24,
    n_calib: int = 8,
    n_good_test: int = 6,
    n_bad_test: int = 12,
    size: int = 128,
    device: str = "cpu",
    quiet: bool = False,
) -> DemoResult:
    """Make data, fit, calibrate, run the batch, score against the planted defects."""
    from PIL import Image

    from torchdefects.batch import PREPROCESS_EXTRA_FILE, RunOptions, calibrate_maps, run_folder
    from torchdefects.config import DefectsConfig, save_config

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    data = os.path.join(out, "data")
    test_dir = os.path.join(data, "test")
    gt_dir = os.path.join(data, "ground_truth")
    model_dir = os.path.join(out, "model")
    for d in (test_dir, gt_dir, model_dir):
        os.makedirs(d, exist_ok=True)

    def to_tensor(grays: List[np.ndarray]) -> Tensor:
        # Through uint8 RGB, exactly as the runner will read the saved PNGs.
        u8 = np.stack([_to_rgb_u8(g) for g in grays])
        return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0

    train = to_tensor([make_surface(rng, size) for _ in range(n_train)])
    calib = to_tensor([make_surface(rng, size) for _ in range(n_calib)])
    detector = PatchGaussianDetector.fit(train)

    with torch.inference_mode():
        calib_maps = detector(calib)
    cal = calibrate_maps(list(calib_maps[:, 0]), q=0.9999, batch_size=len(calib_maps))
    threshold, provenance = cal.threshold, cal.provenance

    cfg = DefectsConfig(
        pixel_threshold=float(threshold),
        open_ksize=3,
        close_ksize=3,
        fill_holes=True,
        min_area=12,
        max_regions=10,
        connectivity=8,
        pixel_threshold_provenance=provenance,
        mask_format="png",
    )
    config_path = os.path.join(model_dir, "config.json")
    save_config(cfg, config_path)

    detector_path = os.path.join(model_dir, "detector.pt")
    meta = {"input_size": [size, size], "mean": None, "std": None, "center_crop": False}
    torch.jit.save(
        torch.jit.script(detector),
        detector_path,
        _extra_files={PREPROCESS_EXTRA_FILE: json.dumps(meta)},
    )

    kinds = ("scratch", "spot", "hole")
    truth: Dict[str, List[np.ndarray]] = {}
    for i in range(n_good_test + n_bad_test):
        img = make_surface(rng, size)
        gts: List[np.ndarray] = []
        if i >= n_good_test:
            for k in range(1 + int(rng.random() < 0.4)):
                kind = kinds[(i + k) % len(kinds)]
                gts.append(_plant(rng, img, kind))
            name = f"defect_{i - n_good_test:03d}.png"
        else:
            name = f"good_{i:03d}.png"
        path = os.path.join(test_dir, name)
        Image.fromarray(_to_rgb_u8(img), mode="RGB").save(path)
        truth[path] = gts
        if gts:
            union = np.any(np.stack(gts), axis=0)
            Image.fromarray(union.astype(np.uint8) * 255, mode="L").save(os.path.join(gt_dir, name))

    results_dir = os.path.join(out, "results")
    summary = run_folder(
        RunOptions(
            out=results_dir,
            images=test_dir,
            detector=detector_path,
            config=config_path,
            save_masks="config",
            save_overlays=True,
            regions_jsonl=True,
            report=True,
            device=device,
            batch_size=8,
            overwrite=True,
            quiet=True,
        )
    )

    from torchdefects.files import read_jsonl

    planted = hit = regions = false_regions = 0
    for rec in read_jsonl(os.path.join(results_dir, "results.jsonl")).records:
        gts = truth.get(rec["input"], [])
        planted += len(gts)
        if "defects" not in rec:
            continue
        found = _mask_of(rec, results_dir, size)
        hit += sum(1 for g in gts if (found & g).any())
        for r in rec["defects"]["regions"]:
            regions += 1
            x1, y1, x2, y2 = r["bbox_xyxy"]
            box = np.zeros((size, size), dtype=bool)
            box[y1 : y2 + 1, x1 : x2 + 1] = True
            if not any((box & g).any() for g in gts):
                false_regions += 1
    result = DemoResult(
        out=out,
        pixel_threshold=float(threshold),
        planted=planted,
        hit=hit,
        regions=regions,
        false_regions=false_regions,
        images=n_good_test + n_bad_test,
        defective=n_bad_test,
        seconds=time.perf_counter() - t0,
        exit_code=summary.exit_code,
    )
    if not quiet:
        print(_report(result))
    return result


def _mask_of(rec: Dict[str, Any], results_dir: str, size: int) -> np.ndarray:
    from PIL import Image

    mask = rec["defects"]["mask"]
    if mask is None:
        return np.zeros((size, size), dtype=bool)
    with Image.open(os.path.join(results_dir, mask["path"])) as im:
        return np.asarray(im) > 0


def _report(r: DemoResult) -> str:
    res = os.path.join(r.out, "results")
    model = os.path.join(r.out, "model")
    missed = r.planted - r.hit
    lines = [
        f"torchdefects demo: {r.images} test parts, {r.defective} of them with planted "
        f"defects ({r.planted} defects in all: some parts carry two).",
        "  A detector fitted on normal parts scored every pixel; a pixel is defective when its "
        f"score is >= {r.pixel_threshold:.4g},",
        "  the threshold calibrated on the pixels of normal parts (a quantile, see "
        "model/config.json for its provenance).",
        f"  Found {r.regions} defect regions: {r.hit} of {r.planted} planted defects are "
        "covered by a region"
        + (f" ({missed} missed)" if missed else "")
        + (
            " (one region can cover two defects that touch)"
            if r.regions - r.false_regions < r.hit
            else ""
        )
        + f"; {r.false_regions} regions lie on normal texture (false alarms).",
        f"  Look at it:  {os.path.join(res, 'report.html')} (open in a browser: every part, "
        "worst first, with its overlay)",
        f"  Files:       {os.path.join(res, 'results.jsonl')} (one record per part), masks/, "
        "overlays/",
        "  Next, on your own parts (a folder of images and a TorchScript detector):",
        f"    torchdefects run --images PARTS/ --detector {os.path.join(model, 'detector.pt')} "
        f"--config {os.path.join(model, 'config.json')} --out OUT --save-overlays --report",
        "    and see docs/calibration.md to calibrate the threshold on your normal parts.",
        f"  ({r.seconds:.1f} s)",
    ]
    return "\n".join(lines)


def main(out: Optional[str] = None, seed: int = 0, device: str = "cpu") -> Tuple[int, DemoResult]:
    """Entry point of ``torchdefects demo``; returns (exit code, result)."""
    r = run_demo(out=out or "torchdefects_demo", seed=seed, device=device)
    return (0 if r.exit_code == 0 and r.hit == r.planted else 1), r
