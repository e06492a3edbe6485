"""``edge-models keys``, ``publish``, ``rollout`` and ``refresh``: the signed OTA channel.

``publish`` parses into a ``ReleaseRequest`` and prints what ``models.release.release`` answers;
``rollout --auto`` wires the health-gated controller to the fleet's broker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import __version__
from agent.link import add_broker_arguments, broker_config
from models.cli.common import EXIT_GATE, EXIT_HALTED, EXIT_OK, target_arguments
from models.errors import FactoryError


def cmd_keys_init(args: argparse.Namespace) -> int:
    from models.channel import create, init_keys

    root_key, root = init_keys(args.keys, args.channel, args.root_key)
    create(args.channel, args.keys, root, args.name)
    print(f"channel {args.name!r} created in {args.channel}")
    print(f"online keys (targets, snapshot, timestamp): {args.keys}")
    print(f"ROOT KEY: {root_key}: move it to offline storage; publishing never needs it")
    print(f"provision devices with {args.channel / 'metadata' / '1.root.json'} (config ota.root)")
    return EXIT_OK


def release_request(args: argparse.Namespace):  # -> ReleaseRequest
    """``publish``'s arguments as the release API's request."""
    from models.release import GateSettings, ReleaseRequest

    gate = GateSettings(args.reference, args.data, args.max_map_drop, args.max_latency_ratio,
                        args.rounds, args.no_gate)  # fmt: skip
    return ReleaseRequest(
        channel=args.channel,
        keys=args.keys,
        model=args.model,
        version=args.version,
        name=args.name,
        target=args.target,
        unverified_target=args.unverified_target,
        rollout_percent=args.rollout,
        min_agent_version=args.min_agent_version,
        info=args.info,
        calib=args.calib,
        engines=tuple(args.engine),
        golden=args.golden,
        golden_images=tuple(args.golden_images or ()),
        gate=gate,
    )


def cmd_publish(args: argparse.Namespace) -> int:
    from models.release import GateFailed, release

    outcome = release(release_request(args), warn=lambda text: print(f"WARNING: {text}",
                                                                      file=sys.stderr))  # fmt: skip
    if isinstance(outcome, GateFailed):
        print(f"FAIL {outcome.model}: not published", file=sys.stderr)
        for reason in outcome.reasons:
            print(f"  - {reason}", file=sys.stderr)
        return EXIT_GATE
    print(
        f"published {outcome.name} {outcome.version} for {outcome.target} "
        f"({outcome.length} bytes, sha256 {outcome.sha256[:12]}; rollout "
        f"{outcome.rollout_percent:g}%; timestamp v{outcome.timestamp_version})"
    )
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace) -> int:
    from models.channel import set_rollout, withdraw

    if args.auto:
        return _auto_rollout(args)
    if args.withdraw is not None:
        release = withdraw(args.channel, args.keys, args.name, args.version, args.withdraw)
        print(f"{args.name} {args.version}: withdrawn ({release.withdrawn}); rollout now 0%")
        return EXIT_OK
    old = set_rollout(args.channel, args.keys, args.name, args.version, args.percent)
    print(f"{args.name} {args.version}: rollout {old:g}% -> {args.percent:g}%")
    return EXIT_OK


def _auto_rollout(args: argparse.Namespace) -> int:
    """The health-gated controller: 0 while it goes well or is done, EXIT_HALTED on a halt."""
    from models.channel.rollout import RolloutPolicy, parse_steps
    from models.channel.rollout_controller import ControllerSettings, RolloutController

    if args.interval <= 0 or args.wait < 0:
        raise FactoryError("--interval must be > 0 and --wait >= 0")
    if args.egress_mbps is not None and not args.egress_mbps > 0:
        raise FactoryError(f"--egress-mbps must be > 0, got {args.egress_mbps:g}")
    try:
        policy = RolloutPolicy(
            steps=parse_steps(args.steps),
            max_failure_rate=args.max_failure_rate,
            min_outcomes=args.min_outcomes,
            success_share=args.success_share,
            soak_s=args.soak,
            withdraw_on_halt=args.withdraw_on_halt,
        )
    except ValueError as exc:
        raise FactoryError(str(exc)) from None
    settings = ControllerSettings(
        args.channel,
        args.keys,
        args.name,
        args.version,
        policy,
        args.log,
        not args.no_announce,
        args.egress_mbps,
    )
    controller = RolloutController(settings, broker_config(args))  # an unknown release stops here
    controller.connect(args.timeout, args.wait)  # and an unreachable broker here: nothing signed
    try:
        decision = controller.run(args.interval, args.once)
    finally:
        controller.close()
    return EXIT_HALTED if decision.action == "halt" else EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    from models.channel import refresh

    version = refresh(args.channel, args.keys)
    print(f"re-signed snapshot and timestamp (timestamp v{version})")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="signing keys of an OTA channel")
    k_sub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    ki = k_sub.add_parser("init", help="make Ed25519 keys and a new, empty signed channel")
    ki.add_argument("--keys", type=Path, required=True, help="folder for the online keys")
    ki.add_argument("--channel", type=Path, required=True, help="channel folder to create")
    ki.add_argument("--root-key", type=Path, help="root key file (default <keys>/offline/root.pem)")
    ki.add_argument("--name", default="stable", help="channel name (default stable)")
    ki.set_defaults(func=cmd_keys_init)

    p = sub.add_parser("publish", help="gate a model and publish it to an OTA channel")
    p.add_argument("--channel", type=Path, required=True)
    p.add_argument("--keys", type=Path, required=True, help="online keys (keys init)")
    p.add_argument("--model", type=Path, required=True, help="model file (.onnx, .engine, .rknn)")
    p.add_argument("--version", dest="version", required=True, help="semantic version, 1.2.0")
    p.add_argument("--name", help="model line devices follow (default: the model's name)")
    p.add_argument("--rollout", type=float, default=100.0, help="percent of devices (100)")
    p.add_argument("--min-agent-version", default=__version__)
    p.add_argument("--info", type=Path, help="for an engine: the ONNX it was built from")
    p.add_argument(
        "--calib", type=Path, help="rk3588: calibration images (the float model is converted)"
    )
    p.add_argument(
        "--engine",
        type=Path,
        action="append",
        default=[],
        help="jetson-*: a TensorRT engine built from --model by build-engine (repeatable: one per "
        "TensorRT version and GPU); devices that match take it, others build their own",
    )
    p.add_argument("--golden", type=Path, help="golden set (edge-models golden)")
    p.add_argument("--golden-images", type=Path, nargs="+", help="record the golden set here")
    p.add_argument("--reference", type=Path, help="gate: float model or stored report.json")
    p.add_argument("--data", type=Path, help="gate: evaluation dataset")
    p.add_argument("--max-map-drop", type=float, default=1.0)
    p.add_argument("--max-latency-ratio", type=float, default=1.10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--no-gate", action="store_true", help="skip the quality gate (recorded)")
    target_arguments(p)
    p.set_defaults(func=cmd_publish)

    r = sub.add_parser(
        "rollout",
        help="set, withdraw or drive (--auto) the share of devices a release goes to",
        description="--percent sets the share by hand; --withdraw stops every device that has "
        "not taken the release; --auto raises the share step by step while the devices that took "
        "it commit it, and halts when failures in the cohort pass --max-failure-rate (exit 4).",
    )
    r.add_argument("--channel", type=Path, required=True)
    r.add_argument("--keys", type=Path, required=True, help="online keys (no root key needed)")
    r.add_argument("--name", required=True)
    r.add_argument("--version", dest="version", required=True)
    mode = r.add_mutually_exclusive_group(required=True)
    mode.add_argument("--percent", type=float, help="set the share (0-100)")
    mode.add_argument("--withdraw", metavar="REASON", help="withdraw the release, saying why")
    mode.add_argument("--auto", action="store_true", help="health-gated staged rollout")
    auto = r.add_argument_group("--auto")
    auto.add_argument("--steps", default="1,5,25,100", help="percent steps (default 1,5,25,100)")
    auto.add_argument("--max-failure-rate", type=float, default=0.10, help="halt above (0.10)")
    auto.add_argument(
        "--min-outcomes", type=int, default=5, help="outcomes before a halt can trigger (5)"
    )
    auto.add_argument(
        "--success-share", type=float, default=0.90, help="committed share before a raise (0.90)"
    )
    auto.add_argument("--soak", type=float, default=600.0, help="seconds at a step, at least (600)")
    auto.add_argument("--interval", type=float, default=30.0, help="seconds between decisions")
    auto.add_argument("--once", action="store_true", help="one decision, then exit (for cron)")
    auto.add_argument("--withdraw-on-halt", action="store_true", help="a halt also withdraws")
    auto.add_argument("--no-announce", action="store_true", help="do not announce a raise")
    auto.add_argument(
        "--egress-mbps",
        type=float,
        help="a raise asks the devices it adds to spread their downloads so the channel serves "
        "at most this many Mbit/s on average (devices never wait less than their own jitter)",
    )
    auto.add_argument("--log", type=Path, help="append every decision to this JSON-lines file")
    auto.add_argument(
        "--wait", type=float, default=5.0, help="at most this long to read retained state (5 s)"
    )
    add_broker_arguments(auto)
    r.set_defaults(func=cmd_rollout)

    f = sub.add_parser("refresh", help="re-sign snapshot and timestamp before they expire")
    f.add_argument("--channel", type=Path, required=True)
    f.add_argument("--keys", type=Path, required=True)
    f.set_defaults(func=cmd_refresh)
