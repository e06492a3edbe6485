"""Structured (dependency-graph) pruning of a converted YOLOv8, led by each block's sensitivity.

torch-pruning's DepGraph finds, for every convolution's output channels, the group of layers
coupled to them (residual adds, concatenations, the next layers' inputs), so removing a channel
removes it everywhere at once and the network still computes. Importance is the L1 norm of the
weights. The six head convolutions and the DFL are never pruned (their channels are the output
format).

Sensitivity first: for each block, the lowest-importance ``ratio`` of its channels is switched
off (their weights zeroed: exactly what removing them does, without rebuilding anything) and the
distillation loss against the unpruned model is measured on a few frames. Blocks that hurt more
than the median are pruned less (down to a quarter of the ratio), those that hurt less a little
more (up to 1.5 x, at most 0.8). Then the pruning is progressive: ``stages`` equal steps towards
the target, each followed by its share of distillation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch_pruning as tp

from models.optimize.distill import evaluate_loss
from models.optimize.torch_model import Detector, block_of

MIN_SHARE, MAX_SHARE, MAX_RATIO = 0.25, 1.5, 0.8


def prunable(detector: Detector) -> dict[str, torch.nn.Conv2d]:
    protected = {id(m) for m in detector.protected}
    return {n: m for n, m in detector.names.items() if id(m) not in protected}


def _example(detector: Detector, size: int = 320) -> torch.Tensor:
    return torch.zeros(1, 3, size, size)


def _lowest(conv: torch.nn.Conv2d, ratio: float, round_to: int) -> list[int]:
    importance = conv.weight.detach().abs().flatten(1).sum(1)
    n = conv.out_channels
    keep = max(round_to, round(n * (1 - ratio) / round_to) * round_to) if round_to else None
    drop = n - keep if keep is not None else int(n * ratio)
    return torch.argsort(importance)[: max(0, min(drop, n - 1))].tolist()


def zero_group(group: Any, scratch: dict[str, torch.nn.Module], names: dict[int, str]) -> None:
    """Switch off, in ``scratch`` (a copy with the same module names), every output channel the
    group would remove: zeroed weights and biases are what removal computes."""
    for dep, idxs in group:
        if dep.handler != tp.prune_conv_out_channels:  # bound methods: compare, never `is`
            continue
        target = scratch[names[id(dep.target.module)]]
        with torch.no_grad():
            target.weight[idxs] = 0
            if target.bias is not None:
                target.bias[idxs] = 0


def sensitivity(
    detector: Detector,
    teacher: Detector,
    frames: np.ndarray,
    ratio: float,
    round_to: int = 8,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Per block: the distillation loss with its lowest ``ratio`` of channels switched off."""
    scratch = copy.deepcopy(detector)
    graph = tp.DependencyGraph().build_dependency(
        scratch.module, _example(scratch), ignored_params=[]
    )
    names = {id(m): n for n, m in scratch.module.named_modules()}
    modules = dict(scratch.module.named_modules())
    pristine = copy.deepcopy(scratch.module.state_dict())
    blocks: dict[str, list[str]] = {}
    for name in prunable(scratch):
        blocks.setdefault(block_of(name), []).append(name)
    found = {}
    for block, convs in blocks.items():
        for name in convs:
            conv = modules[name]
            idxs = _lowest(conv, ratio, round_to)
            if idxs:
                group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs)
                zero_group(group, modules, names)
        found[block] = evaluate_loss(scratch, teacher, frames)
        scratch.module.load_state_dict(pristine)
        if progress is not None:
            progress(block, found[block])
    return found


def block_ratios(ratio: float, sensed: dict[str, float]) -> dict[str, float]:
    """Each block's ratio: less where it hurts more than the median, more where it hurts less."""
    if not sensed:
        return {}
    median = float(np.median(list(sensed.values()))) or 1e-12
    out = {}
    for block, loss in sensed.items():
        share = float(np.clip(median / max(loss, 1e-12), MIN_SHARE, MAX_SHARE))
        out[block] = min(MAX_RATIO, ratio * share)
    return out


def pruner_for(
    detector: Detector,
    ratios: dict[str, float],
    ratio: float,
    round_to: int,
    stages: int,
) -> Any:
    per_module = {
        conv: ratios.get(block_of(name), ratio) for name, conv in prunable(detector).items()
    }
    return tp.pruner.MagnitudePruner(
        detector.module,
        _example(detector),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        pruning_ratio_dict=per_module,
        ignored_layers=detector.protected,
        round_to=round_to or None,
        iterative_steps=stages,
    )


def prune_groups(pruner: Any) -> Iterator[Any]:
    """One pruning step's groups, each removed after the caller has seen it."""
    for group in pruner.step(interactive=True):
        yield group
        group.prune()
