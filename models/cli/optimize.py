"""``edge-models prune``, ``distill``, ``qat`` and ``optimize``: models made smaller by training.

Arguments are checked here, before anything heavy; the work runs in the training environment
(torch), re-running the same command there when torch is not importable in this one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.cli.common import EXIT_OK, device_argument
from models.errors import FactoryError


def _in_train_env(args: argparse.Namespace) -> int | None:
    """None where torch is importable here; else the exit code of this command re-run in the
    training environment."""
    from models.optimize.environment import has_toolchain, run_there

    return None if has_toolchain() else run_there(args.argv)


def cmd_prune(args: argparse.Namespace) -> int:
    from models.optimize.checks import check_learning_rate, check_ratio, check_schedule

    check_ratio(args.ratio)  # before anything heavy, here or there
    check_schedule(args.steps, args.stages, args.round_to)
    check_learning_rate(args.lr)
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.runs import prune_model

    record = prune_model(args.model, args.out, args.ratio, args.frames, args.steps, args.round_to,
                         args.stages, args.size, args.data, args.overwrite, lr=args.lr,
                         checkpoint_s=args.checkpoint_every, device=args.device)  # fmt: skip
    params0, params1 = record["params"]
    print(
        f"wrote {args.out}: {params0 / 1e6:.2f} M -> {params1 / 1e6:.2f} M parameters, MACs "
        f"{record['macs_ratio']:.1%} of the source's; {record['steps']} recovery step(s), loss "
        f"{record['loss'][0] if record['loss'] else '-'} -> "
        f"{record['loss'][1] if record['loss'] else '-'}"
    )
    return EXIT_OK


def cmd_distill(args: argparse.Namespace) -> int:
    from models.optimize.checks import check_learning_rate

    if args.steps < 1:
        raise FactoryError("--steps must be >= 1")
    check_learning_rate(args.lr)
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.runs import distill_model

    record = distill_model(args.teacher, args.student, args.out, args.frames, args.steps,
                           args.size, args.data, args.overwrite, lr=args.lr,
                           checkpoint_s=args.checkpoint_every, device=args.device)  # fmt: skip
    print(f"wrote {args.out}: {record['steps']} step(s), loss {record['loss'][0]} -> "
          f"{record['loss'][1]} ({record['seconds']} s)")  # fmt: skip
    return EXIT_OK


def cmd_qat(args: argparse.Namespace) -> int:
    from models.kernels import known_target
    from models.optimize.checks import check_learning_rate, check_schedule
    from models.recipes import recipe

    check_schedule(args.steps)
    check_learning_rate(args.lr)
    known_target(args.target)
    recipe(args.target)  # a target the quantizer does not make (rk3588) is refused here
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.runs import qat_model

    record = qat_model(args.model, args.out, args.frames, args.steps, args.target, args.size,
                       args.data, args.overwrite, lr=args.lr, checkpoint_s=args.checkpoint_every,
                       device=args.device, teacher_path=args.teacher)  # fmt: skip
    print(f"wrote {args.out} for {args.target} ({record['scheme']} QDQ by quantization-aware "
          f"training: {record['fake_quantizers']} fake quantizers, {record['steps']} step(s), "
          f"loss {record['loss'][0]} -> {record['loss'][1]})")  # fmt: skip
    return EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from models.kernels import known_target
    from models.optimize.chain import parse_chains
    from models.optimize.checks import check_ratio, check_schedule
    from models.recipes import recipe

    chains = parse_chains(args.chains)
    check_ratio(args.ratio)
    check_schedule(args.steps, args.stages)
    check_schedule(args.qat_steps)
    known_target(args.target)
    recipe(args.target)
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.chain import optimize

    optimize(args.model, args.frames, args.data, args.target, args.report, chains, args.ratio,
             args.steps, args.qat_steps, args.size, args.rounds, args.overwrite,
             args.stages, args.device)  # fmt: skip
    report = json.loads((args.report / "report.json").read_text())
    markdown = (args.report / "report.md").read_text().splitlines()
    print("\n".join(line for line in markdown if line.startswith("|")))
    print(f"wrote {args.report}/report.md, report.json and plots; models in {args.report}/models "
          f"({len(report['models']) - 1} optimised)")  # fmt: skip
    return EXIT_OK


def recovery_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frames", type=Path, required=True, help="unlabelled images to learn from"
    )
    parser.add_argument("--steps", type=int, default=200, help="distillation steps (200)")
    parser.add_argument(
        "--size",
        type=int,
        default=640,
        help="training input size (640: the size the model runs at; 320 is 4x faster, recovers "
        "less)",
    )
    parser.add_argument("--data", type=Path, help="the evaluation set: frames in it are refused")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--checkpoint-every", type=float, default=60.0, metavar="S",
        help="save the training state every S seconds (60); the same command run again after "
        "an interruption resumes from it (Ctrl-C once: stop after this step, state saved)",
    )  # fmt: skip
    device_argument(parser)


def learning_rate_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lr", type=float, default=1e-4,
        help="peak learning rate of the distillation (1e-4; warm-up, then a cosine to a tenth)",
    )  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser(
        "prune",
        help="structured (DepGraph) pruning with sensitivity analysis and distillation recovery",
        description="Prunes channels by dependency groups (torch-pruning), less in the blocks "
        "that hurt most, in --stages steps each followed by distillation from the unpruned model "
        "on unlabelled --frames. Runs in the training environment (scripts/setup-train.sh).",
    )
    pr.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    pr.add_argument("--ratio", type=float, required=True, help="share of channels to remove (0.3)")
    pr.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of N")
    recovery_arguments(pr)
    pr.add_argument("--stages", type=int, default=3, help="prune in this many steps (3)")
    learning_rate_argument(pr)
    pr.set_defaults(func=cmd_prune)

    di = sub.add_parser("distill", help="distil a teacher into a student of the same head")
    di.add_argument("--teacher", type=Path, required=True)
    di.add_argument("--student", type=Path, required=True)
    recovery_arguments(di)
    learning_rate_argument(di)
    di.set_defaults(func=cmd_distill)

    qa = sub.add_parser(
        "qat",
        help="quantization-aware training: fake-quantized fine-tuning with distillation from the "
        "float model, exported as the target's QDQ form",
    )
    qa.add_argument("--model", type=Path, required=True, help="float (or pruned) YOLOv8 ONNX")
    qa.add_argument("--target", required=True, help="deployment target (its INT8 recipe)")
    qa.add_argument(
        "--teacher", type=Path,
        help="float model to distil from (default: --model itself; give the unpruned model "
        "when --model is pruned: the training then recovers pruning's loss too)",
    )  # fmt: skip
    recovery_arguments(qa)
    learning_rate_argument(qa)
    qa.set_defaults(func=cmd_qat)

    op = sub.add_parser(
        "optimize",
        help="run optimisation chains (ptq, prune, prune+ptq, qat, prune+qat) and write one "
        "before/after report",
    )
    op.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    op.add_argument("--frames", type=Path, required=True, help="unlabelled frames (calibration, "
                    "recovery, QAT)")  # fmt: skip
    op.add_argument("--data", type=Path, required=True, help="the evaluation set")
    op.add_argument("--target", required=True, help="deployment target")
    op.add_argument("--report", type=Path, required=True, help="report folder to write")
    op.add_argument("--chains", default="ptq,prune,prune+ptq,qat,prune+qat")
    op.add_argument("--ratio", type=float, default=0.3)
    op.add_argument("--steps", type=int, default=300, help="recovery steps after pruning (300)")
    op.add_argument("--stages", type=int, default=3, help="prune in this many steps (3)")
    op.add_argument("--qat-steps", type=int, default=100)
    op.add_argument("--size", type=int, default=640, help="training input size (640, as for prune)")
    op.add_argument("--rounds", type=int, default=30, help="latency rounds (30)")
    op.add_argument("--overwrite", action="store_true")
    device_argument(op)
    op.set_defaults(func=cmd_optimize)
