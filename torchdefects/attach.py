"""``attach``: a detector and a :class:`~torchdefects.DefectHead` as one module.

The detector's output may be the anomaly map itself, a tuple or list, a dict, a NamedTuple
(anomalib's ``InferenceBatch``) or a dataclass; ``attach`` picks the map, and the image score
when the detector has one, and hands both to the head.
"""

from typing import Any, Final, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_MAP_FIELD", "DEFAULT_SCORE_FIELD", "attach"]

#: The field (or key) the default ``attach`` looks for: anomalib's ``InferenceBatch`` names.
DEFAULT_MAP_FIELD = "anomaly_map"
DEFAULT_SCORE_FIELD = "pred_score"

Selector = Union[int, str, None]


def _type_name(out: Any) -> str:
    return type(out).__name__


def _fields_of(out: Any) -> Tuple[str, ...]:
    """The names ``out`` can be indexed by: dict keys, NamedTuple fields, dataclass fields."""
    if isinstance(out, dict):
        return tuple(str(k) for k in out)
    fields = getattr(type(out), "_fields", None)
    if isinstance(fields, tuple):
        return fields
    dc = getattr(type(out), "__dataclass_fields__", None)
    if isinstance(dc, dict):
        return tuple(dc)
    return ()


def _get(out: Any, name: str, what: str) -> Any:
    """``out[name]`` for a dict, ``out.name`` for a NamedTuple or dataclass; clear errors."""
    if isinstance(out, dict):
        if name in out:
            return out[name]
    elif name in _fields_of(out):
        return getattr(out, name)
    known = ", ".join(_fields_of(out)) or "none"
    raise KeyError(
        f"{what}={name!r}: the detector's output ({_type_name(out)}) has no field {name!r}; "
        f"its fields: {known}"
    )


def _pick_map(out: Any, output: Selector) -> Tensor:
    """The anomaly map in a detector's output; ``output`` as :func:`attach` documents it."""
    if output is None:
        if isinstance(out, Tensor):
            return out
        if DEFAULT_MAP_FIELD in _fields_of(out):
            value = _get(out, DEFAULT_MAP_FIELD, "output")
        else:
            raise TypeError(
                f"detector returned {_type_name(out)}, not a tensor and without an "
                f"'{DEFAULT_MAP_FIELD}' field: pass output=<index>, output=<key> or "
                "output=<field name> to attach"
            )
    elif isinstance(output, int):
        if not isinstance(out, (tuple, list)) or isinstance(out, Tensor):
            raise TypeError(
                f"detector returned {_type_name(out)}, not a tuple or list: "
                f"output={output} needs a sequence"
            )
        if not -len(out) <= output < len(out):
            raise IndexError(
                f"output={output} is out of range: the detector returned {len(out)} values"
            )
        value = out[output]
    else:
        if isinstance(out, Tensor):
            raise TypeError(
                f"detector returned a tensor, not a dict, NamedTuple or dataclass: "
                f"output={output!r} needs named fields; attach it with output=None"
            )
        value = _get(out, output, "output")
    if not isinstance(value, Tensor):
        raise TypeError(
            f"the anomaly map picked by output={output!r} must be a tensor, got {_type_name(value)}"
        )
    return value


def _pick_score(out: Any, score_output: Selector, auto: bool) -> Optional[Tensor]:
    """The detector's image score, or None; with ``auto``, anomalib's field when present."""
    if score_output is None:
        if not auto or DEFAULT_SCORE_FIELD not in _fields_of(out):
            return None
        value = _get(out, DEFAULT_SCORE_FIELD, "score_output")
        # anomalib leaves pred_score None in some modes: then there is no detector score.
        return value.reshape(-1) if isinstance(value, Tensor) else None
    if isinstance(score_output, int):
        if not isinstance(out, (tuple, list)):
            raise TypeError(
                f"detector returned {_type_name(out)}, not a tuple or list: "
                f"score_output={score_output} needs a sequence"
            )
        value = out[score_output]
    else:
        value = _get(out, score_output, "score_output")
    if not isinstance(value, Tensor):
        raise TypeError(
            f"the image score picked by score_output={score_output!r} must be a tensor, "
            f"got {_type_name(value)}"
        )
    return value.reshape(-1)


