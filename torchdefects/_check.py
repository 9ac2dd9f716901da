"""Validation helpers shared by every module.

Argument checks (plain Python) run once, at construction; tensor checks run on
every call and are scriptable. Messages name the argument, what was expected
and what came: ``"pixel_threshold must be finite, got nan"``.
"""

import math
import numbers
from typing import Any, List

import torch
from torch import Tensor

__all__: List[str] = []


# ----------------------------------------------------------------------------
# Tensor checks: scriptable, run per call.
# ----------------------------------------------------------------------------


def _as_b1hw(x: Tensor, name: str) -> Tensor:
    """Return ``x`` as (B, 1, H, W); accept (B, H, W) or (B, 1, H, W)."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4 and x.shape[1] == 1:
        return x
    raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {list(x.shape)}")


def _as_bhw(x: Tensor, name: str) -> Tensor:
    """Return ``x`` as (B, H, W); accept (B, H, W) or (B, 1, H, W)."""
    if x.dim() == 3:
        return x
    if x.dim() == 4 and x.shape[1] == 1:
        return x.squeeze(1)
    raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {list(x.shape)}")


def _check_float_map(x: Tensor, name: str) -> None:
    if not (
        x.dtype == torch.float32
        or x.dtype == torch.float64
        or x.dtype == torch.float16
        or x.dtype == torch.bfloat16
    ):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {str(x.dtype)}")


def _check_bool_mask(x: Tensor, name: str) -> None:
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {str(x.dtype)}")


def _as_per_image(x: Tensor, batch: int, name: str) -> Tensor:
    """Return ``x`` as (B,); accept a scalar tensor, shape (1,) or shape (B,)."""
    if (
        x.dtype == torch.bool
        or x.dtype == torch.complex64
        or x.dtype == torch.complex128
        or x.dtype == torch.complex32
    ):
        raise TypeError(f"{name} must be a real number tensor, got {str(x.dtype)}")
    if x.dim() == 0:
        return x.expand(batch)
    if x.dim() == 1 and (x.shape[0] == batch or x.shape[0] == 1):
        return x.expand(batch)
    raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {list(x.shape)}")


# ----------------------------------------------------------------------------
# Eager-only checks: plain Python, per call, behind ``not torch.jit.is_scripting()``.
# ----------------------------------------------------------------------------


def _is_tracing() -> bool:
    """True while TorchScript tracing, torch.compile or torch.export traces the code.

    Value checks that read a tensor back to the host (a sync, and a data-dependent branch
    that tracing cannot follow) run only when this is False.
    """
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    for probe in ("is_compiling", "is_exporting"):
        fn = getattr(compiler, probe, None)
        if fn is not None and fn():
            return True
    return False


def _check_tensor(x: Any, name: str) -> None:
    """``x`` must be a torch.Tensor; NumPy arrays get a hint instead of a deep AttributeError."""
    if isinstance(x, Tensor):
        return
    module = type(x).__module__
    kind = type(x).__name__ if module == "builtins" else f"{module}.{type(x).__name__}"
    hint = " (convert it with torch.from_numpy)" if module == "numpy" else ""
    raise TypeError(f"{name} must be a torch.Tensor, got {kind}{hint}")


def _number_or_tensor(x: Any, name: str) -> Any:
    """A Python number becomes a float64 scalar tensor; a tensor is returned; None stays None."""
    if x is None or isinstance(x, Tensor):
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        hint = " (convert it with torch.from_numpy)" if type(x).__module__ == "numpy" else ""
        raise TypeError(
            f"{name} must be a number or a torch.Tensor, got {_fmt(x)} ({type(x).__name__}){hint}"
        )
    return torch.tensor(float(x), dtype=torch.float64)


def _check_finite_values(x: Tensor, name: str, allow_inf: bool = False) -> None:
    """No value of ``x`` is NaN (nor infinite unless ``allow_inf``).

    One host sync: eager only, skipped while tracing, scripting or compiling.
    """
    if _is_tracing() or x.numel() == 0 or x.is_meta or not x.is_floating_point():
        return
    bad = torch.isnan(x) if allow_inf else ~torch.isfinite(x)
    if bool(bad.any()):
        value = x[bad][0].item()
        what = "not NaN" if allow_inf else "finite"
        raise ValueError(f"{name} must be {what}, got {value}")


# ----------------------------------------------------------------------------
# Argument checks: plain Python, run once.
# ----------------------------------------------------------------------------


def _fmt(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_choice(name: str, value: object, choices: tuple) -> None:
    # Same type as the choices too: 8.0 and True are not the connectivity 8 or 1.
    if value not in choices or type(value) is not type(choices[0]):
        allowed = ", ".join(_fmt(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {_fmt(value)}")


def check_int(name: str, value: object, minimum: int = 0, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {kind}, got {_fmt(value)} ({type(value).__name__})")
    if value < minimum:
        tail = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{tail}, got {value}")


def check_ksize(name: str, value: object) -> None:
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value == 0 or (value >= 3 and value % 2 == 1))
    )
    if not ok:
        raise ValueError(f"{name} must be 0 or an odd integer >= 3, got {_fmt(value)}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {_fmt(value)}")


def check_finite(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {kind}, got {_fmt(value)} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_roi(name: str, value: object, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 4  # type: ignore[arg-type]
    ):
        raise ValueError(f"{name} must be four numbers [x1, y1, x2, y2] in [0, 1], got {value!r}")
    for i, v in enumerate(value):  # type: ignore[arg-type]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be a finite number, got {v!r}")


def check_device(spec: str, local_rank: int = 0) -> torch.device:
    """``--device`` value to a device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``.

    ``auto`` and a bare ``cuda`` pick GPU ``local_rank`` (modulo the GPU count), so that
    each process of a ``torchrun`` job gets its own.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
