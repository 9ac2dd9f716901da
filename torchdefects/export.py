"""Scripting, saving and loading heads and detector + head modules, with their config inside.

A saved file is an ordinary TorchScript archive. Next to the code it holds three JSON extra
files (see :data:`EXTRA_FILES`), readable with plain ``torch.jit.load(path, _extra_files=...)``
where torchdefects is not installed:

- ``defects_config.json``: the :class:`~torchdefects.DefectsConfig` fields (the ``defects``
  block of a config file);
- ``threshold_provenance.json``: where the embedded ``pixel_threshold`` came from (``null``
  when the config has no threshold, so every call must pass one);
- ``torchdefects.json``: format version, torchdefects and torch versions.
"""

import json
import os
from typing import Any, Dict, Final, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from torchdefects.config import DefectsConfig, _check_provenance
from torchdefects.head import Defects

__all__ = ["EXTRA_FILES", "attach", "load_scripted", "save_scripted"]

#: Names of the JSON extra files written by :func:`save_scripted`.
EXTRA_FILES = {
    "config": "defects_config.json",
    "provenance": "threshold_provenance.json",
    "meta": "torchdefects.json",
}
_FORMAT = 1


def _found_config_json(module: nn.Module) -> Optional[str]:
    """The ``config_json`` of the first DefectHead inside ``module`` (eager or scripted)."""
    for sub in module.modules():
        value = getattr(sub, "config_json", None)
        if isinstance(value, str):
            return value
    return None


def _config_dict(module: nn.Module, config: Union[DefectsConfig, Dict[str, Any], None]) -> Dict:
    if config is None:
        found = _found_config_json(module)
        if found is None:
            raise ValueError("config must be given: module holds no DefectHead to read it from")
        config = json.loads(found)
    if isinstance(config, dict):
        config = DefectsConfig(**config)
    if not isinstance(config, DefectsConfig):
        raise TypeError(
            f"config must be a DefectsConfig, a dict or None, got {type(config).__name__}"
        )
    return config.to_dict()


def save_scripted(
    module: nn.Module,
    path: Union[str, "os.PathLike[str]"],
    config: Union[DefectsConfig, Dict[str, Any], None] = None,
    provenance: Optional[Dict[str, Any]] = None,
) -> torch.jit.ScriptModule:
    """Script ``module`` (if it is not already) and save it with config and provenance inside.

    Args:
        module: a :class:`~torchdefects.DefectHead`, a module from :func:`attach`, or their
            scripted versions (any module holding a DefectHead, or any scriptable module when
            ``config`` is given).
        path: the file to write.
        config: the config to embed; default: the one of the DefectHead inside ``module``.
        provenance: where the threshold came from, a JSON object with ``source`` one of
            ``explicit``, ``config``, ``calibration``; default: the config's
            ``pixel_threshold_provenance``, else ``{"source": "config"}`` when the config has a
            threshold, else ``null``.

    Returns:
        the scripted module that was saved.

    Raises:
        ValueError, TypeError: no config can be found, or config/provenance is invalid.

    Example:
        >>> head = DefectHead(DefectsConfig(pixel_threshold=0.5))
        >>> _ = save_scripted(head, "head.pt")  # doctest: +SKIP
        >>> module, meta = load_scripted("head.pt")  # doctest: +SKIP
    """
    cfg = _config_dict(module, config)
    if provenance is None:
        provenance = cfg.get("pixel_threshold_provenance")
    if provenance is None and cfg.get("pixel_threshold") is not None:
        provenance = {"source": "config"}
    _check_provenance("provenance", provenance)
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
    from torchdefects import __version__

    meta = {"format": _FORMAT, "torchdefects": __version__, "torch": torch.__version__}
    extra = {
        EXTRA_FILES["config"]: json.dumps(cfg, sort_keys=True, allow_nan=False),
        EXTRA_FILES["provenance"]: json.dumps(provenance, sort_keys=True, allow_nan=False),
        EXTRA_FILES["meta"]: json.dumps(meta, sort_keys=True),
    }
    torch.jit.save(scripted, os.fspath(path), _extra_files=extra)
    return scripted


