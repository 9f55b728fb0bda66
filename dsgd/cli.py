"""The ``dsgd`` command: ``start`` a local cluster, read a cluster's ``status``, run one role.

dsgd start [--workers N] [--shards S] [--model MOD:ATTR] ...   (scripts/start_cluster.sh)
dsgd status --coordinator HOST:PORT [--json]
dsgd checkpoint save DIR --coordinator HOST:PORT
dsgd keys init DIR [--host NAME]...                             (then --secure DIR everywhere)
dsgd coordinator|shard|worker|evaluator ...                     (same as python -m dsgd.ROLE)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from dsgd.config import add_config_arguments, config_from_arguments
from dsgd.control import blocking_channel, check_address
from dsgd.errors import DsgdError
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.report import status_table
from dsgd.runtime import EXIT_USER_ERROR
from dsgd.security import from_arguments

SECURE_HELP = "the cluster's key directory, when it was started with --secure"


def _start(args: argparse.Namespace) -> int:
    from dsgd.supervisor import start

    return start(
        config_from_arguments(args),
        run_dir=args.run_dir,
        out=args.out,
        checkpoint_dir=args.checkpoint_dir,
        restore=args.restore,
        crash_loop_limit=args.crash_loop_limit,
        secure=args.secure,
    )


def _status(args: argparse.Namespace) -> int:
    address = check_address(args.coordinator)
    with blocking_channel(address, from_arguments(args)) as channel:
        try:
            status = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=5.0)
        except grpc.RpcError as exc:
            raise DsgdError(
                f"no coordinator answered at {address} ({exc.code().name}); "
                "is the cluster running and is the address right?"
            ) from None
    if args.json:
        print(json_format.MessageToJson(status, preserving_proto_field_name=True))  # noqa: T201
    else:
        print(status_table(status))  # noqa: T201
    return 0


def _checkpoint_save(args: argparse.Namespace) -> int:
    from dsgd.checkpoint import reassemble, write_manifest

    address = check_address(args.coordinator)
    directory: Path = args.dir
    if directory.exists() and any(directory.iterdir()):
        raise DsgdError(f"{directory} is not empty; save each checkpoint into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    versions: list[int] = []
    pieces: list[bytes] = []
    manifest: dict[str, Any] = {}
    request = pb.CheckpointRequest(reason="dsgd checkpoint save")
    with blocking_channel(address, from_arguments(args)) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        try:
            for piece in stub.SaveCheckpoint(request, timeout=args.timeout):
                if piece.manifest_json:
                    manifest = json.loads(piece.manifest_json)
                    continue
                pieces.append(piece.data)
                if piece.last:
                    saved = reassemble(pieces, directory, expected_sha256=piece.sha256)
                    versions.append(saved.version)
                    pieces = []
        except grpc.RpcError as exc:
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise DsgdError(f"checkpoint failed: {details}") from None
    if not manifest or pieces:
        raise DsgdError("the coordinator's checkpoint stream ended early; nothing was saved")
    write_manifest(
        directory,
        model=str(manifest["model"]),
        fingerprint=int(manifest["fingerprint"]),
        versions=versions,
        config=str(manifest["config"]),
    )
    print(f"saved {len(versions)} shard(s) at versions {versions} to {directory}")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "keys":
        from dsgd import keys

        try:
            return keys.main(argv[1:])
        except DsgdError as exc:
            print(f"dsgd keys: error: {exc}", file=sys.stderr)  # noqa: T201
            return EXIT_USER_ERROR
    roles = {
        "coordinator": "dsgd.coordinator.process",
        "shard": "dsgd.shard.process",
        "worker": "dsgd.worker.process",
        "evaluator": "dsgd.evaluator",
    }
    if argv and argv[0] in roles:
        import importlib

        module = importlib.import_module(roles[argv[0]])
        return int(module.main(argv[1:]))

    parser = argparse.ArgumentParser(prog="dsgd", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run a local cluster and train to the target")
    add_config_arguments(start)
    start.add_argument("--run-dir", type=Path, help="logs and results (default runs/<time>/)")
    start.add_argument("--out", type=Path, help="also write the JSON summary to this file")
    start.add_argument(
        "--checkpoint-dir", type=Path, help="shard checkpoints (default RUN_DIR/checkpoints)"
    )
    start.add_argument("--restore", type=Path, help="resume from a `dsgd checkpoint save` DIR")
    start.add_argument(
        "--crash-loop-limit",
        type=int,
        default=3,
        help="end the run when a member exits this many times in a row without progress",
    )
    start.add_argument("--secure", type=Path, metavar="DIR", help=SECURE_HELP)
    start.set_defaults(func=_start)
    status = commands.add_parser("status", help="print a running cluster's members and progress")
    status.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.add_argument("--secure", type=Path, metavar="DIR", help=SECURE_HELP)
    status.set_defaults(func=_status)
    ckpt = commands.add_parser("checkpoint", help="save a running cluster's checkpoint")
    ckpt_commands = ckpt.add_subparsers(dest="action", required=True)
    save = ckpt_commands.add_parser("save", help="stream a cluster checkpoint into DIR")
    save.add_argument("dir", type=Path, help="a new (or empty) directory")
    save.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    save.add_argument("--timeout", type=float, default=600.0, help="seconds")
    save.add_argument("--secure", type=Path, metavar="DIR", help=SECURE_HELP)
    save.set_defaults(func=_checkpoint_save)
    commands.add_parser("keys", help="make a cluster's keys (dsgd keys init DIR; see --help)")
    for role in roles:
        runs = roles[role].removesuffix(".process")
        commands.add_parser(role, help=f"run one {role} (see python -m {runs} --help)")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DsgdError as exc:
        print(f"dsgd: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
