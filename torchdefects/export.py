"""Deployment files of heads and detector + head modules, with their config inside.

Three formats (docs/deployment.md shows each):

- TorchScript (:func:`save_scripted`, :func:`load_scripted`): the head as it runs in eager
  mode, returning :class:`~torchdefects.Defects`.
- ``.pt2``, a ``torch.export`` program (:func:`export_pt2`, :func:`load_pt2`), and ONNX
  (:func:`export_onnx`): the static head (:class:`~torchdefects.StaticDefects`, regions padded
  to ``max_regions``) with dynamic batch, height and width; outputs by field name.

Every file holds three JSON documents (see :data:`EXTRA_FILES`), readable where torchdefects
is not installed: TorchScript extra files (``torch.jit.load(path, _extra_files=...)``),
``torch.export.save`` extra files (``torch.export.load(path, extra_files=...)``), and ONNX
``metadata_props`` under the same names:

- ``defects_config.json``: the :class:`~torchdefects.DefectsConfig` fields (the ``defects``
  block of a config file);
- ``threshold_provenance.json``: where the embedded ``pixel_threshold`` came from (``null``
  when the config has no threshold, so every call must pass one);
- ``torchdefects.json``: format version, torchdefects and torch versions.
"""

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from torchdefects.attach import _pick_map, _pick_score, attach
from torchdefects.config import DefectsConfig, _check_provenance
from torchdefects.head import DefectHead, StaticDefectHead, StaticDefects

__all__ = [
    "EXPORT_FORMATS",
    "EXTRA_FILES",
    "attach",
    "export_from_config",
    "export_onnx",
    "export_pt2",
    "load_pt2",
    "load_scripted",
    "onnx_metadata",
    "save_scripted",
]

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
    extra_files: Optional[Dict[str, str]] = None,
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
        extra_files: more extra files to carry (a detector's ``torchdefects/preprocess.json``).

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
    provenance = _provenance(cfg, provenance)
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)

    files = dict(extra_files or {})
    files.update(_extra_files(cfg, provenance))
    torch.jit.save(scripted, os.fspath(path), _extra_files=files)
    return scripted


def _extra_files(
    cfg: Dict[str, Any], provenance: Optional[Dict[str, Any]], **meta_fields: Any
) -> Dict[str, str]:
    """The three JSON documents every exported file carries (see :data:`EXTRA_FILES`)."""
    from torchdefects import __version__

    meta = {"format": _FORMAT, "torchdefects": __version__, "torch": torch.__version__}
    meta.update(meta_fields)
    return {
        EXTRA_FILES["config"]: json.dumps(cfg, sort_keys=True, allow_nan=False),
        EXTRA_FILES["provenance"]: json.dumps(provenance, sort_keys=True, allow_nan=False),
        EXTRA_FILES["meta"]: json.dumps(meta, sort_keys=True),
    }


def _provenance(cfg: Dict[str, Any], provenance: Optional[Dict[str, Any]]) -> Optional[Dict]:
    if provenance is None:
        provenance = cfg.get("pixel_threshold_provenance")
    if provenance is None and cfg.get("pixel_threshold") is not None:
        provenance = {"source": "config"}
    _check_provenance("provenance", provenance)
    return provenance


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


# ----------------------------------------------------------------------------
# torch.export (.pt2) and ONNX: the static head, outputs by name
# ----------------------------------------------------------------------------

#: The formats of :func:`export_from_config`, and the file extension that selects each.
EXPORT_FORMATS = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}


