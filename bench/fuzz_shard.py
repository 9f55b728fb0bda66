"""Fuzz a parameter shard with malformed data-plane messages; count what it refused.

    python -m bench.fuzz_shard [--messages 10000] [--seed 0] [--out bench/results]
                               [--uninstalled] [--core]

Fires the fault catalogue (:mod:`tests.fuzzing.catalogue`) at a live shard: a
:class:`~dsgd.shard.server.ShardServer` in this process on real ZeroMQ sockets on
127.0.0.1 (``--core``: at :class:`~dsgd.shard.core.ShardCore` directly, no sockets),
one message at a time, and checks each reply against the refusal the catalogue predicts
(:mod:`tests.fuzzing.harness`). Writes ``fuzz_shard.json`` into ``--out``, prints a
one-line summary, and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from bench._common import ROOT, write_json
from tests.fuzzing.harness import CoreShard, FuzzedShard, LiveShard, fire

JSON_NAME = "fuzz_shard.json"


async def run(
    messages: int, seed: int = 0, *, installed: bool = True, core: bool = False
) -> dict[str, Any]:
    """Fuzz a fresh shard with ``messages`` messages; the JSON-able results."""
    kind = CoreShard if core else LiveShard
    shard: FuzzedShard = kind(installed=installed)
    async with shard:
        result = await fire(shard, messages, seed)
    return {"benchmark": "fuzz_shard", "target": "core" if core else "live", **result}


def summary(result: dict[str, Any], path: Path | None = None) -> str:
    reasons = " ".join(f"{k}={v}" for k, v in result["rejections"].items())
    where = f" -> {path}" if path else ""
    return (
        f"fuzz_shard ({result['target']}): {result['messages']} messages in "
        f"{result['duration_seconds']:.1f} s ({result['messages_per_second']}/s); crashes "
        f"{result['crashes']}, hangs {result['hangs']}, unexpected "
        f"{result['unexpected_outcomes']}; rejected {reasons}; parameters bit-identical: "
        f"{'yes' if result['params_identical'] else 'NO'}; {result['log_lines']} log lines; "
        f"{'OK' if result['ok'] else 'FAILED'}{where}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz_shard",
        description="Send generated malformed data-plane messages to a shard.",
    )
    parser.add_argument("--messages", type=int, default=10_000, help="messages to send")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="directory for the JSON"
    )
    parser.add_argument(
        "--uninstalled", action="store_true", help="fire at a shard that has no parameters yet"
    )
    parser.add_argument("--core", action="store_true", help="drive the shard core, no sockets")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(
        run(args.messages, args.seed, installed=not args.uninstalled, core=args.core)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / JSON_NAME
    write_json(path, result, strict=False)
    print(summary(result, path))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
