"""Our float YOLOv8 ONNX -> an INT8 .rknn for the RK3588 NPU, checked on the toolkit's simulator.

The model is cut at its six head convolutions (``split_head``), relabelled to opset 19 (the
toolkit refuses 20; the ops used are the same in both), calibrated on the agent's own letterbox of
the calibration images, and converted by rknn-toolkit2 in its own virtualenv
(``rknn_worker.py``). With evaluation images the same process runs them on the simulator, and
``agent.vision.split_head`` plus the usual decode finish the head here: what a board would run,
minus the board. Converting the whole graph is refused: rknn-toolkit2 2.5.0 fails to build it
(its graph optimizer trips on the DFL), and where a build succeeds the simulator shows every score
collapse (one int8 scale for boxes in pixels and scores in 0..1).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import cv2
import numpy as np
import onnx

from agent.contract import write_atomic
from agent.vision import Preprocessor, merge_split_head
from models.calibration import calibration_images, even_picks, tensors
from models.convert.split_head import cut_at_head
from models.environments import cached_python
from models.errors import FactoryError

PLATFORM = "rk3588"
RKNN_PINS = "rknn-toolkit2==2.5.0"  # scripts/setup-rknn.sh installs exactly this
WORKER = Path(__file__).with_name("rknn_worker.py")
# The toolkit's ranges (its "normal" algorithm) are the extremes of every calibration frame, so
# each frame more can only widen them and coarsen every step: on voc2007-val 294 frames lost
# 1.13 points, 32 of them 0.40-0.64 (docs/performance.md). Frames are picked evenly.
CALIBRATION_FRAMES = 32
ENV_VAR = "EDGE_MODELS_RKNN_PYTHON"


def toolkit_python() -> Path:
    """The rknn-toolkit2 environment's Python: $EDGE_MODELS_RKNN_PYTHON, else the cached one.

    Raises:
        FactoryError: no conversion environment (says how to make one).
    """
    return cached_python("rknn", RKNN_PINS, ENV_VAR, "scripts/setup-rknn.sh", "RKNN conversion")


def letterbox_images(images: list[Path], imgsz: tuple[int, int]) -> list[tuple[np.ndarray, Any]]:
    """Each image letterboxed as the agent does it: the float NCHW tensor and its geometry."""
    prepared = []
    for path in images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FactoryError(f"{path} is not a readable image")
        prepared.append(Preprocessor(imgsz, pool_size=1)(image))
    return prepared


def _save_uint8(tensors: Iterable[np.ndarray], folder: Path) -> tuple[list[Path], list[str]]:
    """Tensors as the NCHW uint8 the NPU takes (the .rknn divides by 255 itself), saved as they
    come: the files, and each one's identity (``_key``)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved, keys = [], []
    for i, tensor in enumerate(tensors):
        target = folder / f"{i:05d}.npy"
        pixels = _pixels(tensor)
        np.save(target, pixels)
        saved.append(target)
        keys.append(hashlib.sha256(pixels.tobytes()).hexdigest())
    return saved, keys


