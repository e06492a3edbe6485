"""Our ONNX YOLOv8 as a trainable torch module (onnx2torch), and back to ONNX.

The prepared body (``graph.prepare``: image -> the six raw head maps) converts to a
``torch.fx.GraphModule``; every weight is a trainable parameter and it runs at any input size.
Export goes back through ``torch.onnx.export`` (the TorchScript exporter, opset 17), grafts the
source's decode back on (``graph.attach_decode``) and carries the source's metadata plus a
record of what was done, so the agent, the gate and publish read the result like any other model
of ours.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from agent.contract import ModelError
from models.errors import FactoryError
from models.optimize.frames import content_hash
from models.optimize.graph import HEAD_NAMES, Prepared, attach_decode, prepare
from models.outputs import atomic_path


@dataclass
class Detector:
    module: torch.nn.Module  # forward(images) -> [box_p3, class_p3, ..., class_p5]
    protected: list[torch.nn.Module]  # the six head convolutions: never pruned
    prepared: Prepared
    metadata: dict[str, str]
    imgsz: tuple[int, int]
    source: Path
    source_sha256: str
    names: dict[str, torch.nn.Module] = field(default_factory=dict)  # module name -> conv


def load_detector(path: Path, merge_c2f: bool = False) -> Detector:
    """``path`` (a float YOLOv8 ONNX) as a torch module. C2f's first convolutions are split in
    two for pruning; with ``merge_c2f`` (QAT, which never prunes) each is one convolution and a
    Split, as ``quantize`` lays it out and as a pruned model is quantized: one integer
    convolution where the split form runs two.

    Raises:
        FactoryError: unreadable, quantized, or not a YOLOv8 detect model (named).
    """
    from onnx2torch import convert

    try:
        source = onnx.load(str(path))
    except Exception as exc:
        raise FactoryError(f"{path} is not a readable ONNX model: {exc}") from None
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in source.graph.node):
        raise FactoryError(f"{path.name} is quantized: prune and distil the float model")
    try:
        prepared = prepare(source)
    except ModelError as exc:
        raise FactoryError(f"{path.name} is not a YOLOv8 detect model: {exc}") from None
    if merge_c2f:
        from models.quantize import merge_split_convolutions

        merge_split_convolutions(prepared.body)
    module = convert(prepared.body)
    module.train()
    convs = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    protected = [convs[name] for name in HEAD_NAMES if name in convs]
    if len(protected) != len(HEAD_NAMES):
        raise FactoryError(f"{path.name}: the converted model lost its head's names")
    dims = source.graph.input[0].type.tensor_type.shape.dim
    imgsz = (dims[2].dim_value or 640, dims[3].dim_value or 640)
    return Detector(
        module=module,
        protected=protected,
        prepared=prepared,
        metadata={p.key: p.value for p in source.metadata_props},
        imgsz=imgsz,
        source=path,
        source_sha256=content_hash(path),
        names=convs,
    )


def training_device(choice: str = "auto") -> torch.device:
    """Where distillation and QAT train (pruning, statistics and export stay on the CPU):
    ``auto`` is the first CUDA GPU when torch sees one, else the CPU.

    Raises:
        FactoryError: not a device name, or a CUDA device torch does not see here.
    """
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise FactoryError(f"--device {choice!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise FactoryError(f"--device {choice!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise FactoryError(
            f"--device {choice}: torch {torch.__version__} sees "
            f"{torch.cuda.device_count()} CUDA GPU(s) here; use --device cpu (or auto)"
        )
    return device


def head_maps(outputs: Any) -> list[torch.Tensor]:
    """The six raw maps of a forward (box, class per level)."""
    return list(outputs)


def block_of(module_name: str) -> str:
    """The YOLOv8 block a converted convolution belongs to (``model.4``), from its ONNX name."""
    found = re.match(r"^/?model[./](\d+)", module_name)
    return f"model.{found.group(1)}" if found else module_name


def count(detector: Detector, imgsz: tuple[int, int] | None = None) -> tuple[int, int]:
    """(MACs, parameters) at ``imgsz`` (default: the model's own)."""
    import torch_pruning as tp

    example = torch.zeros(1, 3, *(imgsz or detector.imgsz))
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(detector.module, example)
    return int(macs), int(params)


def export(
    detector: Detector,
    out: Path,
    record: dict[str, Any],
    metadata: dict[str, str] | None = None,
    body_pass: Callable[[onnx.ModelProto], Any] | None = None,
    model_pass: Callable[[onnx.ModelProto], Any] | None = None,
) -> None:
    """Write ``out``: the body (rewritten by ``body_pass`` if given) with the source's decode
    grafted back (the whole rewritten by ``model_pass`` if given), the source's metadata,
    ``metadata`` as given, and ``record`` (each key a JSON string: ``pruning``,
    ``distillation``...). Written to a temporary file and renamed: an interrupted export leaves
    nothing."""
    module = detector.module
    module.eval()  # not chained: an exported (pt2e) module's eval() returns None
    example = torch.zeros(1, 3, *detector.imgsz)
    with (
        tempfile.TemporaryDirectory(prefix="edge-models-export-") as work,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # onnx2torch's modules trace with TracerWarnings
        raw = Path(work) / "body.onnx"
        torch.onnx.export(
            module, (example,), str(raw), dynamo=False, opset_version=17,
            input_names=[detector.prepared.body.graph.input[0].name],
            output_names=detector.prepared.maps,
        )  # fmt: skip
        body = onnx.load(str(raw))
        if body_pass is not None:
            body_pass(body)
        model = attach_decode(body, detector.prepared)
        if model_pass is not None:
            model_pass(model)
    written = {**detector.metadata, **(metadata or {})}
    written.update({key: json.dumps(value) for key, value in record.items()})
    del model.metadata_props[:]
    for key, value in written.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    with atomic_path(out) as partial:
        onnx.save(model, str(partial))