def load_scripted(
    path: Union[str, "os.PathLike[str]"], map_location: Union[str, torch.device, None] = None
) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load a file written by :func:`save_scripted`.

    Args:
        path: the file.
        map_location: as in :func:`torch.jit.load`.

    Returns:
        ``(module, metadata)``; ``metadata`` has keys ``config``, ``provenance`` and ``meta``
        (``None`` where the file lacks that extra file, e.g. a plain ``torch.jit.save``).
    """
    extra = {name: "" for name in EXTRA_FILES.values()}
    module = torch.jit.load(os.fspath(path), map_location=map_location, _extra_files=extra)
    metadata: Dict[str, Any] = {}
    for key, name in EXTRA_FILES.items():
        text = extra[name]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        metadata[key] = json.loads(text) if text else None
    return module, metadata


class _AttachedTensor(nn.Module):
    """Detector returning the map itself, then the head."""

    def __init__(self, detector: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.head = head

    def forward(self, images: Tensor, pixel_threshold: Optional[Tensor] = None) -> Defects:
        out = self.detector(images)
        if not torch.jit.is_scripting() and not isinstance(out, Tensor):
            raise TypeError(
                f"detector returned {type(out).__name__}, not a tensor: "
                "pass output=<index> or output=<key> to attach"
            )
        return self.head(out, pixel_threshold)


class _AttachedIndex(nn.Module):
    """Detector returning a tuple or list, the map at ``index``, then the head."""

    index: Final[int]

    def __init__(self, detector: nn.Module, head: nn.Module, index: int) -> None:
        super().__init__()
        self.detector = detector
        self.head = head
        self.index = index

    def forward(self, images: Tensor, pixel_threshold: Optional[Tensor] = None) -> Defects:
        out = self.detector(images)
        if not torch.jit.is_scripting() and not isinstance(out, (tuple, list)):
            raise TypeError(
                f"detector returned {type(out).__name__}, not a tuple or list: "
                f"output={self.index} needs a sequence"
            )
        if isinstance(out, Tensor):
            # Scripted: indexing a tensor would silently take image 0 of the batch.
            raise TypeError("detector returned a tensor: attach it with output=None")
        return self.head(out[self.index], pixel_threshold)


class _AttachedKey(nn.Module):
    """Detector returning a dict, the map under ``key``, then the head."""

    key: Final[str]

    def __init__(self, detector: nn.Module, head: nn.Module, key: str) -> None:
        super().__init__()
        self.detector = detector
        self.head = head
        self.key = key

    def forward(self, images: Tensor, pixel_threshold: Optional[Tensor] = None) -> Defects:
        out = self.detector(images)
        if not torch.jit.is_scripting():
            if not isinstance(out, dict):
                raise TypeError(
                    f"detector returned {type(out).__name__}, not a dict: "
                    f"output='{self.key}' needs a dict"
                )
            if self.key not in out:
                keys = ", ".join(sorted(out))
                raise KeyError(f"detector output has no key '{self.key}'; keys: {keys}")
        return self.head(out[self.key], pixel_threshold)


def attach(detector: nn.Module, head: nn.Module, output: Union[int, str, None] = None) -> nn.Module:
    """One module: ``detector`` then ``head`` on the anomaly map it returns.

    The result's ``forward(images, pixel_threshold=None)`` returns :class:`~torchdefects.Defects`;
    it scripts with :func:`torch.jit.script` and saves with :func:`save_scripted`.

    Args:
        detector: an ``nn.Module`` (eager or scripted) mapping images to an anomaly map, a
            tuple/list holding it, or a ``Dict[str, Tensor]`` holding it.
        head: a :class:`~torchdefects.DefectHead` (eager or scripted).
        output: ``None`` when the detector returns the map itself, an ``int`` index into a
            tuple/list output, or a ``str`` key into a dict output.

    Returns:
        an ``nn.Module`` with submodules ``detector`` and ``head``.

    Raises:
        TypeError: a bad argument type; at call time, a detector output that does not match
            ``output``.

    Example:
        >>> detector = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.Sigmoid())
        >>> model = attach(detector, DefectHead(DefectsConfig(pixel_threshold=0.5)))
        >>> model(torch.rand(2, 3, 16, 16)).mask.shape
        torch.Size([2, 1, 16, 16])
    """
    if not isinstance(detector, nn.Module):
        raise TypeError(f"detector must be an nn.Module, got {type(detector).__name__}")
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
    if output is None:
        return _AttachedTensor(detector, head)
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise TypeError(f"output must be None, an int or a str, got {output!r}")
    if isinstance(output, int):
        return _AttachedIndex(detector, head, output)
    return _AttachedKey(detector, head, output)
