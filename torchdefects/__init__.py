"""torchdefects: defects (masks and regions) from anomaly maps, batched on the device."""

from torchdefects.config import DefectsConfig

__version__ = "0.1.0"

__all__ = [
    "DefectsConfig",
    "__version__",
]
