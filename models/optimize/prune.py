"""Structured (dependency-graph) pruning of a converted YOLOv8, led by each block's sensitivity.

torch-pruning's DepGraph finds, for every convolution's output channels, the group of layers
coupled to them (residual adds, concatenations, the next layers' inputs), so removing a channel
removes it everywhere at once and the network still computes. The six head convolutions and the
DFL are never pruned (their channels are the output format).

What to remove, and how to lose little by it, comes from the data (a few dozen frames), because
the source's batch norms are folded into its convolutions: a channel's weights say little about
what it carries (small weights can sit on a large bias). Importance is how much a channel varies
over the frames (the spread of its activation; summed over the layers a group couples). Before a
group goes, each convolution that consumed its channels takes over what they carried, predicted
from the channels that stay (``Reconstruction``). On the real YOLOv8n, 10 % removed at once
without training: distillation loss 2.30 with the weights' L1 norm and nothing else, 1.07 with
the removed channels' mean kept, 0.69 with them predicted, 0.43 with activation importance too.

Sensitivity first: for each block, the least important ``ratio`` of its channels is switched
off (weights zeroed and the consumers reconstructed: what removal computes, without rebuilding
anything) and the distillation loss against the unpruned model is measured on a few frames.
Blocks that hurt more than the median are pruned less (down to a quarter of the ratio), those
that hurt less a little more (up to 1.5 x, at most 0.8). Then the pruning is progressive:
``stages`` equal steps towards the target, each followed by its share of distillation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def kept_channels(n: int, ratio: float, round_to: int) -> int:
    """How many of a layer's ``n`` channels stay at ``ratio``: the nearest multiple of
    ``round_to`` (at least one), but never fewer than 1.5 x the ratio would leave: rounding may
    spare a thin layer's channels, never halve it. (torch-pruning's own ``round_to`` rounds the
    kept count down: at 5 %, 16 channels became 8, and the stem and first block of YOLOv8n lost
    half their channels, which is why pruned models came out at mAP 0.)"""
    exact = n * (1 - ratio)
    if not round_to:
        return max(1, int(exact))
    keep = max(round_to, round(exact / round_to) * round_to)
    fewest = n * (1 - min(MAX_RATIO, MAX_SHARE * ratio))
    while keep < fewest and keep + round_to <= n:
        keep += round_to
    return min(n, keep)


def _lowest(importance: torch.Tensor, ratio: float, round_to: int) -> list[int]:
    n = len(importance)
    drop = n - kept_channels(n, ratio, round_to)
    return torch.argsort(importance)[: max(0, min(drop, n - 1))].tolist()


@dataclass
class Change:
    """What one consuming convolution takes over from the input channels a group removes."""

    name: str
    kept: list[int]  # its input channels that stay, as it numbers them now
    kept_original: list[int]  # the same channels, as the unpruned model numbers them
    weight: torch.Tensor  # added to weight[:, kept]
    bias: torch.Tensor  # added to the bias


class ActivationImportance(tp.importance.Importance):
    """A group's channels ranked by how much they vary over the frames (``measure`` first)."""

    def __init__(self) -> None:
        self.spread: dict[int, torch.Tensor] = {}  # id(conv) -> spread per output channel

    def measure(self, detector: Detector, frames: np.ndarray) -> None:
        by_name = activation_spread(detector, frames)
        self.spread = {id(conv): by_name[name] for name, conv in detector.names.items()}

    def __call__(self, group: Any) -> torch.Tensor:
        importance = torch.zeros(len(group[0].idxs))
        for item in group:
            spread = self.spread.get(id(item.dep.target.module))
            if spread is not None and item.dep.handler == tp.prune_conv_out_channels:
                importance.index_add_(0, torch.tensor(item.root_idxs), spread[item.idxs])
        return importance


def activation_spread(detector: Detector, frames: np.ndarray) -> dict[str, torch.Tensor]:
    """Per convolution: the standard deviation of each output channel after its SiLU (every
    convolution that may be pruned is followed by one) over every position of ``frames``."""
    sums: dict[str, list] = {}

    def watch(name: str, conv: torch.nn.Module) -> Any:
        def record(module: Any, args: tuple, out: torch.Tensor) -> None:
            y = torch.nn.functional.silu(out.detach()).double()
            total = sums.setdefault(name, [0, 0.0, 0.0])
            total[0] += y.numel() // y.shape[1]
            total[1] = total[1] + y.sum(dim=(0, 2, 3))
            total[2] = total[2] + (y * y).sum(dim=(0, 2, 3))

        return conv.register_forward_hook(record)

    _observe(detector, frames, watch)
    spread = {}
    for name, (count, first, second) in sums.items():
        mean = first / count
        spread[name] = (second / count - mean * mean).clamp(min=0).sqrt().float()
    return spread


