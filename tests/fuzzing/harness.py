"""Shards to fire the fault catalogue at, and the oracle that judges each reply.

- :class:`LiveShard`: a :class:`~dsgd.shard.server.ShardServer` serving in this event loop
  (real ZeroMQ sockets on 127.0.0.1) with a raw DEALER socket aimed at it;
- :class:`CoreShard`: the same checks on :class:`~dsgd.shard.core.ShardCore` directly,
  with no sockets (thousands of messages a second).

Each message must be refused for the reason the catalogue predicts: exactly that
``rejected_*`` counter grows by one, and the one reply says so (an ERROR or a rejecting
ACK, as the core's CHECKS say). Afterwards the shard must still serve a fetch, with its
parameters and optimizer state bit-identical, its version unmoved, no parameter marked
changed, and at most one log line per reason every few seconds (:meth:`verify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from dsgd import wire
from dsgd.optim import Adagrad, ServerOptimizerT
from dsgd.shard.core import ShardCore, ShardState
from dsgd.shard.server import ShardServer
from tests.fuzzing.catalogue import (
    ERROR_REASONS,
    FINGERPRINT,
    SHARD_ID,
    SIZE,
    Message,
    RandomDraw,
    malformed_message,
)

REPLY_TIMEOUT = 10.0  # seconds a reply may take before the shard counts as hung


@dataclass
class Outcome:
    """What became of one message."""

    faults: list[str]
    expected: str
    counted: dict[str, int]  # rejection counters that grew, and by how much
    reply: str  # "error: ...", "ack: ...", "none", or a description of an odd reply
    problem: str = ""  # empty when the shard did exactly what it should

    @property
    def ok(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        return (
            f"{self.problem}: faults {self.faults}, expected rejected_{self.expected}, "
            f"counted {self.counted}, reply {self.reply}"
        )


class _LogCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < 8:
            self.samples.append(record.getMessage()[:300])


def initial_params() -> np.ndarray:
    return np.random.default_rng(7).standard_normal(SIZE).astype(np.float32)


class FuzzedShard:
    """A shard core under fire, and the oracle; subclasses say how a message reaches it.

    ``installed=False`` keeps the shard without parameters (it must refuse everything).
    """

    def __init__(
        self, *, installed: bool = True, optimizer: ServerOptimizerT | None = None
    ) -> None:
        self.installed = installed
        self.optimizer: ServerOptimizerT = optimizer or Adagrad(0.1)
        self.crashes: list[str] = []
        self.hangs = 0
        self.expected: Counter[str] = Counter()  # rejections this shard owes us
        self.log = _LogCounter()
        self.started = time.monotonic()
        self.core = self._new_core()
        self.initial = self.state_bytes()
        self.notes: list[str] = []  # why the last verify() failed

    def _new_core(self) -> ShardCore:
        optimizer = self.optimizer
        state = ShardState(initial_params(), optimizer.init(SIZE)) if self.installed else None
        return ShardCore(SHARD_ID, FINGERPRINT, optimizer, state, chunk_bytes=1 << 14)

    async def start(self) -> FuzzedShard:
        logger = logging.getLogger("dsgd.shard")
        if self.log not in logger.handlers:
            logger.addHandler(self.log)
        return self

    async def aclose(self) -> None:
        logging.getLogger("dsgd.shard").removeHandler(self.log)

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def alive(self) -> bool:
        return True

    async def revive(self) -> None:
        """Replace a shard that died with a fresh one (same parameters)."""

    async def exchange(self, frames: Sequence[bytes]) -> list[bytes] | None:
        """Send one message and return the one reply; None if the shard died or hung."""
        raise NotImplementedError

    def state_bytes(self) -> bytes:
        """Parameters, optimizer state and version, as bytes (what must never change)."""
        state = self.core.state
        parts = [state.params.tobytes(), str(state.version).encode()]
        parts += [
            name.encode() + state.opt_state[name].tobytes() for name in sorted(state.opt_state)
        ]
        return b"|".join(parts)

    # -- one message ----------------------------------------------------------------------------

    async def probe(self, message: Message, expected: str | None = None) -> Outcome:
        """Send a message that must be refused for ``expected`` (any reason if ``""``)."""
        want = message.expected if expected is None else expected
        if not self.installed and want and want != "malformed":
            want = "not_ready"  # a shard without parameters looks no further than the framing
        before = Counter(self.core.rejected)
        frames = await self.exchange(message.frames)
        counted = dict(self.core.rejected - before)
        outcome = Outcome(message.faults, want or "*", counted, "none")
        if frames is None:
            outcome.problem = self.crashes[-1] if not self.alive else "no reply (hang)"
            return outcome
        outcome.reply, is_error = describe_reply(frames)
        total = sum(counted.values())
        if total == 0:
            outcome.problem = "not refused" if is_error is None else "refused but not counted"
        elif total > 1:
            outcome.problem = "counted more than once"
        elif want and want not in counted:
            outcome.problem = f"refused for another reason ({next(iter(counted))})"
        elif is_error != (next(iter(counted)) in ERROR_REASONS):
            outcome.problem = "the reply does not match the reason"
        if outcome.problem:
            self.reset_link()
        else:
            self.expected.update(counted)
        return outcome

    def reset_link(self) -> None:
        """Forget replies still on their way (after a problem, they would confuse the next)."""

    # -- after a batch --------------------------------------------------------------------------

    async def fetch(self, since: int = -1) -> tuple[np.ndarray | None, list[str]]:
        """A valid FETCH: (dense parameters or sparse indices, problems)."""
        request = wire.Header(
            kind=wire.FETCH, fingerprint=FINGERPRINT, shard=SHARD_ID, base_version=since
        )
        replies = await self.exchange_all([wire.pack_header(request)])
        if not replies:
            return None, ["the shard did not answer a valid fetch"]
        header, arrays = wire.decode(replies[0])
        if header.kind != wire.PARAMS:
            return None, [f"a valid fetch was answered with {header.kind}: {header.reason}"]
        if header.encoding == wire.SPARSE:
            return arrays[0].copy(), []
        dest = np.empty(SIZE, np.float32)
        for frames in replies:
            chunk, (values,) = wire.decode(frames)
            dest[chunk.offset : chunk.offset + chunk.count] = values
        return dest, []

    async def exchange_all(self, frames: Sequence[bytes]) -> list[list[bytes]]:
        """Send one request and collect every reply message it is answered with."""
        first = await self.exchange(frames)
        if first is None:
            return []
        replies = [first]
        header = wire.unpack_header(first[0])
        while len(replies) < header.nchunks:
            more = await self.next_reply()
            if more is None:
                break
            replies.append(more)
        return replies

    async def next_reply(self) -> list[bytes] | None:
        raise NotImplementedError

    async def verify(self) -> dict[str, bool]:
        """What must hold after any number of refused messages, by name; see :attr:`notes`."""
        self.notes = []
        checks = {"serving": self.alive}
        if not self.alive:
            self.notes.append(self.crashes[-1] if self.crashes else "the shard died")
            return checks
        checks["state_identical"] = self.state_bytes() == self.initial
        if self.installed:
            dense, trouble = await self.fetch()
            self.notes += trouble
            checks["fetch_identical"] = (
                dense is not None and dense.tobytes() == initial_params().tobytes()
            )
            changed, trouble = await self.fetch(since=0)
            self.notes += trouble
            checks["nothing_marked_changed"] = changed is not None and changed.size == 0
        else:
            before = Counter(self.core.rejected)
            request = wire.Header(kind=wire.FETCH, fingerprint=FINGERPRINT, shard=SHARD_ID)
            frames = await self.exchange([wire.pack_header(request)])
            text, is_error = describe_reply(frames) if frames is not None else ("none", None)
            checks["refuses_fetch_until_installed"] = bool(is_error) and "no parameters" in text
            self.expected.update(self.core.rejected - before)
        checks["status_counts_every_rejection"] = self._counted_all()
        checks["log_rate_limited"] = self.log.count <= self.log_line_bound()
        self.notes += [f"check failed: {name}" for name, ok in checks.items() if not ok]
        return checks

    def _counted_all(self) -> bool:
        stats = self.core.stats()
        owed = sum(self.expected.values())
        ok = stats.get("rejected") == owed and all(
            stats.get(f"rejected_{reason}") == n for reason, n in self.expected.items()
        )
        if not ok:
            counted = {k: v for k, v in stats.items() if k.startswith("rejected")}
            self.notes.append(f"status counts {counted}; sent {dict(self.expected)}")
        return ok

    def log_line_bound(self) -> int:
        """At most one line per reason per rate-limit interval (plus the first)."""
        periods = 1 + math.ceil((time.monotonic() - self.started) / self.core.rate_log.interval)
        return (len(self.core.rejected) + 1) * periods


class CoreShard(FuzzedShard):
    """The core alone: a message is one :meth:`ShardCore.handle` call."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._pending: list[list[bytes]] = []

    async def exchange(self, frames: Sequence[bytes]) -> list[bytes] | None:
        try:
            replies = self.core.handle(list(frames))
        except Exception as exc:  # a crash is a finding: record it and carry on
            self.crashes.append(f"handle() raised {exc!r}")
            return None
        encoded = [[bytes(memoryview(f)) for f in reply] for reply in replies]
        self._pending = encoded[1:]
        return encoded[0] if encoded else None

    async def next_reply(self) -> list[bytes] | None:
        return self._pending.pop(0) if self._pending else None

    def reset_link(self) -> None:
        self._pending = []


