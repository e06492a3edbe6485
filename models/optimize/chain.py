"""``edge-models optimize``: the chains our users compare, and one before/after report.

Chains (any of them, in one run): ``ptq`` (the target's post-training recipe), ``prune`` (pruning +
distillation), ``prune+ptq`` (the pruned model quantized), ``qat`` (quantization-aware training),
``prune+qat`` (the pruned model's QAT, distilled from the source: it goes on recovering what
pruning lost while it learns the rounding). Every model is evaluated side by side with the source
on the evaluation set (latency interleaved, on the target's kernels where they are this machine's;
accuracy only under emulation otherwise), and the report folder gets report.md, report.json,
comparison.png, accuracy_vs_latency.png, recovery.png (the training losses) and the models
themselves. It is built beside the destination and renamed into place at the end: an interrupted
run leaves nothing there. The models are made in a stash among the checkpoints (named by the run's
inputs and settings), each written whole: run the same command again after an interruption and the
models already made are taken from there, and a pruning or QAT cut short resumes from its own
checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import shape_inference

from models.errors import FactoryError

CHAINS = ("ptq", "prune", "prune+ptq", "qat", "prune+qat")


def parse_chains(text: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CHAINS]
    if unknown or not chosen:
        raise FactoryError(f"--chains {text!r}: choose from {', '.join(CHAINS)} (comma-separated)")
    return chosen


def conv_macs(path: Path) -> int:
    """Multiply-accumulates of the model's convolutions at its input size, from its ONNX shapes."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {}
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[info.name] = [d.dim_value for d in info.type.tensor_type.shape.dim]
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    total = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight = node.input[1]
        while weight not in weights and weight in producers:  # a QDQ model's DequantizeLinear
            weight = producers[weight].input[0]
        out = shapes.get(node.output[0])
        if weight in weights and out and len(out) == 4:
            cout, cin, kh, kw = weights[weight]
            total += out[2] * out[3] * cout * cin * kh * kw
    return total


def optimize(
    model: Path,
    frames: Path,
    data: Path,
    target: str,
    report: Path,
    chains: list[str],
    ratio: float = 0.3,
    steps: int = 300,
    qat_steps: int = 100,
    size: int = 640,
    rounds: int = 30,
    overwrite: bool = False,
    stages: int = 3,
    device: str = "auto",
) -> dict[str, Any]:
    """Run ``chains`` on ``model`` and write the report folder; returns report.json's content.

    Raises:
        FactoryError: an existing report (without ``overwrite``), bad chains or settings, frames
            that are evaluation images, and whatever a step refuses.
    """
    from agent.contract import detect
    from models.datasets import load_dataset
    from models.evaluate import evaluate
    from models.kernels import runner_for
    from models.optimize.runs import Learning
    from models.recipes import recipe

    if report.exists() and any(report.iterdir()) and not overwrite:
        raise FactoryError(f"report folder {report} is not empty (pass --overwrite to replace it)")
    settings = recipe(target)
    learning = Learning.prepare(frames, data, size, device)  # refused before any work: an
    # unseen device, evaluation images among the frames; read once for every training run
    dataset = load_dataset(data)
    stash = _stash(model, learning.frames.paths, data, target, chains, ratio, steps, qat_steps,
                   size, stages)  # fmt: skip
    report.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{report.name}.partial-", dir=report.parent))
    try:
        made, trained = _models(stash, model, frames, learning, target, settings, chains, ratio,
                                steps, qat_steps, stages)  # fmt: skip
        models_dir = work / "models"
        models_dir.mkdir()
        built = {name: Path(shutil.copy2(path, models_dir / path.name))
                 for name, path in made.items()}  # fmt: skip
        records = {name: record for name, path in trained.items() if (record := _record(path))}
        paths = [model, *built.values()]
        native = target == detect().target
        runner = None if native else runner_for(target)
        quantized = {"ptq", "prune+ptq", "qat", "prune+qat"}
        runners = [None] + [runner if name in quantized else None for name in built]
        results = evaluate(paths, dataset, latency_rounds=rounds, runners=runners)
        for result, name in zip(results, ["source", *built], strict=True):
            result.name = f"{name} ({Path(result.path).name})"
        data_out = _write(work, results, dataset, paths, records, target, native)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            import sys

            print(f"- interrupted: the models made so far stay in {stash}; run the same command "
                  "again to go on from there", file=sys.stderr)  # fmt: skip
        raise
    if report.exists():
        shutil.rmtree(report)
    work.rename(report)
    shutil.rmtree(stash, ignore_errors=True)
    return data_out


def _stash(model: Path, frames: list[Path], data: Path, target: str, chains: list[str],
           *settings: Any) -> Path:  # fmt: skip
    """Where this very run keeps the models it has made, to take them again after a stop."""
    from models.optimize.checkpoint import checkpoint_folder, run_key
    from models.optimize.frames import content_hash

    key = run_key([content_hash(model), [content_hash(p) for p in frames], str(data.resolve()),
                   target, sorted(chains), *settings])  # fmt: skip
    stash = checkpoint_folder() / f"optimize-{key}"
    stash.mkdir(parents=True, exist_ok=True)
    return stash