class _ExportModule(nn.Module):
    """[detector then] static head, returning the :class:`StaticDefects` fields as a dict.

    A dict, not the NamedTuple: loading a program that returns a torchdefects type would need
    torchdefects installed. ``mask_uint8`` gives ``mask`` as uint8 0/1 (ONNX, TensorRT). The
    detector's map and image score are picked as :func:`~torchdefects.attach` picks them.
    Inputs after the first, in order: ``pixel_threshold`` (with ``threshold_input``), then
    ``image_score`` (with ``score_input``, head alone).
    """

    def __init__(
        self,
        head: StaticDefectHead,
        detector: Optional[nn.Module],
        output: Union[int, str, None],
        mask_uint8: bool,
        score_output: Union[int, str, bool, None] = None,
        threshold_input: bool = False,
        score_input: bool = False,
    ) -> None:
        super().__init__()
        self.head = head
        self.detector = detector
        self.output = output
        self.score_output = score_output
        self.mask_uint8 = mask_uint8
        self.threshold_input = threshold_input
        self.score_input = score_input

    def forward(
        self, inputs: Tensor, second: Optional[Tensor] = None, third: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        pixel_threshold = second if self.threshold_input else None
        image_score = (third if self.threshold_input else second) if self.score_input else None
        anomaly_map = inputs
        if self.detector is not None:
            out = self.detector(inputs)
            anomaly_map = _pick_map(out, self.output)
            if self.score_output is not False:
                image_score = _pick_score(out, self.score_output, auto=self.score_output is None)
        out = self.head(anomaly_map, pixel_threshold, image_score)
        fields = out._asdict()
        if self.mask_uint8:
            fields["mask"] = fields["mask"].to(torch.uint8)
        return fields


def _static_head(head: Union[nn.Module, DefectsConfig]) -> StaticDefectHead:
    """A :class:`StaticDefectHead` for ``head`` (a config, an eager head or a static one)."""
    if isinstance(head, DefectsConfig):
        config = head
    elif isinstance(head, StaticDefectHead):
        return head
    elif isinstance(head, DefectHead):
        config = head.config
    else:
        raise TypeError(
            f"head must be a DefectHead or a DefectsConfig, got {type(head).__name__} "
            "(a scripted head cannot be exported with torch.export: pass the eager one)"
        )
    if config.max_regions is None:
        raise ValueError(
            "config.max_regions must be set to export to .pt2 or ONNX: it is the capacity K of "
            "the padded region outputs, got None"
        )
    static = StaticDefectHead(config)
    if isinstance(head, DefectHead):
        static = static.to(head.threshold.device)
    return static


def _dynamic_shapes(names: List[str], detector: bool) -> Tuple[Any, ...]:
    """Batch, height and width dynamic; behind a detector, as dynamic as the detector allows
    (``Dim.AUTO``: a detector exported with static shapes keeps them)."""
    dyn = torch.export.Dim.AUTO if detector else torch.export.Dim.DYNAMIC
    return tuple({0: dyn, 2: dyn, 3: dyn} if i == 0 else {0: dyn} for i in range(len(names)))


def _prepare_export(
    head: Union[nn.Module, DefectsConfig],
    example: Optional[Tensor],
    detector: Optional[nn.Module],
    output: Union[int, str, None],
    threshold_input: bool,
    mask_uint8: bool,
    score_output: Union[int, str, bool, None] = None,
    score_input: bool = False,
) -> Tuple[_ExportModule, Tuple[Tensor, ...], List[str], StaticDefectHead]:
    static = _static_head(head)
    if score_input and detector is not None:
        raise ValueError("image_score_input is for a head alone: a detector gives its own score")
    if detector is not None and not isinstance(detector, nn.Module):
        raise TypeError(f"detector must be an nn.Module or None, got {type(detector).__name__}")
    if isinstance(detector, torch.jit.ScriptModule):
        raise TypeError(
            "detector must be an eager nn.Module or a torch.export program's .module(): "
            "a TorchScript detector cannot be re-exported (use save_scripted for TorchScript)"
        )
    if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str))):
        raise TypeError(f"output must be None, an int or a str, got {output!r}")
    if output is not None and detector is None:
        raise ValueError("output needs a detector")
    if not isinstance(threshold_input, bool):
        raise TypeError(f"threshold_input must be True or False, got {threshold_input!r}")
    if not threshold_input and not static.has_threshold:
        raise ValueError(
            "the config has pixel_threshold=None: set one, or export with threshold_input=True "
            "(a pixel_threshold (B,) graph input)"
        )
    if example is None:
        if detector is not None:
            raise ValueError("example must be given with a detector: a batch of its input images")
        example = torch.rand(2, 1, 64, 64, device=static.threshold.device)
    if not isinstance(example, Tensor):
        raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
    if example.dim() != 4 or (detector is None and example.shape[1] != 1):
        what = "(B, C, H, W) images" if detector is not None else "a (B, 1, H, W) anomaly map"
        raise ValueError(f"example must be {what}, got shape {list(example.shape)}")
    if example.shape[0] < 2 or example.shape[2] < 2 or example.shape[3] < 2:
        # Sizes 0 and 1 are specialized by torch.export: the dims would not stay dynamic.
        raise ValueError(
            f"example must have batch, height and width >= 2, got {list(example.shape)}"
        )
    args: Tuple[Tensor, ...] = (example,)
    names = ["images" if detector is not None else "anomaly_map"]
    if threshold_input:
        thr = static.threshold if static.has_threshold else torch.tensor(0.5)
        args += (thr.to(torch.float32).expand(example.shape[0]).contiguous(),)
        names.append("pixel_threshold")
    if score_input:
        args += (torch.rand(example.shape[0], device=example.device),)
        names.append("image_score")
    # No .eval(): a loaded program's module refuses train(); the caller sets the detector's mode.
    module = _ExportModule(
        static, detector, output, mask_uint8, score_output, threshold_input, score_input
    )
    return module, args, names, static