def _observe(detector: Detector, frames: np.ndarray,
             watch: Callable[[str, torch.nn.Module], Any], batch: int = 8) -> None:  # fmt: skip
    """Run ``frames`` through ``detector`` in batches with ``watch(name, conv)``'s hook on every
    convolution; the hooks go afterwards."""
    hooks = [watch(name, conv) for name, conv in detector.names.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(frames), batch):
                detector.module.eval()(torch.from_numpy(frames[i : i + batch]))
    finally:
        for hook in hooks:
            hook.remove()


class Reconstruction:
    """Each convolution's input statistics (mean and covariance per channel over some frames),
    and the changes that let it do without the input channels a pruning group removes.

    A removed channel is predicted from the channels that stay (least squares over every
    position of every frame, lightly regularised): ``x_R ~ A x_K + b``. Folding that into the
    consumer (``W_K += W_R A``, ``bias += W_R b``) keeps what the removed channels share with the
    others, and at least their mean (``A = 0``). Channels of one network are strongly correlated,
    so most of what pruning would destroy is kept without any training.
    """

    def __init__(self, detector: Detector, frames: np.ndarray, ridge: float = 1e-3) -> None:
        self.stats = input_statistics(detector, frames)
        self.alive = {name: list(range(len(mean))) for name, (mean, _) in self.stats.items()}
        self.ridge = ridge

    def changes(self, group: Any, names: dict[int, str]) -> list[Change]:
        out = []
        for dep, idxs in group:
            name = names.get(id(dep.target.module))
            if dep.handler != tp.prune_conv_in_channels or name not in self.stats:
                continue
            gone = set(idxs)
            alive = self.alive[name]
            kept = [i for i in range(len(alive)) if i not in gone]
            removed = [alive[i] for i in idxs]
            kept_original = [alive[i] for i in kept]
            mean, cov = self.stats[name]
            a = self._predictor(cov, kept_original, removed)  # [R, K]
            b = mean[removed] - a @ mean[kept_original]
            with torch.no_grad():
                w = dep.target.module.weight[:, list(idxs)].double()  # [O, R, kh, kw]
                out.append(Change(name, kept, kept_original,
                                  torch.einsum("orij,rk->okij", w, a).float(),
                                  (w.sum(dim=(2, 3)) @ b).float()))  # fmt: skip
        return out

    def _predictor(self, cov: torch.Tensor, kept: list[int], removed: list[int]) -> torch.Tensor:
        if not kept:
            return cov.new_zeros((len(removed), 0))
        kk = cov[kept][:, kept]
        scale = float(kk.diagonal().mean()) * self.ridge + 1e-9
        regularised = kk + scale * torch.eye(len(kept), dtype=kk.dtype)
        return torch.linalg.solve(regularised, cov[kept][:, removed]).T

    def removed(self, group: Any, names: dict[int, str]) -> None:
        """The group's input channels are gone: later groups index what is left."""
        for dep, idxs in group:
            name = names.get(id(dep.target.module))
            if dep.handler == tp.prune_conv_in_channels and name in self.alive:
                gone = set(idxs)
                self.alive[name] = [c for i, c in enumerate(self.alive[name]) if i not in gone]