class SavedOutputs(Sequence[np.ndarray]):
    """The simulator's merged head outputs, one ``.npy`` per evaluation input in a folder that
    lives as long as this object: 990 of them are 2.8 GB, so they are read back one at a time."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="edge-models-rknn-outputs-")
        self._count = 0

    def append(self, output: np.ndarray) -> None:
        np.save(self._path(self._count), output)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(f"output {index} of {self._count}")
        return np.load(self._path(index % self._count))

    def _path(self, index: int) -> Path:
        return Path(self._folder.name) / f"{index:05d}.npy"


@dataclass
class Conversion:
    rknn: Path
    outputs: SavedOutputs  # per evaluation tensor: the merged [1, 4+nc, N] head output
    keys: list[str]  # per evaluation tensor: its identity as the NPU sees it (``_key``)


def convert(
    model: Path,
    calib: Path,
    out: Path,
    evaluate_on: Iterable[np.ndarray] | None = None,
    full_graph: bool = False,
    imgsz: tuple[int, int] = (640, 640),
    algorithm: str = "normal",
    hybrid: float | None = None,
    count: int = CALIBRATION_FRAMES,
) -> Conversion:
    """Convert ``model`` to ``out`` (written only when all went well); with ``evaluate_on``
    (letterboxed float tensors, as the agent feeds a model; consumed one at a time, so a whole
    evaluation set never sits in memory), the simulator's merged head outputs on them, from the
    same build whose bytes are written, kept on disk. ``count`` frames calibrate, picked
    evenly over ``calib``; ``algorithm`` and ``hybrid`` (a cosine threshold: rknn-toolkit2's
    auto hybrid keeps the layers below it in float16) are the toolkit's own options.

    Raises:
        FactoryError: no conversion environment, bad inputs, the toolkit failed (its reason),
            or a full-graph conversion (refused after it is shown to collapse).
    """
    if count < 1:
        raise FactoryError(f"--count must be at least 1, not {count}")
    python = toolkit_python()
    every = calibration_images(calib)
    calibration = list(tensors([every[i] for i in even_picks(len(every), count)], imgsz))
    with tempfile.TemporaryDirectory(prefix="edge-models-rknn-") as tmp:
        work = Path(tmp)
        source = work / "model.onnx"
        if full_graph:
            source.write_bytes(model.read_bytes())
        else:
            cut_at_head(model, source)
        _relabel_opset(source, 19)
        calib_files, _ = _save_uint8(calibration, work / "calib")
        (work / "dataset.txt").write_text("".join(f"{p}\n" for p in calib_files))
        eval_files, keys = _save_uint8(evaluate_on or [], work / "eval")
        if full_graph and not eval_files:  # its collapse is shown on a calibration frame
            eval_files, keys = _save_uint8(calibration[:1], work / "eval")
        job = {
            "platform": PLATFORM,
            "model": str(source),
            "dataset": str(work / "dataset.txt"),
            "out": str(work / "model.rknn"),
            "inputs": [str(p) for p in eval_files],
            "outputs": str(work / "outputs"),
            "algorithm": algorithm,
            "hybrid": hybrid,
        }
        answer = _run_worker(python, job)
        failure = f"{answer.get('stage', '?')}: {answer.get('error')}"
        if not answer.get("ok") and full_graph:
            raise FactoryError(
                f"the whole graph in INT8 is refused for {PLATFORM}: {RKNN_PINS} cannot build "
                f"it ({failure}); convert without --full-graph (the head is cut at its six "
                "convolutions and finished on the CPU)"
            )
        if not answer.get("ok"):
            raise FactoryError(f"rknn-toolkit2 could not convert {model.name} ({failure})")
        outputs = SavedOutputs()
        for i in range(len(eval_files)):
            raw_file = work / "outputs" / f"{i:05d}.npz"
            with np.load(raw_file) as raw:
                maps = [raw[f"arr_{j}"] for j in range(len(raw.files))]
            raw_file.unlink()  # the raw form goes as the merged one is written
            outputs.append(maps[0] if full_graph else merge_split_head(maps))
        if full_graph:
            best = max(float(o[0, 4:].max()) for o in outputs)
            raise FactoryError(
                f"the whole graph in INT8 is refused for {PLATFORM}: on the simulator its best "
                f"class score is {best:.3f} (one int8 scale for boxes in pixels and scores in "
                "0..1); convert without --full-graph (the head is cut at its six convolutions "
                "and finished on the CPU)"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        data = (work / "model.rknn").read_bytes()
        record = {
            "source": model.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "target": PLATFORM,
            "imgsz": list(imgsz),
            "metadata": {p.key: p.value for p in onnx.load(str(model)).metadata_props},
            "toolkit": RKNN_PINS,
            "algorithm": algorithm,
            "hybrid": hybrid,
            "calibration_frames": len(calibration),
        }
        for path, content in ((out.with_name(out.name + ".json"), json.dumps(record, indent=1)
                               .encode()), (out, data)):  # fmt: skip
            write_atomic(path, content)
        return Conversion(out, outputs, keys)


@dataclass
class SimulatorRunner:
    """A ``KernelRunner`` that answers with the outputs the simulator gave during the one build
    whose bytes ship: the gate and the golden set judge exactly the published .rknn (a rebuild
    is not byte-identical, and a written .rknn cannot run on the simulator)."""

    outputs: SavedOutputs
    index: dict[str, int]  # an input's identity (``_key``) -> its place in ``outputs``
    target: str = PLATFORM
    measures_speed: bool = False  # the simulator's speed says nothing of the NPU's

    @classmethod
    def of(cls, conversion: Conversion) -> SimulatorRunner:
        return cls(conversion.outputs, {key: i for i, key in enumerate(conversion.keys)})

    def describe(self) -> str:
        return f"{RKNN_PINS} simulator, the build that ships ({PLATFORM} INT8; accuracy only)"

    def run(self, model: Path, tensors: list[np.ndarray], loaded: Any = None) -> list[np.ndarray]:
        try:
            return [self.outputs[self.index[_key(t)]] for t in tensors]
        except KeyError:
            raise FactoryError(
                f"{model.name}: an input the {PLATFORM} build was not run on (the simulator "
                "runs only inside the conversion; pass every image to it)"
            ) from None


def _pixels(tensor: np.ndarray) -> np.ndarray:
    """A letterboxed 0..1 float tensor as the NPU takes it: uint8."""
    return np.round(tensor * 255).astype(np.uint8)


def _key(tensor: np.ndarray) -> str:
    """A tensor's identity as the NPU sees it: its uint8 pixels."""
    return hashlib.sha256(_pixels(tensor).tobytes()).hexdigest()


