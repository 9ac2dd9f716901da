"""ONNX detectors: run one with onnxruntime, or join our head's graph onto it.

anomalib (``Engine.export(export_type="onnx")`` / ``to_onnx``) and other tools ship detectors
as ONNX files whose outputs are named (anomalib: ``pred_score``, ``pred_label``,
``anomaly_map``, ``pred_mask``). :func:`join_onnx` feeds one of those outputs into an ONNX
export of :class:`~torchdefects.DefectHead` (see :func:`torchdefects.export.export_onnx`),
so detector and defects ship as one file; :class:`OnnxDetector` runs a detector file so
``torchdefects run --detector model.onnx`` can use it. Both need the ``onnx`` extra
(``pip install "torchdefects[onnx]"``).
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["OnnxDetector", "join_onnx"]

_HEAD_PREFIX = "defects/"


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for ONNX detectors: pip install 'torchdefects[onnx]'"
        ) from e


def _load(model: Any, what: str) -> Any:
    onnx = _require("onnx")
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no such ONNX file: {path}")
        return onnx.load(path)
    raise TypeError(f"{what} must be an onnx.ModelProto or a path, got {type(model).__name__}")


def _copy(model: Any) -> Any:
    onnx = _require("onnx")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _names(values: Sequence[Any]) -> List[str]:
    return [v.name for v in values]


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the ONNX model imports no default-domain opset")


def join_onnx(
    detector: Any,
    head: Any,
    *,
    map_output: Optional[str] = None,
    score_output: Union[str, bool, None] = None,
) -> Any:
    """Detector and head ONNX graphs as one model: the detector's map feeds the head.

    The joined model has the detector's inputs (plus the head's ``pixel_threshold`` input
    when it has one), keeps every detector output under its own name, and adds the head's
    outputs (``mask``, ``num_regions``, ``boxes``, ...) under theirs. The detector is
    converted to the head's opset first when they differ.

    Args:
        detector: the detector, an ``onnx.ModelProto`` or a path.
        head: an ONNX export of the head (input ``anomaly_map``, optional ``image_score``
            and ``pixel_threshold``), a ``ModelProto`` or a path.
        map_output: the detector output holding the anomaly map (B, 1, H, W); ``None``
            takes ``anomaly_map`` or, when the detector has a single output, that one.
        score_output: the detector output holding its image score, fed to the head's
            ``image_score`` input when the head has one; ``None`` takes ``pred_score``
            when present, ``False`` feeds none.

    Returns:
        the joined ``onnx.ModelProto`` (checked with ``onnx.checker``).

    Raises:
        ValueError: ``map_output`` (or ``score_output``) is not a detector output; the
            message lists the outputs there are.
    """
    onnx = _require("onnx")
    from onnx import compose, version_converter

    det = _load(detector, "detector")
    hd = _copy(_load(head, "head"))
    det = _copy(det)
    det_outputs = _names(det.graph.output)
    if map_output is None:
        if "anomaly_map" in det_outputs:
            map_output = "anomaly_map"
        elif len(det_outputs) == 1:
            map_output = det_outputs[0]
        else:
            raise ValueError(
                "map_output must name the detector output holding the anomaly map; "
                f"the detector's outputs: {', '.join(det_outputs)}"
            )
    if map_output not in det_outputs:
        raise ValueError(
            f"map_output={map_output!r} is not an output of the detector; "
            f"its outputs: {', '.join(det_outputs)}"
        )
    head_inputs = _names(hd.graph.input)
    if "anomaly_map" not in head_inputs:
        raise ValueError(f"the head graph has no 'anomaly_map' input; its inputs: {head_inputs}")
    io_map = [(map_output, _HEAD_PREFIX + "anomaly_map")]
    if "image_score" in head_inputs:
        if score_output is None:
            score_output = "pred_score" if "pred_score" in det_outputs else False
        if score_output is not False:
            if score_output not in det_outputs:
                raise ValueError(
                    f"score_output={score_output!r} is not an output of the detector; "
                    f"its outputs: {', '.join(det_outputs)}"
                )
            io_map.append((_flat_output(det, str(score_output)), _HEAD_PREFIX + "image_score"))
    elif isinstance(score_output, str):
        raise ValueError(
            f"score_output={score_output!r} given, but the head graph takes no image_score "
            "input (export it with an image score input)"
        )

    target = _opset(hd)
    if _opset(det) != target:
        det = version_converter.convert_version(det, target)
    # IR versions must agree for merge_models; the older one reads the newer's nodes.
    ir = max(det.ir_version, hd.ir_version)
    det.ir_version = hd.ir_version = ir

    _prefix_graph(hd.graph, _HEAD_PREFIX)
    head_outputs = _names(hd.graph.output)
    clash = {n[len(_HEAD_PREFIX) :] for n in head_outputs} & set(det_outputs)
    kept_inputs = [n for n in _names(hd.graph.input) if n not in {b for _, b in io_map}]
    joined = compose.merge_models(
        det,
        hd,
        io_map=io_map,
        outputs=det_outputs + head_outputs,
        inputs=_names(det.graph.input) + kept_inputs,
    )
    # The head's own names back, unless one clashes with a detector output.
    renames = {n: n[len(_HEAD_PREFIX) :] for n in head_outputs + kept_inputs}
    renames = {old: new for old, new in renames.items() if new not in clash}
    _rename_values(joined.graph, renames)
    del joined.metadata_props[:]
    for src in (det, hd):
        for prop in src.metadata_props:
            entry = joined.metadata_props.add()
            entry.key, entry.value = prop.key, prop.value
    onnx.checker.check_model(joined)
    return joined


def _prefix_graph(graph: Any, prefix: str) -> None:
    """Every value and node name of ``graph`` and of its subgraphs (Loop/If bodies) prefixed.

    ``onnx.compose.add_prefix`` leaves a Loop body's references to outer values unrenamed;
    renaming every name the same way everywhere keeps them consistent.
    """
    from onnx import AttributeProto

    def rename(name: str) -> str:
        return prefix + name if name else name

    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = rename(value.name)
    for init in graph.initializer:
        init.name = rename(init.name)
    for init in graph.sparse_initializer:
        init.values.name = rename(init.values.name)
        init.indices.name = rename(init.indices.name)
    for node in graph.node:
        node.name = rename(node.name)
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _prefix_graph(attr.g, prefix)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _prefix_graph(g, prefix)


def _flat_output(model: Any, name: str) -> str:
    """A new output of ``model``: output ``name`` reshaped to (B,) (anomalib's is (B, 1))."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    flat, shape = name + "__flat", name + "__flat_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), shape))
    model.graph.node.append(helper.make_node("Reshape", [name, shape], [flat]))
    model.graph.output.append(helper.make_tensor_value_info(flat, TensorProto.FLOAT, ["batch"]))
    return flat


def _rename_values(graph: Any, renames: Dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = renames.get(value.name, value.name)


class OnnxDetector(nn.Module):
    """An ONNX detector file run by onnxruntime, as a module returning its named outputs.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime execution providers; default CUDA when onnxruntime has it
            and ``device`` is CUDA, else CPU.
        device: where the outputs are returned (inputs are moved to the host for
            onnxruntime and the outputs back).

    Shape:
        - images: :math:`(B, C, H, W)` float tensor, the detector's single input.
        - Output: ``Dict[str, Tensor]``, one entry per detector output, by its ONNX name.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        providers: Optional[Sequence[str]] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        super().__init__()
        ort = _require("onnxruntime")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"detector: no such ONNX file: {path}")
        self.device = torch.device(device)
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in (
                ort.get_available_providers()
            ):
                providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(path, providers=list(providers))
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(
                f"detector {path} must take one input (images), it takes {[i.name for i in inputs]}"
            )
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.path = path

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', images)}"
            )
        feed = {self.input_name: images.detach().to("cpu", torch.float32).contiguous().numpy()}
        values = self.session.run(self.output_names, feed)
        return {
            name: torch.from_numpy(v).to(self.device) for name, v in zip(self.output_names, values)
        }