def input_statistics(
    detector: Detector, frames: np.ndarray
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per convolution: the mean and covariance of its input channels over every position of
    ``frames`` (float64)."""
    sums: dict[str, list] = {}

    def watch(name: str, conv: torch.nn.Module) -> Any:
        def record(module: Any, args: tuple) -> None:
            x = args[0].detach().double()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            total = sums.setdefault(name, [0, 0.0, 0.0])
            total[0] += flat.shape[1]
            total[1] = total[1] + flat.sum(dim=1)
            total[2] = total[2] + flat @ flat.T

        return conv.register_forward_pre_hook(record)

    _observe(detector, frames, watch)
    stats = {}
    for name, (count, first, second) in sums.items():
        mean = first / count
        stats[name] = (mean, second / count - torch.outer(mean, mean))
    return stats


def apply_changes(changes: list[Change], modules: dict[str, torch.nn.Module],
                  original: bool = False) -> None:  # fmt: skip
    """Fold ``changes`` into ``modules`` (``original``: a copy whose inputs are never shrunk,
    numbered as the unpruned model; the sensitivity's scratch copy)."""
    with torch.no_grad():
        for change in changes:
            conv = modules[change.name]
            columns = change.kept_original if original else change.kept
            conv.weight[:, columns] += change.weight
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels))
            conv.bias += change.bias


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
    statistics: np.ndarray | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Per block: the distillation loss on ``frames`` with its least important ``ratio`` of
    channels switched off and their consumers reconstructed, as pruning will (importance and
    reconstruction from ``statistics``, default ``frames``)."""
    statistics = frames if statistics is None else statistics
    scratch = copy.deepcopy(detector)
    graph = tp.DependencyGraph().build_dependency(
        scratch.module, _example(scratch), ignored_params=[]
    )
    names = {id(m): n for n, m in scratch.module.named_modules()}
    modules = dict(scratch.module.named_modules())
    reconstruction = Reconstruction(scratch, statistics)
    spread = activation_spread(scratch, statistics)
    pristine = copy.deepcopy(scratch.module.state_dict())
    blocks: dict[str, list[str]] = {}
    for name in prunable(scratch):
        blocks.setdefault(block_of(name), []).append(name)
    found = {}
    for block, convs in blocks.items():
        for name in convs:
            conv = modules[name]
            idxs = _lowest(spread[name], ratio, round_to)
            if idxs:
                group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs)
                apply_changes(reconstruction.changes(group, names), modules, original=True)
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
    """A pruner that leaves each layer ``kept_channels`` of its channels after the last of
    ``stages`` steps (its block's ratio from ``ratios``, else ``ratio``). torch-pruning keeps
    ``int(n * (1 - r))`` of a layer at ratio ``r``: each layer gets the ``r`` that keeps exactly
    our count, and no ``round_to`` of its own."""
    per_module = {}
    for name, conv in prunable(detector).items():
        n = conv.out_channels
        keep = kept_channels(n, ratios.get(block_of(name), ratio), round_to)
        per_module[conv] = max(0.0, (n - keep - 0.5) / n)
    return tp.pruner.MagnitudePruner(
        detector.module,
        _example(detector),
        importance=ActivationImportance(),
        pruning_ratio=ratio,
        pruning_ratio_dict=per_module,
        ignored_layers=detector.protected,
        iterative_steps=stages,
    )


def prune_groups(
    pruner: Any, detector: Detector, frames: np.ndarray, reconstruct: bool = True
) -> Iterator[tuple[Any, list[Change]]]:
    """One pruning step's groups, ranked by their activations over ``frames``, each with the
    changes that reconstruct what it removes (none without ``reconstruct``), both applied after
    the caller has seen them."""
    pruner.importance.measure(detector, frames)
    reconstruction = Reconstruction(detector, frames) if reconstruct else None
    names = {id(m): n for n, m in pruner.model.named_modules()}
    modules = dict(pruner.model.named_modules())
    for group in pruner.step(interactive=True):
        changes = reconstruction.changes(group, names) if reconstruction is not None else []
        yield group, changes
        apply_changes(changes, modules)
        group.prune()
        if reconstruction is not None:
            reconstruction.removed(group, names)


def root_of(group: Any, names: dict[int, str], graph: Any) -> tuple[str, bool, list[int]]:
    """What a group removed, by its root layer's name: enough to remove it again (``replay``)."""
    root = group[0]
    is_out = graph.is_out_channel_pruning_fn(root.dep.handler)
    return names[id(root.dep.target.module)], bool(is_out), [int(i) for i in root.idxs]


def replay(pruner: Any, stages: list[list[tuple[str, bool, list[int]]]]) -> None:
    """Remove again, from the unpruned model ``pruner`` was built on, what earlier stages
    removed, and advance its schedule past them: a resumed run continues the same pruning."""
    if not stages:
        return
    # torch-pruning notes each scope's channel count on its first step and measures every later
    # step against it: walk a first step (removing nothing) so it notes the unpruned counts
    for _ in pruner.step(interactive=True):
        pass
    graph = pruner.DG
    modules = dict(pruner.model.named_modules())
    for removed in stages:
        for name, is_out, idxs in removed:
            module = modules[name]
            handler = graph.get_pruner_of_module(module)
            fn = handler.prune_out_channels if is_out else handler.prune_in_channels
            graph.get_pruning_group(module, fn, idxs).prune()
    pruner.current_step = len(stages)