def _relabel_opset(path: Path, version: int) -> None:
    """The toolkit reads opset <= 19; our exports say 20 with no op that changed in between."""
    model = onnx.load(str(path))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > version:
            opset.version = version
    onnx.save(model, str(path))


def _run_worker(python: Path, job: dict[str, Any]) -> dict[str, Any]:
    try:
        done = subprocess.run(
            # -I: isolated, so the worker's folder (this one, with rknn.py in it) does not
            # shadow the toolkit's ``rknn`` package
            [str(python), "-I", str(WORKER)],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FactoryError(f"the RKNN conversion environment did not run: {exc}") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"ok"')]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FactoryError(f"the RKNN conversion environment failed: {tail[0][:400]}")
    return json.loads(lines[-1])


def convert_and_compare(
    model: Path,
    calib: Path,
    out: Path,
    data: Path | None,
    full_graph: bool,
    label: str,
    algorithm: str = "normal",
    hybrid: float | None = None,
    count: int = CALIBRATION_FRAMES,
) -> tuple[Conversion, list[dict[str, Any]]]:
    """Convert ``model`` to ``out``; with ``data``, the float model's mAP on ONNX Runtime beside
    the converted build's on the simulator (same letterboxed images), one row each. Images are
    letterboxed one at a time and only detections are kept: memory does not grow with ``data``."""
    from agent.config import ModelConfig
    from agent.vision import load_backend
    from models.datasets import load_dataset
    from models.evaluate import letterboxed, outputs_matches
    from models.metrics import paired_difference, scores

    reference = load_backend("onnxruntime", model, ModelConfig(path=model))
    try:
        dataset = load_dataset(data) if data is not None else None
        inputs = (t for t, _ in letterboxed(reference, dataset)) if dataset is not None else None
        done = convert(model, calib, out, inputs, full_graph, reference.info.imgsz,
                       algorithm=algorithm, hybrid=hybrid, count=count)  # fmt: skip
        rows = []
        if dataset is not None:
            boxes = [box for _, box in letterboxed(reference, dataset)]
            names = reference.info.class_names
            matched = []
            for name, runtime, outputs in (
                (model.name, "onnxruntime fp32",
                 (reference.infer(t) for t, _ in letterboxed(reference, dataset))),
                (out.name, f"{label} int8 (rknn-toolkit2 simulator)", done.outputs),
            ):  # fmt: skip
                matched.append(outputs_matches(dataset, outputs, boxes, names))
                figures = scores(matched[-1])
                rows.append({"model": name, "runtime": runtime, "map50_95": figures.map50_95,
                             "map50": figures.map50})  # fmt: skip
            # the paired bootstrap over the images: how sure the drop is, not just its size
            interval = paired_difference(matched[0], matched[1])
            rows[1]["delta_points"] = interval.points
            rows[1]["interval_points"] = [interval.low, interval.high]
    finally:
        reference.close()
    return done, rows