class LiveShard(FuzzedShard):
    """A ShardServer serving in this event loop, with a raw DEALER socket aimed at it.

    A shard that crashed is replaced by :meth:`revive`, so one bad message does not hide
    the next; :attr:`crashes` keeps what killed it.
    """

    def __init__(self, *, reply_timeout: float = REPLY_TIMEOUT, **kw: Any) -> None:
        super().__init__(**kw)
        self.reply_timeout = reply_timeout
        self.ctx = zmq.asyncio.Context()
        self.server: ShardServer | None = None
        self.dealer: zmq.asyncio.Socket | None = None

    async def start(self) -> LiveShard:
        self.server = ShardServer(self.core, context=self.ctx)
        await self.server.start_serving()
        self.reset_link()
        self.initial = self.state_bytes()
        self.expected.clear()
        await super().start()
        return self

    def reset_link(self) -> None:
        """A fresh DEALER: a late reply must not be taken for the next message's."""
        assert self.server is not None
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.server.data_address)

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.serving

    async def revive(self) -> None:
        if self.alive:
            return
        await self._close_server()
        self.core = self._new_core()
        await self.start()

    async def _close_server(self) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
            self.dealer = None
        if self.server is not None:
            try:
                await self.server.aclose()
            except Exception as exc:  # the crash was recorded when it happened
                if not self.crashes:
                    self.crashes.append(f"serve() died: {exc!r}")
            self.server = None

    async def aclose(self) -> None:
        await self._close_server()
        await super().aclose()
        self.ctx.destroy(linger=0)

    async def exchange(self, frames: Sequence[bytes]) -> list[bytes] | None:
        assert self.dealer is not None
        await self.dealer.send_multipart(list(frames))
        reply = await self.next_reply()
        if reply is None:
            if not self.alive:
                self.crashes.append("serve() died")
            else:
                self.hangs += 1
            self.reset_link()
        return reply

    async def next_reply(self) -> list[bytes] | None:
        assert self.dealer is not None
        receiving = asyncio.ensure_future(self.dealer.recv_multipart())
        deadline = time.monotonic() + self.reply_timeout
        while not receiving.done() and time.monotonic() < deadline and self.alive:
            await asyncio.wait({receiving}, timeout=0.05)
        if receiving.done():
            return receiving.result()
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
            await receiving
        return None