def export_pt2(
    head: Union[nn.Module, DefectsConfig],
    path: Union[str, "os.PathLike[str]"],
    example: Optional[Tensor] = None,
    *,
    detector: Optional[nn.Module] = None,
    output: Union[int, str, None] = None,
    threshold_input: bool = False,
    provenance: Optional[Dict[str, Any]] = None,
    score_output: Union[int, str, bool, None] = None,
    image_score_input: bool = False,
) -> "torch.export.ExportedProgram":
    """Export ``[detector then] head`` with ``torch.export`` and save it as a ``.pt2`` file.

    The program takes ``inputs`` (the anomaly map :math:`(B, 1, H, W)` float32, or the
    detector's images) and, with ``threshold_input``, ``pixel_threshold`` :math:`(B,)`; batch,
    height and width are dynamic. It returns a dict of the
    :class:`~torchdefects.StaticDefects` fields (``mask`` bool), so it loads with
    ``torch.export.load(path).module()`` where torchdefects is not installed. The config,
    the threshold provenance and versions are saved as extra files (see :data:`EXTRA_FILES`).

    Args:
        head: a :class:`~torchdefects.DefectHead` (eager, static or not) or a
            :class:`~torchdefects.DefectsConfig`; ``max_regions`` must be set.
        path: the file to write (``.pt2`` by convention).
        example: an input to trace with, batch/height/width >= 2; default a random
            :math:`(2, 1, 64, 64)` map (required with a detector).
        detector: an eager module, or ``torch.export.load(...).module()``, put in front.
        output: with a detector, the map's index (tuple/list output) or key (dict output).
        threshold_input: take ``pixel_threshold`` :math:`(B,)` as a second input.
        provenance: as in :func:`save_scripted`.
        score_output: with a detector, where its image score is, as in
            :func:`~torchdefects.attach` (default: anomalib's ``pred_score`` when present).
        image_score_input: head alone: take ``image_score`` :math:`(B,)` as the last input
            (a detector's score, as :func:`torchdefects.onnx_detector.join_onnx` feeds it).

    Returns:
        the :class:`torch.export.ExportedProgram` that was saved.

    Example:
        >>> cfg = DefectsConfig(pixel_threshold=0.5, max_regions=8)
        >>> _ = export_pt2(DefectHead(cfg), "head.pt2")  # doctest: +SKIP
        >>> program = torch.export.load("head.pt2").module()  # doctest: +SKIP
        >>> program(torch.rand(3, 1, 40, 50))["boxes"].shape  # doctest: +SKIP
        torch.Size([3, 8, 4])
    """
    module, args, names, static = _prepare_export(
        head, example, detector, output, threshold_input, False, score_output, image_score_input
    )
    cfg = static.config.to_dict()
    prov = _provenance(cfg, provenance)
    ep = torch.export.export(
        module, args, dynamic_shapes=_dynamic_shapes(names, detector is not None)
    )
    extra = _extra_files(
        cfg, prov, program="pt2", inputs=names, outputs=list(StaticDefects._fields)
    )
    torch.export.save(ep, os.fspath(path), extra_files=extra)
    return ep