class _AttachedTensor(nn.Module):
    """Detector returning the map itself (scripts), or, eagerly, anything ``attach`` reads."""

    def __init__(self, detector: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.head = head

    @torch.jit.unused
    def _eager(self, out: Any, pixel_threshold: Optional[Tensor]) -> Any:
        return self.head(
            out if isinstance(out, Tensor) else _pick_map(out, None),
            pixel_threshold,
            _pick_score(out, None, auto=True),
        )

    def forward(self, images: Tensor, pixel_threshold: Optional[Tensor] = None) -> Any:
        # Defects are decisions, not gradients: no autograd graph behind the outputs.
        with torch.no_grad():
            result = self._run(images, pixel_threshold)
        return result

    def _run(self, images: Tensor, pixel_threshold: Optional[Tensor]) -> Any:
        out = self.detector(images)
        if torch.jit.is_scripting():
            return self.head(out, pixel_threshold, None)
        return self._eager(out, pixel_threshold)


class _AttachedIndex(nn.Module):
    """Detector returning a tuple or list: the map (and the score) by index."""

    index: Final[int]
    score_index: Final[int]
    has_score: Final[bool]

    def __init__(self, detector: nn.Module, head: nn.Module, index: int, score: Optional[int]):
        super().__init__()
        self.detector = detector
        self.head = head
        self.index = index
        self.has_score = score is not None
        self.score_index = score if score is not None else 0

    @torch.jit.unused
    def _eager(self, out: Any, pixel_threshold: Optional[Tensor]) -> Any:
        score = _pick_score(out, self.score_index, auto=False) if self.has_score else None
        return self.head(_pick_map(out, self.index), pixel_threshold, score)

    def forward(self, images: Tensor, pixel_threshold: Optional[Tensor] = None) -> Any:
        # Defects are decisions, not gradients: no autograd graph behind the outputs.
        with torch.no_grad():
            result = self._run(images, pixel_threshold)
        return result

    def _run(self, images: Tensor, pixel_threshold: Optional[Tensor]) -> Any:
        out = self.detector(images)
        if torch.jit.is_scripting():
            if isinstance(out, Tensor):
                # Indexing a tensor would silently take image 0 of the batch.
                raise TypeError("detector returned a tensor: attach it with output=None")
            score: Optional[Tensor] = None
            if self.has_score:
                score = out[self.score_index].reshape(-1)
            return self.head(out[self.index], pixel_threshold, score)
        return self._eager(out, pixel_threshold)


class _AttachedKey(nn.Module):
    """Detector returning a dict (scripts), or eagerly a NamedTuple or dataclass, by name."""

    key: Final[str]
    score_key: Final[str]
    has_score: Final[bool]
    auto_score: Final[bool]

    def __init__(
        self, detector: nn.Module, head: nn.Module, key: str, score: Optional[str], auto: bool
    ) -> None:
        super().__init__()
        self.detector = detector
        self.head = head
        self.key = key
        self.has_score = score is not None
        self.score_key = score if score is not None else ""
        self.auto_score = auto

    @torch.jit.unused
    def _eager(self, out: Any, pixel_threshold: Optional[Tensor]) -> Any:
        score_sel = self.score_key if self.has_score else None
        score = _pick_score(out, score_sel, auto=self.auto_score)
        return self.head(_pick_map(out, self.key), pixel_threshold, score)

    def forward(self, images: Tensor, pixel_threshold: Optional[Tensor] = None) -> Any:
        # Defects are decisions, not gradients: no autograd graph behind the outputs.
        with torch.no_grad():
            result = self._run(images, pixel_threshold)
        return result

    def _run(self, images: Tensor, pixel_threshold: Optional[Tensor]) -> Any:
        out = self.detector(images)
        if torch.jit.is_scripting():
            score: Optional[Tensor] = None
            if self.has_score:
                score = out[self.score_key].reshape(-1)
            return self.head(out[self.key], pixel_threshold, score)
        return self._eager(out, pixel_threshold)


def attach(
    detector: nn.Module,
    head: nn.Module,
    output: Selector = None,
    score_output: Union[int, str, bool, None] = None,
) -> nn.Module:
    """One module: ``detector``, then ``head`` on the anomaly map (and image score) it returns.

    The result's ``forward(images, pixel_threshold=None)`` returns what the head returns
    (:class:`~torchdefects.Defects`, or ``StaticDefects`` for a static head). It exports
    with ``torch.export`` and ONNX (see ``docs/deployment.md``), and scripts with
    :func:`torch.jit.script` when the detector does and its output is a tensor, a tuple or
    list, or a ``Dict[str, Tensor]``.

    Args:
        detector: an ``nn.Module`` (eager or scripted) mapping images to its output.
        head: a :class:`~torchdefects.DefectHead` (eager or scripted).
        output: where the anomaly map is: ``None`` (the default) takes a tensor output
            itself, or the ``anomaly_map`` field of a NamedTuple, dataclass or dict output
            (anomalib's ``InferenceBatch``); an ``int`` indexes a tuple or list; a ``str``
            names a dict key, a NamedTuple field or a dataclass attribute.
        score_output: where the detector's image score is, passed to the head as
            ``image_score``: ``None`` (the default) takes the ``pred_score`` field when the
            output has one and it is a tensor; an ``int`` or ``str`` as for ``output``;
            ``False`` never passes one (the head then scores images by the ROI max).

    Returns:
        an ``nn.Module`` with submodules ``detector`` and ``head``.

    Raises:
        TypeError: a bad argument type; at call time, a detector output that does not match
            ``output`` or ``score_output`` (the message lists the fields it has).

    Example:
        >>> import torchdefects as td
        >>> detector = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.Sigmoid())
        >>> model = attach(detector, td.DefectHead(td.DefectsConfig(pixel_threshold=0.5)))
        >>> model(torch.rand(2, 3, 16, 16)).mask.shape
        torch.Size([2, 1, 16, 16])
    """
    if not isinstance(detector, nn.Module):
        raise TypeError(f"detector must be an nn.Module, got {_type_name(detector)}")
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module, got {_type_name(head)}")
    if isinstance(output, bool) or not isinstance(output, (int, str, type(None))):
        raise TypeError(f"output must be None, an int or a str, got {output!r}")
    if score_output is True or not isinstance(score_output, (int, str, type(None))):
        raise TypeError(f"score_output must be None, False, an int or a str, got {score_output!r}")
    auto = score_output is None
    score = None if score_output is False or score_output is None else score_output
    if output is None:
        if score is not None:
            # A named score needs a structured output: read the map by its default name.
            return _AttachedKey(detector, head, DEFAULT_MAP_FIELD, _as_str(score), auto=False)
        if score_output is False:
            return _NoScore(detector, head)
        return _AttachedTensor(detector, head)
    if isinstance(output, int):
        if score is not None and not isinstance(score, int):
            raise TypeError(
                f"score_output must be an int like output={output}, got {score_output!r}"
            )
        return _AttachedIndex(detector, head, output, score)
    if score is not None and not isinstance(score, str):
        raise TypeError(f"score_output must be a str like output={output!r}, got {score_output!r}")
    return _AttachedKey(detector, head, output, score, auto=auto)


def _as_str(score: Union[int, str]) -> str:
    if not isinstance(score, str):
        raise TypeError(
            f"score_output must be a field name (str) when output is None, got {score!r}"
        )
    return score


class _NoScore(_AttachedTensor):
    """``output=None, score_output=False``: the map as the default rule finds it, no score."""

    @torch.jit.unused
    def _eager(self, out: Any, pixel_threshold: Optional[Tensor]) -> Any:
        return self.head(_pick_map(out, None), pixel_threshold, None)