def describe_reply(frames: list[bytes]) -> tuple[str, bool | None]:
    """("error: why" / "ack: why" / what is odd, True for ERROR, False for a rejecting ACK)."""
    if len(frames) != 1:
        return f"{len(frames)} frames", None
    try:
        header = wire.unpack_header(frames[0])
    except Exception as exc:  # the shard's own reply must parse; say why it did not
        return f"unparsable reply: {exc}", None
    if header.kind == wire.ERROR:
        return f"error: {header.reason}", True
    if header.kind == wire.ACK and header.status == wire.AckStatus.REJECTED:
        return f"ack: {header.reason}", False
    return f"{header.kind}: {header.status}", None


async def fire(shard: FuzzedShard, messages: int, seed: int = 0) -> dict[str, Any]:
    """Send ``messages`` malformed messages to ``shard``; return the JSON-able results."""
    draw = RandomDraw(seed)
    faults: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    problems: list[str] = []
    problem_count = 0
    began = time.perf_counter()
    for _ in range(messages):
        message = malformed_message(draw)
        faults.update(message.faults)
        outcome = await shard.probe(message)
        expected[outcome.expected] += 1
        if not outcome.ok:
            problem_count += 1
            if len(problems) < 20:
                problems.append(outcome.describe())
            await shard.revive()
    duration = time.perf_counter() - began
    checks = await shard.verify()
    stats = shard.core.stats()
    return {
        "messages": messages,
        "seed": seed,
        "installed": shard.installed,
        "shard_size": SIZE,
        "duration_seconds": round(duration, 3),
        "messages_per_second": round(messages / duration, 1) if duration > 0 else None,
        "crashes": len(shard.crashes),
        "crash_reports": shard.crashes[:5],
        "hangs": shard.hangs,
        "unexpected_outcomes": problem_count,
        "unexpected_examples": problems,
        "params_identical": checks.get("state_identical", False)
        and checks.get("fetch_identical", not shard.installed),
        "checks": checks,
        "check_notes": shard.notes,
        "rejections": {k: int(v) for k, v in sorted(shard.core.rejected.items())},
        "rejected_total_in_status": stats.get("rejected", 0.0),
        "expected_rejections": dict(sorted(expected.items())),
        "faults": dict(sorted(faults.items())),
        "log_lines": shard.log.count,
        "log_line_bound": shard.log_line_bound(),
        "log_samples": shard.log.samples,
        "ok": not (problem_count or shard.crashes or shard.hangs) and all(checks.values()),
    }