def load_pt2(path: Union[str, "os.PathLike[str]"]) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load a file written by :func:`export_pt2`: ``(module, metadata)`` as :func:`load_scripted`.

    ``module`` is ``torch.export.load(path).module()``; calling it returns the dict of
    :class:`~torchdefects.StaticDefects` fields.
    """
    extra = {name: "" for name in EXTRA_FILES.values()}
    ep = torch.export.load(os.fspath(path), extra_files=extra)
    metadata: Dict[str, Any] = {}
    for key, name in EXTRA_FILES.items():
        text = extra[name]
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        metadata[key] = json.loads(text) if text else None
    return ep.module(), metadata


def export_onnx(
    head: Union[nn.Module, DefectsConfig],
    path: Union[str, "os.PathLike[str]"],
    example: Optional[Tensor] = None,
    *,
    detector: Optional[nn.Module] = None,
    output: Union[int, str, None] = None,
    threshold_input: bool = False,
    provenance: Optional[Dict[str, Any]] = None,
    opset_version: Optional[int] = None,
    score_output: Union[int, str, bool, None] = None,
    image_score_input: bool = False,
) -> None:
    """Export ``[detector then] head`` to ONNX with the dynamo exporter.

    Graph inputs: ``anomaly_map`` (float32 :math:`(B, 1, H, W)`; ``images`` with a detector)
    and, with ``threshold_input``, ``pixel_threshold`` (float32 :math:`(B,)`); batch, height
    and width are dynamic. Graph outputs: the :class:`~torchdefects.StaticDefects` fields by
    name, ``mask`` as uint8 0/1. The config, the threshold provenance and versions are in the
    model's ``metadata_props`` under the names of :data:`EXTRA_FILES`.

    Args:
        head, example, detector, output, threshold_input, provenance, score_output,
            image_score_input: as in :func:`export_pt2` (``image_score`` is a graph input).
        path: the file to write (``.onnx``).
        opset_version: ONNX opset; default the exporter's.

    Example:
        >>> cfg = DefectsConfig(pixel_threshold=0.5, max_regions=8)
        >>> export_onnx(DefectHead(cfg), "head.onnx")  # doctest: +SKIP
        >>> import onnxruntime  # doctest: +SKIP
        >>> session = onnxruntime.InferenceSession("head.onnx")  # doctest: +SKIP
        >>> boxes = session.run(["boxes"], {"anomaly_map": maps.numpy()})[0]  # doctest: +SKIP
    """
    import onnx  # the onnx extra

    module, args, input_names, static = _prepare_export(
        head, example, detector, output, threshold_input, True, score_output, image_score_input
    )
    cfg = static.config.to_dict()
    prov = _provenance(cfg, provenance)
    output_names = list(StaticDefects._fields)
    shapes = _dynamic_shapes(input_names, detector is not None)
    kwargs: Dict[str, Any] = {}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=input_names,
        output_names=output_names,
        verbose=False,
        **kwargs,
    )
    path = os.fspath(path)
    program.save(path)
    model = onnx.load(path)
    extra = _extra_files(cfg, prov, program="onnx", inputs=input_names, outputs=output_names)
    for key, value in extra.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)


def onnx_metadata(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """The JSON documents of an ONNX file from :func:`export_onnx`, as :func:`load_scripted`."""
    import onnx

    props = {
        p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props
    }
    return {
        key: json.loads(props[name]) if name in props else None for key, name in EXTRA_FILES.items()
    }


def _format_for(output: str, fmt: Optional[str]) -> str:
    """The format of ``export_from_config``: ``fmt``, else the extension of ``output``."""
    ext = os.path.splitext(output)[1].lower()
    by_ext = {".onnx": "onnx", ".pt2": "pt2"}
    if fmt is None:
        return by_ext.get(ext, "torchscript")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    implied = by_ext.get(ext)
    if implied is not None and implied != fmt:
        raise ValueError(
            f"--format {fmt} contradicts the extension of {output!r} (which means {implied}); "
            f"name the file *{EXPORT_FORMATS[fmt]} or drop --format"
        )
    return fmt


def _load_detector(path: str, fmt: str) -> nn.Module:
    """A detector file: ``.pt2`` (torch.export) for every format, TorchScript for torchscript."""
    if path.lower().endswith(".pt2"):
        try:
            return torch.export.load(path).module()
        except Exception as e:
            raise ValueError(f"--detector {path}: cannot load a torch.export program: {e}") from e
    if fmt != "torchscript":
        raise ValueError(
            f"--detector {path}: a {fmt} export needs the detector as a torch.export program "
            "(.pt2); TorchScript detectors go only into TorchScript files"
        )
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise ValueError(f"--detector {path}: cannot load TorchScript: {e}") from e


def _detector_example(detector: nn.Module, shape: Optional[Sequence[int]]) -> Optional[Tensor]:
    if shape is not None:
        return torch.rand(*shape)
    # A loaded program's module keeps the placeholders' example values.
    for node in getattr(getattr(detector, "graph", None), "nodes", []):
        if node.op == "placeholder" and "val" in node.meta:
            val = node.meta["val"]
            dims = [int(d) if isinstance(d, int) else 2 for d in val.shape]
            return torch.rand(*dims, dtype=val.dtype)
    return None


#: The extra file a detector file carries its preprocessing in (``torchdefects demo``).
PREPROCESS_EXTRA_FILE = "torchdefects/preprocess.json"


def _scripted_extra(path: str, name: str) -> Dict[str, str]:
    """``{name: text}`` when the TorchScript file at ``path`` carries that extra file."""
    extra = {name: ""}
    torch.jit.load(path, map_location="cpu", _extra_files=extra)
    text = extra[name]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return {name: text} if text else {}


def _check_map_output(out: Any, map_output: Union[int, str, None]) -> None:
    """``--map-output`` against what the detector returns, in the words ``run`` uses."""
    try:
        _pick_map(out, map_output)
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"--map-output: {e.args[0] if e.args else e}") from e


def _check_scripted_output(detector: nn.Module, map_output: Union[int, str, None]) -> None:
    """A TorchScript detector's declared return type against ``--map-output``."""
    schema = getattr(getattr(detector, "forward", None), "schema", None)
    if schema is None or not schema.returns:
        return
    kind = str(schema.returns[0].type)
    if map_output is None and not kind.startswith("Tensor"):
        raise ValueError(
            f"--map-output must name the anomaly map: the detector returns {kind} "
            "(an index for a tuple, a key for a dict)"
        )
    if isinstance(map_output, int) and not kind.startswith(("Tuple", "List", "(")):
        raise ValueError(f"--map-output {map_output}: the detector returns {kind}, not a tuple")
    if isinstance(map_output, str) and not kind.startswith("Dict"):
        raise ValueError(f"--map-output {map_output!r}: the detector returns {kind}, not a dict")


