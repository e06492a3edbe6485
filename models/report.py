"""The evaluation report: report.json (every figure), report.md (the table), comparison.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.datasets import Dataset
from models.evaluate import ModelResult


def table(results: list[ModelResult]) -> str:
    reference = results[0]
    rows = [
        "| model | scheme | size MB | size ratio | params | mAP50-95 | mAP50 "
        "| Δ mAP50-95, points (95 % interval) "
        "| latency p50 ms | p95 ms | latency ratio | FPS | agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        agreement = "reference" if r.agreement is None else f"{r.agreement:.3f}"
        ratio = (
            r.latency_p50_ms / reference.latency_p50_ms
            if r.latency_p50_ms is not None and reference.latency_p50_ms
            else None
        )
        rows.append(
            f"| {r.name} | {r.scheme} | {r.size_bytes / 1e6:.2f} "
            f"| {r.size_bytes / reference.size_bytes:.3f} "
            f"| {r.parameters / 1e6:.2f} M | {r.map50_95:.4f} | {r.map50:.4f} "
            f"| {difference(r, reference)} | {_figure(r.latency_p50_ms)} "
            f"| {_figure(r.latency_p95_ms)} | {_figure(ratio, '.3f')} | {_figure(r.fps)} "
            f"| {agreement} |"
        )
    return "\n".join(rows)


def difference(result: ModelResult, reference: ModelResult) -> str:
    """The mAP50-95 difference to the reference, with its paired bootstrap interval if any."""
    if result is reference:
        return "reference"
    found = result.map_difference
    if found is None:
        return f"{(result.map50_95 - reference.map50_95) * 100:+.2f}"
    return f"{found['points']:+.2f} ({found['low']:+.2f} … {found['high']:+.2f})"


def per_class_table(results: list[ModelResult]) -> str:
    """AP50-95 of every class with ground truth, one column per model."""
    classes = list(results[0].per_class)
    header = "| class | boxes | " + " | ".join(r.name for r in results) + " |"
    rows = [header, "|---|---|" + "---|" * len(results)]
    for name in classes:
        cells = [f"{r.per_class.get(name, {}).get('ap50_95', float('nan')):.4f}" for r in results]
        rows.append(
            f"| {name} | {results[0].per_class[name]['boxes']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(rows)


def _figure(value: float | None, spec: str = ".1f") -> str:
    """A table cell: the figure, or a dash for one not measured (emulated kernels)."""
    return "—" if value is None else format(value, spec)


def write_report(
    results: list[ModelResult], dataset: Dataset, folder: Path, notes: str = ""
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": "edge-models/report/v1",
        "dataset": {
            "name": dataset.name,
            "images": len(dataset.samples),
            "boxes": dataset.box_count,
        },
        "reference": results[0].name,
        "models": [r.to_dict() for r in results],
    }
    (folder / "report.json").write_text(json.dumps(data, indent=2))
    markdown = [
        f"# Model evaluation on {dataset.name}",
        "",
        f"{len(dataset.samples)} images, {dataset.box_count} labelled boxes, "
        f"{len(results[0].per_class)} classes present. mAP COCO-style (pycocotools' rules, "
        "`models/metrics.py`) at conf 0.001, NMS IoU 0.7, averaged over the classes present; "
        "Δ is each model's mAP50-95 minus the first model's, with a paired bootstrap 95 % "
        f"interval ({_resamples(results)} resamples of the images). Agreement is the F1 of each "
        "model's detections against the first model's at the operating thresholds (conf 0.25, "
        "IoU 0.45); latency is `backend.infer` on letterboxed images of the set, interleaved "
        "across models in one run.",
        "",
        table(results),
        "",
        *[f"**Warning**: {w}" for r in results for w in r.warnings],
        *([""] if any(r.warnings for r in results) else []),
        "## AP50-95 per class",
        "",
        per_class_table(results),
        "",
        "![latency, size and accuracy side by side](comparison.png)",
    ]
    if notes:
        markdown += ["", notes]
    (folder / "report.md").write_text("\n".join(markdown) + "\n")
    plot(results, folder / "comparison.png")
    return data


def _resamples(results: list[ModelResult]) -> str:
    counts = {int(r.map_difference["resamples"]) for r in results if r.map_difference}
    return "/".join(str(c) for c in sorted(counts)) or "no"


def plot(results: list[ModelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name.removesuffix(".onnx") for r in results]
    colours = ["#4c72b0" if r.precision != "int8" else "#dd8452" for r in results]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    latency = axes[0]
    latency.bar(
        names,
        [r.latency_p50_ms or 0.0 for r in results],
        color=colours,
        yerr=[
            [0] * len(results),
            [(r.latency_p95_ms or 0.0) - (r.latency_p50_ms or 0.0) for r in results],
        ],
        capsize=4,
    )
    latency.set_title("latency p50 (bar) to p95 (whisker), ms")
    axes[1].bar(names, [r.size_bytes / 1e6 for r in results], color=colours)
    axes[1].set_title("file size, MB")
    axes[2].bar(names, [r.map50_95 for r in results], color=colours, label="mAP50-95")
    axes[2].plot(names, [r.map50 for r in results], "k^", label="mAP50")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("accuracy")
    axes[2].legend(loc="lower right")
    for axis in axes:
        axis.tick_params(axis="x", rotation=25, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