def _models(stash: Path, model: Path, frames: Path, learning: Any, target: str, settings: Any,
            chains: list[str], ratio: float, steps: int, qat_steps: int,
            stages: int) -> tuple[dict[str, Path], dict[str, Path]]:  # fmt: skip
    """The chains' models, each made unless the stash already holds it (written whole), and
    the trained ones (pruned, QAT) whose records the report shows. PTQ calibrates on
    ``CALIBRATION_FRAMES`` of the ``frames`` folder picked evenly, as ``quantize --frames`` and
    QAT do; the training runs share ``learning``."""
    import sys

    from models.calibration import CALIBRATION_FRAMES
    from models.optimize.runs import prune_model, qat_model
    from models.quantize import quantize

    built: dict[str, Path] = {}

    def make(name: str, path: Path, build: Any) -> Path:
        if path.is_file():
            print(f"- {name}: {path.name} already made by an earlier run", file=sys.stderr)
        else:
            build(path)
        return path

    def ptq(source: Path) -> Any:
        return lambda out: quantize(source, frames, out, settings, target=target,
                                    frames=CALIBRATION_FRAMES)  # fmt: skip

    pruned = None
    if "ptq" in chains:
        built["ptq"] = make("ptq", stash / "ptq.onnx", ptq(model))
    if {"prune", "prune+ptq", "prune+qat"} & set(chains):
        pruned = make("prune", stash / "pruned.onnx", lambda out: prune_model(
            model, out, ratio, learning, steps, stages=stages))  # fmt: skip
        if "prune" in chains:
            built["prune"] = pruned
    if "prune+ptq" in chains and pruned is not None:
        built["prune+ptq"] = make("prune+ptq", stash / "pruned-ptq.onnx", ptq(pruned))
    if "qat" in chains:
        built["qat"] = make("qat", stash / "qat.onnx", lambda out: qat_model(
            model, out, learning, qat_steps, target))  # fmt: skip
    if "prune+qat" in chains and pruned is not None:
        built["prune+qat"] = make("prune+qat", stash / "pruned-qat.onnx", lambda out: qat_model(
            pruned, out, learning, qat_steps, target, teacher_path=model))  # fmt: skip
    trained = {"prune": pruned} if pruned is not None else {}
    trained.update({name: built[name] for name in ("qat", "prune+qat") if name in built})
    return built, trained


def _record(path: Path) -> dict[str, Any] | None:
    """What the last training step wrote into the model (QAT, else pruning), or None for PTQ.
    A pruned model's QAT keeps the pruning record it inherited beside its own."""
    metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                .metadata_props}  # fmt: skip
    for key in ("quantization", "pruning"):
        if key in metadata:
            try:
                found = json.loads(metadata[key])
            except ValueError:
                return None
            if isinstance(found, dict) and "steps" in found:
                return found
    return None


def _write(folder: Path, results: list, dataset: Any, paths: list[Path],
           records: dict[str, dict], target: str, native: bool) -> dict[str, Any]:  # fmt: skip
    from models.report import write_report

    macs = [conv_macs(p) for p in paths]
    lines = ["## MACs (convolutions, at the model's input size)", "",
             "| model | GMACs | ratio |", "|---|---|---|"]  # fmt: skip
    for result, value in zip(results, macs, strict=True):
        lines.append(f"| {result.name} | {value / 1e9:.2f} | {value / macs[0]:.3f} |")
    where = (
        "timed on this machine, the target's own kernels"
        if native
        else "accuracy on the target's kernels under emulation; latency not measurable here"
    )
    lines += ["", f"Target `{target}`: {where}.", "",
              "![accuracy against latency](accuracy_vs_latency.png)", "",
              "![training losses](recovery.png)"]  # fmt: skip
    for name, record in records.items():
        lines += ["", f"{name}: {json.dumps({k: v for k, v in record.items() if k != 'curve'})}"]
    data = write_report(results, dataset, folder, "\n".join(lines))
    data["macs"] = macs
    data["records"] = records
    (folder / "report.json").write_text(json.dumps(data, indent=2))
    _plots(folder, results, records)
    return data


def _plots(folder: Path, results: list, records: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    reference = results[0].latency_p50_ms
    for result in results:
        x = result.latency_p50_ms / reference if result.latency_p50_ms and reference else None
        if x is not None:
            axis.scatter(x, result.map50_95)
            axis.annotate(result.name.split(" ")[0], (x, result.map50_95), fontsize=8)
    axis.set_xlabel("latency / source latency (p50)")
    axis.set_ylabel("mAP50-95")
    axis.set_title("accuracy against latency")
    figure.tight_layout()
    figure.savefig(folder / "accuracy_vs_latency.png", dpi=100)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(7, 5))
    for name, record in records.items():
        curve = record.get("curve") or []
        if curve:
            axis.plot(range(1, len(curve) + 1), curve, label=name)
    axis.set_xlabel("step (sampled)")
    axis.set_ylabel("distillation loss")
    axis.set_title("training losses")
    if records:
        axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "recovery.png", dpi=100)
    plt.close(figure)