def _export_onto_onnx(
    cfg: DefectsConfig,
    detector: str,
    output: str,
    fmt: str,
    map_output: Union[int, str, None],
    threshold_input: bool,
) -> str:
    """An ONNX detector file: the head exported to ONNX and joined onto its graph."""
    import tempfile

    import onnx

    from torchdefects.onnx_detector import join_onnx

    if fmt != "onnx":
        raise ValueError(f"--detector {detector}: an ONNX detector goes only into an ONNX file")
    if isinstance(map_output, int):
        raise ValueError("--map-output must name an output of an ONNX detector, not an index")
    try:
        outputs = [o.name for o in onnx.load(detector, load_external_data=False).graph.output]
    except Exception as e:
        raise ValueError(f"--detector {detector}: cannot read ONNX: {e}") from e
    with_score = "pred_score" in outputs
    with tempfile.TemporaryDirectory() as tmp:
        head_path = os.path.join(tmp, "head.onnx")
        export_onnx(
            cfg,
            head_path,
            threshold_input=threshold_input,
            provenance=cfg.pixel_threshold_provenance,
            image_score_input=with_score,
        )
        joined = join_onnx(detector, head_path, map_output=map_output)
    onnx.save(joined, output)
    return (
        f"ONNX detector + DefectHead (onnx, pixel_threshold={cfg.pixel_threshold}"
        + (", image score from pred_score" if with_score else "")
        + f") -> {output}"
    )


