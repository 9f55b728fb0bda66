"""Security: a cluster started with --secure trains; nobody without its keys gets in, and
nothing they send changes a parameter; plaintext off loopback is refused."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import zmq
import zmq.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsgd import keys, wire
from dsgd.control import blocking_channel
from dsgd.errors import ConfigError, PeerLost
from dsgd.proto import control_pb2 as pb
from dsgd.proto import control_pb2_grpc as pb_grpc
from dsgd.security import CA_KEY, RELOAD_INTERVAL, TLS_CHANNEL_OPTIONS, Security
from dsgd.shard.client import ShardClient
from dsgd.shard.server import ShardServer
from tests.conftest import FINGERPRINT, ROOT, ProcessGroup, free_port, make_shard, run_dsgd


@pytest.fixture(scope="module")
def cluster_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys") / "cluster"
    keys.init(directory, ["node-a", "10.0.0.7"])
    return directory


@pytest.fixture(scope="module")
def foreign_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys") / "foreign"
    keys.init(directory, [])
    return directory


# -- keys --------------------------------------------------------------------------------


def test_keys_init_makes_what_every_process_loads(tmp_path: Path) -> None:
    proc = run_dsgd("keys", "init", str(tmp_path / "k"), "--host", "shard-0.dsgd")
    assert proc.returncode == 0, proc.stderr
    security = Security.load(tmp_path / "k")
    assert security.server_secret is not None and len(security.token) == 64
    assert (tmp_path / "k" / "admitted-member.key").is_file()
    for secret in (CA_KEY, "ca", "member.key", "token", "curve-server.key_secret"):
        assert (tmp_path / "k" / secret).stat().st_mode & 0o077 == 0, secret
    # flat but for the CA's key: a Secret made from the directory holds all a member needs
    # and not that key
    assert {p.name for p in (tmp_path / "k").iterdir() if p.is_dir()} == {"ca"}
    # and a second init into the same directory is refused rather than overwriting it
    again = run_dsgd("keys", "init", str(tmp_path / "k"))
    assert again.returncode == 2 and "is not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_keys_add_makes_a_member_directory_without_the_cluster_secrets(
    cluster_keys: Path, tmp_path: Path
) -> None:
    keys.add(cluster_keys, "extra-worker", tmp_path / "extra", [])
    member = Security.load(tmp_path / "extra")
    assert member.server_secret is None and not (tmp_path / "extra" / CA_KEY).exists()
    assert member.token == Security.load(cluster_keys).token
    assert (cluster_keys / "admitted-extra-worker.key").is_file()
    with pytest.raises(ConfigError, match="exists already"):
        keys.add(cluster_keys, "extra-worker", tmp_path / "again", [])


@pytest.mark.parametrize(
    "broken, message",
    [("token", "cannot be read"), ("curve-server.key", "cannot be read")],
)
def test_a_broken_key_directory_is_a_one_line_error(
    tmp_path: Path, broken: str, message: str
) -> None:
    keys.init(tmp_path / "k", [])
    (tmp_path / "k" / broken).unlink()
    with pytest.raises(ConfigError, match=message):
        Security.load(tmp_path / "k")
    with pytest.raises(ConfigError, match="no key directory"):
        Security.load(tmp_path / "nowhere")


# -- a secured cluster ---------------------------------------------------------------------


def test_a_secured_cluster_of_processes_trains_to_target(
    cluster_keys: Path, tmp_path: Path
) -> None:
    out = tmp_path / "summary.json"
    proc = run_dsgd(
        "start",
        "--secure",
        str(cluster_keys),
        "--workers",
        "2",
        "--shards",
        "2",
        "--replicas",  # backups replicate from their primaries over CURVE too
        "2",
        "--max-seconds",
        "150",
        "--run-dir",
        str(tmp_path / "run"),
        "--out",
        str(out),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["reached_target"] and summary["shards"] == 2
    assert summary["rejected"] == 0  # every member got in, nobody was refused
    assert summary["failovers"] == 0
    for k in (0, 1):
        logs = "".join((tmp_path / "run" / f"shard{k}-r{j}.log").read_text() for j in (0, 1))
        assert "caught up with its primary" in logs
    # and the members really spoke CURVE: a shard announces no plaintext endpoint
    assert "authenticated and encrypted" in proc.stderr


# -- the data plane: nobody without a cluster key gets in ---------------------------------------


def _push_frames(seq: int) -> list[bytes]:
    header = wire.Header(
        kind=wire.PUSH, fingerprint=FINGERPRINT, shard=0, worker=7, seq=seq, count=16, offset=0
    )
    return [wire.pack_header(header), np.full(16, 1e3, np.float32).tobytes()]


async def _fetch(server: ShardServer, security: Security | None, ctx: zmq.asyncio.Context) -> bytes:
    client = ShardClient(
        0, server.data_address, server.pub_address, FINGERPRINT, 7, ctx,
        fetch_timeout=3.0, security=security,
    )  # fmt: skip
    await client.start()
    try:
        out = np.empty(server.core.state.params.size, np.float32)
        await client.fetch(out)
        return out.tobytes()
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _dealer(
    ctx: zmq.asyncio.Context, security: Security | None, address: str
) -> AsyncIterator[zmq.asyncio.Socket]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if security is not None:
        security.curve_client(sock)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()


def _with_curve_pair(security: Security, public: bytes, secret: bytes) -> Security:
    return replace(security, member_public=public, member_secret=secret)


async def test_clients_without_a_cluster_key_are_refused_and_change_nothing(
    cluster_keys: Path, foreign_keys: Path, zmq_ctx: zmq.asyncio.Context
) -> None:
    security = Security.load(cluster_keys)
    foreign = Security.load(foreign_keys)
    server = await make_shard(security=security)
    try:
        before = await _fetch(server, security, zmq_ctx)
        version = server.core.state.version
        strangers = {
            # no key at all: a plaintext client
            "plaintext": None,
            # a key pair of its own, not admitted, but the right server key
            "unknown_key": _with_curve_pair(security, *zmq.curve_keypair()),
            # another cluster's keys altogether (it expects another server key, too)
            "foreign": foreign,
        }
        for security_of_stranger in strangers.values():
            async with _dealer(zmq_ctx, security_of_stranger, server.data_address) as sock:
                await sock.send_multipart(_push_frames(1))
                assert not await sock.poll(500), "a stranger got an answer"
        # the shard still serves its members, and holds bit for bit what it held
        assert await _fetch(server, security, zmq_ctx) == before
        assert server.core.state.version == version and server.serving
        refused = server.core.rejected
        assert refused["handshake"] >= 1  # the plaintext client
        assert refused["unknown_key"] >= 1  # the key nobody admitted
        # the same push from a member is applied: the check above can fail
        async with _dealer(zmq_ctx, security, server.data_address) as member:
            await member.send_multipart(_push_frames(1))
            assert await member.poll(10_000), "no ACK for a member's push"
        assert server.core.state.version == version + 1
        assert await _fetch(server, security, zmq_ctx) != before
    finally:
        await server.aclose()


async def test_a_member_added_later_is_admitted_and_a_deleted_one_turned_away(
    cluster_keys: Path, tmp_path: Path, zmq_ctx: zmq.asyncio.Context
) -> None:
    server = await make_shard(security=Security.load(cluster_keys))
    try:
        keys.add(cluster_keys, "late", tmp_path / "late", [])  # while the shard serves
        late = Security.load(tmp_path / "late")
        assert len(await _fetch(server, late, zmq_ctx)) == server.core.state.params.nbytes
        (cluster_keys / "admitted-late.key").unlink()
        await asyncio.sleep(RELOAD_INTERVAL * 2)
        with pytest.raises(PeerLost):
            await _fetch(server, late, zmq_ctx)
        assert server.core.rejected["unknown_key"] >= 1
    finally:
        await server.aclose()


# -- the control plane: mutual TLS and the token -------------------------------------------------


@pytest.fixture
def secure_coordinator(
    cluster_keys: Path, processes: ProcessGroup
) -> Iterator[tuple[str, Security, int]]:
    health_port = free_port()
    _, address = processes.start_coordinator(
        "--secure", str(cluster_keys), "--health-port", str(health_port)
    )
    yield address, Security.load(cluster_keys), health_port


def _status(address: str, credentials: grpc.ChannelCredentials) -> pb.ClusterStatus:
    with grpc.secure_channel(address, credentials, options=TLS_CHANNEL_OPTIONS) as channel:
        return pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=5.0)


def _with_token(credentials: grpc.ChannelCredentials, token: str) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(
        credentials, grpc.access_token_call_credentials(token)
    )


def _expired(cluster_keys: Path) -> tuple[bytes, bytes]:
    now = datetime.datetime.now(datetime.UTC)
    return keys.issue_certificate(
        cluster_keys,
        "expired member",
        [],
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )


def test_control_calls_without_certificate_or_token_are_refused(
    secure_coordinator: tuple[str, Security, int], foreign_keys: Path, cluster_keys: Path
) -> None:
    address, security, health_port = secure_coordinator
    foreign = Security.load(foreign_keys)
    expired_cert, expired_key = _expired(cluster_keys)
    refused_by_tls = {
        "no certificate": _with_token(grpc.ssl_channel_credentials(security.ca), security.token),
        "a foreign certificate": _with_token(
            grpc.ssl_channel_credentials(security.ca, foreign.key, foreign.cert), security.token
        ),
        "an expired certificate": _with_token(
            grpc.ssl_channel_credentials(security.ca, expired_key, expired_cert), security.token
        ),
    }
    for what, credentials in refused_by_tls.items():
        with pytest.raises(grpc.RpcError) as refused:
            _status(address, credentials)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
    with grpc.insecure_channel(address) as plaintext, pytest.raises(grpc.RpcError):
        pb_grpc.CoordinatorStub(plaintext).Status(pb.StatusRequest(), timeout=5.0)
    # the right certificate and a wrong token: refused by the token check, and counted
    wrong_token = replace(security, token="0" * 64).channel_credentials()
    with pytest.raises(grpc.RpcError) as refused_call:
        _status(address, wrong_token)
    assert refused_call.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # probes need no token (but still a certificate on the control port)
    mtls_only = grpc.ssl_channel_credentials(security.ca, security.key, security.cert)
    with grpc.secure_channel(address, mtls_only, options=TLS_CHANNEL_OPTIONS) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    # ... and none on --health-port, which serves the health service alone, in the clear
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as plain:
        check = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as absent:
            pb_grpc.CoordinatorStub(plain).Status(pb.StatusRequest(), timeout=5.0)
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # and a member's call goes through, and sees what was refused
    with blocking_channel(address, security) as channel:
        status = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=5.0)
    assert status.refused["token"] == 1


def test_dsgd_status_speaks_to_a_secured_coordinator(
    secure_coordinator: tuple[str, Security, int], cluster_keys: Path
) -> None:
    address, _, _ = secure_coordinator
    ok = run_dsgd("status", "--coordinator", address, "--secure", str(cluster_keys), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["model"] == "dsgd.examples.digits:digits_cnn"
    plain = run_dsgd("status", "--coordinator", address)
    assert plain.returncode == 2 and "no coordinator answered" in plain.stderr


# -- plaintext off loopback --------------------------------------------------------------------


@pytest.mark.parametrize(
    "role, args",
    [
        ("dsgd.coordinator", ["--host", "0.0.0.0"]),
        ("dsgd.shard", ["--host", "0.0.0.0", "--coordinator", "127.0.0.1:1", "--shard-id", "0"]),
    ],
)
def test_plaintext_off_loopback_is_refused_in_one_line(role: str, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", role, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "refusing to serve" in lines[-1] and "--secure DIR" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_insecure_says_the_network_is_trusted(processes: ProcessGroup) -> None:
    proc, address = processes.start_coordinator("--host", "0.0.0.0", "--insecure")
    assert proc.poll() is None and address.startswith("0.0.0.0:")


def test_secure_and_insecure_together_are_a_mistake(cluster_keys: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dsgd.coordinator", "--secure", str(cluster_keys), "--insecure"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "contradict" in proc.stderr