def export_from_config(
    config_path: Union[str, "os.PathLike[str]"],
    output: Union[str, "os.PathLike[str]"],
    fmt: Optional[str] = None,
    *,
    category: Optional[str] = None,
    detector: Optional[str] = None,
    map_output: Union[int, str, None] = None,
    threshold_input: bool = False,
    example_shape: Optional[Sequence[int]] = None,
) -> str:
    """``torchdefects export``: write the head (or detector + head) of a config file.

    Args:
        config_path: the config file (JSON, :func:`~torchdefects.load_config`).
        output: the file to write.
        fmt: ``torchscript``, ``pt2`` or ``onnx``; ``None``: the extension of ``output``
            decides (``.onnx`` ONNX, ``.pt2`` torch.export, anything else TorchScript).
        category: the config's category.
        detector: a detector file put in front: TorchScript (``torchscript`` format only) or
            a ``torch.export`` program ``.pt2`` (every format).
        map_output: the map among the detector's outputs (tuple index or dict key).
        threshold_input: ``pt2``/``onnx``: a ``pixel_threshold`` (B,) input.
        example_shape: the detector's input shape to trace with (default: a ``.pt2``
            detector's own example, batch/height/width set to 2).

    Returns:
        a one-line description of what was written.

    Raises:
        ValueError: a usage error (format contradicting the extension, a detector the format
            cannot hold, ``map_output`` without detector, ``threshold_input`` with TorchScript,
            a config without ``max_regions`` for pt2/onnx, ...).
        ConfigError, OSError: the config file.
    """
    from torchdefects.config import load_config

    output = os.fspath(output)
    fmt = _format_for(output, fmt)
    if map_output is not None and detector is None:
        raise ValueError("--map-output needs --detector")
    if threshold_input and fmt == "torchscript":
        raise ValueError(
            "--threshold-input is for pt2 and onnx: a TorchScript head always takes an "
            "optional pixel_threshold"
        )
    cfg = load_config(os.fspath(config_path), category)
    if detector is not None and os.fspath(detector).lower().endswith(".onnx"):
        return _export_onto_onnx(cfg, os.fspath(detector), output, fmt, map_output, threshold_input)
    det = None if detector is None else _load_detector(os.fspath(detector), fmt)
    what = "DefectHead" if det is None else "detector + DefectHead"
    if fmt == "torchscript":
        module: nn.Module = DefectHead(cfg)
        carried: Dict[str, str] = {}
        if det is not None:
            _check_scripted_output(det, map_output)
            module = attach(det, module, output=map_output)
            # The detector's preprocessing travels with it (run reads it back).
            carried = _scripted_extra(os.fspath(detector), PREPROCESS_EXTRA_FILE)
        save_scripted(
            module,
            output,
            config=cfg,
            provenance=cfg.pixel_threshold_provenance,
            extra_files=carried,
        )
    else:
        example = None if det is None else _detector_example(det, example_shape)
        if det is not None and example is None:
            raise ValueError("--example-shape must be given: the detector holds no example input")
        if det is not None:
            _check_map_output(det(example), map_output)
        export = export_pt2 if fmt == "pt2" else export_onnx
        export(
            cfg,
            output,
            example,
            detector=det,
            output=map_output,
            threshold_input=threshold_input,
            provenance=cfg.pixel_threshold_provenance,
        )
    return f"{what} ({fmt}, pixel_threshold={cfg.pixel_threshold}) -> {output}"
