"""Who may talk to a cluster: CURVE on the data plane, mutual TLS and a token on the control
plane, both from one key directory (``--secure DIR``, made by ``dsgd keys init``).

- **Data plane.** Shards' ZeroMQ sockets are CURVE servers and every client a CURVE client
  with a key pair of its own ("ironhouse"). CURVE alone encrypts but admits any key, so a
  shard also runs :class:`Admission`, a ZAP handler that admits only the public keys in
  the directory's ``admitted-*.key`` files, re-reading them whenever it changed, so a member
  admitted later joins without a restart, and one whose key file is deleted is turned
  away from its next connection on. Refusals, and
  clients that fail the handshake (plaintext ones, say), are counted and logged at a
  limited rate; what they sent never reaches the shard.
- **Control plane.** gRPC servers ask every client for a certificate from the cluster's CA
  and clients check the server's the same way, by the name :data:`TLS_NAME` every member
  certificate carries (so any address a member is reached by works). Every call but the
  health service's also carries the cluster token, compared in constant time.
- **Loopback stays easy.** Without ``--secure`` both planes run in the clear, which a
  process allows only on a loopback address unless ``--insecure`` says the network is
  trusted (:func:`check_listen`).

Nothing here knows models or shards: sockets, channels and files.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85

from dsgd.errors import ConfigError
from dsgd.stats import RateLimitedLog

log = logging.getLogger("dsgd.security")

TLS_NAME = "dsgd-cluster"  # the name every member certificate carries and clients check
# The key directory (made by dsgd.keys). Flat, so that a Kubernetes Secret made from it
# (`kubectl create secret generic --from-file=DIR`) mounts as the same directory; the CA's
# key lives in a subdirectory, which that command leaves out.
CA_CERT = "ca.crt"
CA_KEY = "ca/ca.key"
MEMBER_CERT = "member.crt"
MEMBER_KEY = "member.key"
TOKEN = "token"
CURVE_SERVER = "curve-server"  # .key (public), .key_secret (shards only)
CURVE_MEMBER = "curve-member"  # this member's CURVE key pair
ADMITTED = "admitted-"  # admitted-NAME.key: a CURVE public key the shards admit
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
HEALTH_SERVICE = "/grpc.health.v1.Health/"
# dsgd's clients check the server's certificate for the cluster's name, not the address
TLS_CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", TLS_NAME)]
RELOAD_INTERVAL = 0.5  # s: an unknown key re-reads admitted keys at most this often
# a peer that spoke but not CURVE with this server's key: a plaintext client, a wrong server
# key (a refusal by Admission is counted there; a peer that hangs up before speaking, like
# the local-twin probe of dsgd.sockets or a port scanner, is not counted)
_HANDSHAKE_FAILED = int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """``--secure DIR`` and ``--insecure``, for every process."""
    parser.add_argument(
        "--secure",
        type=Path,
        metavar="DIR",
        help="encrypt and authenticate both planes with the keys in DIR (dsgd keys init DIR)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback address (only on a network you trust)",
    )


def from_arguments(args: argparse.Namespace) -> Security | None:
    """The :class:`Security` that ``--secure`` names, or None for plaintext."""
    if getattr(args, "secure", None) is None:
        return None
    if getattr(args, "insecure", False):
        raise ConfigError("--secure and --insecure contradict each other; give one")
    return Security.load(args.secure)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, security: Security | None, insecure: bool, what: str) -> None:
    """Refuse to serve ``what`` in the clear on a non-loopback address unless ``insecure``."""
    if security is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve the {what} on {host} in the clear: give --secure DIR "
            "(make DIR with `dsgd keys init DIR`), or --insecure on a network you trust"
        )


@dataclass(frozen=True)
class Security:
    """A member's credentials, loaded from a key directory."""

    directory: Path
    ca: bytes
    cert: bytes
    key: bytes
    token: str
    server_public: bytes
    server_secret: bytes | None  # shards only
    member_public: bytes
    member_secret: bytes

    @classmethod
    def load(cls, directory: Path) -> Security:
        """Read ``directory``; a one-line ConfigError names what is missing or broken."""
        if not zmq.has("curve"):
            raise ConfigError(
                "this ZeroMQ build has no CURVE support, so --secure cannot be honoured; "
                "install a pyzmq wheel built with libsodium"
            )
        if not directory.is_dir():
            raise ConfigError(f"no key directory at {directory}; make one with `dsgd keys init`")

        def read(name: str) -> bytes:
            path = directory / name
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"{path} cannot be read ({exc.strerror}); {directory} must be a "
                    "directory made by `dsgd keys init` or `dsgd keys add`"
                ) from None

        def curve(name: str) -> tuple[bytes, bytes | None]:
            read(f"{name}.key")  # the one-line error when it is missing
            secret = directory / f"{name}.key_secret"
            try:
                return zmq.auth.load_certificate(
                    secret if secret.exists() else directory / f"{name}.key"
                )
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{directory / name}.key is not a CURVE key: {exc}") from None

        server_public, server_secret = curve(CURVE_SERVER)
        member_public, member_secret = curve(CURVE_MEMBER)
        if member_secret is None:
            raise ConfigError(f"{directory} holds no {CURVE_MEMBER}.key_secret")
        token = read(TOKEN).decode(errors="replace").strip()
        if len(token) < 16:
            raise ConfigError(f"{directory / TOKEN} is too short to be a cluster token")
        return cls(
            directory,
            ca=read(CA_CERT),
            cert=read(MEMBER_CERT),
            key=read(MEMBER_KEY),
            token=token,
            server_public=server_public,
            server_secret=server_secret,
            member_public=member_public,
            member_secret=member_secret,
        )

    # -- data plane ----------------------------------------------------------------------

    def curve_server(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (before it binds) a CURVE server that asks :class:`Admission`."""
        if self.server_secret is None:
            raise ConfigError(
                f"{self.directory} holds no {CURVE_SERVER}.key_secret, which a shard needs; "
                "give shards the directory `dsgd keys init` made"
            )
        sock.curve_server = True
        sock.curve_secretkey = self.server_secret
        sock.zap_domain = b"dsgd"

    def curve_client(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (before it connects) a CURVE client of the cluster's shards."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.member_public
        sock.curve_secretkey = self.member_secret

    # -- control plane -------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(self.ca, self.key, self.cert),
            grpc.access_token_call_credentials(self.token),
        )


@dataclass
class Admission:
    """A ZAP handler for one ZeroMQ context: admits CURVE clients whose public key is in one
    of ``directory``'s ``admitted-*.key`` files and nothing else. Start it before a CURVE
    server socket binds (without a handler ZeroMQ admits every key) and stop it after they
    close."""

    context: zmq.Context[Any]
    directory: Path
    refused: Counter[str] = field(default_factory=Counter)
    _keys: set[bytes] = field(default_factory=set)
    _loaded_at: float = -1e9
    _stamp: int = -1  # the directory's modification time when last read
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _log: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))

    def start(self) -> None:
        self._reload()
        sock: zmq.Socket[Any] = zmq.Socket(self.context, zmq.REP)
        sock.linger = 0
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close()
            raise ConfigError(f"cannot start the CURVE authenticator: {exc}") from None
        self._thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def admits(self, key: bytes) -> bool:
        """Whether the (z85) public ``key`` may connect now. The admitted keys are re-read
        when the directory changed (and, for a key not admitted, when they are older than
        ``RELOAD_INTERVAL``): a key added or removed counts from the next connection on;
        connections made before stay."""
        stale = time.monotonic() - self._loaded_at >= RELOAD_INTERVAL
        if self._stamp != _modified(self.directory) or (stale and key not in self._keys):
            self._reload()
        return key in self._keys

    def _reload(self) -> None:
        self._loaded_at = time.monotonic()
        self._stamp = _modified(self.directory)
        keys = set()
        try:
            files = sorted(self.directory.glob(f"{ADMITTED}*.key"))
        except OSError:
            files = []
        for path in files:
            try:
                keys.add(zmq.auth.load_certificate(path)[0])
            except (ValueError, OSError) as exc:
                self._log.warning("keyfile", f"ignored {path}, not a CURVE public key: {exc}")
        self._keys = keys

    def _serve(self, sock: zmq.Socket[Any]) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                request = sock.recv_multipart()
                sock.send_multipart(self._answer(request))
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:  # only libzmq talks on this endpoint; answer whatever it says
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400", b"bad", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        if mechanism == b"CURVE" and len(request) == 7:
            key = z85.encode(request[6])
            if self.admits(key):
                return [version, request_id, b"200", b"OK", key, b""]
            self.refused["unknown_key"] += 1
            peer = address.decode(errors="replace")
            self._log.warning("key", f"refused CURVE key {key.decode()} from {peer}")
            return [version, request_id, b"400", b"unknown key", b"", b""]
        self.refused["mechanism"] += 1
        self._log.warning("mechanism", f"refused a {mechanism.decode(errors='replace')} client")
        return [version, request_id, b"400", b"CURVE only", b"", b""]


def _modified(directory: Path) -> int:
    try:
        return directory.stat().st_mtime_ns
    except OSError:
        return -1


async def count_handshake_failures(
    sock: zmq.Socket[Any], refused: Counter[str], rate_log: RateLimitedLog, what: str
) -> None:
    """Count (as ``refused["handshake"]``) and log the peers that fail ``sock``'s CURVE
    handshake, until cancelled: plaintext clients, clients that expect another server key."""
    monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
    if not isinstance(monitor, zmq.asyncio.Socket):
        monitor.close()
        raise TypeError("count_handshake_failures needs a socket of an asyncio context")
    try:
        while True:
            frames = await monitor.recv_multipart()
            event, _value = struct.unpack("=Hi", frames[0][:6])
            if not event & _HANDSHAKE_FAILED:
                continue
            refused["handshake"] += 1
            peer = frames[1].decode(errors="replace") if len(frames) > 1 else "?"
            rate_log.warning("handshake", f"{what}: a peer at {peer} failed the CURVE handshake")
    finally:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(linger=0)


class RequireToken(grpc.aio.ServerInterceptor):
    """Refuses every call but the health service's that lacks the cluster token, with
    UNAUTHENTICATED, counted into ``refused`` and logged at a limited rate."""

    def __init__(self, token: str, refused: Counter[str] | dict[str, int]) -> None:
        self._expected = f"Bearer {token}".encode()
        self.refused = refused
        self._log = RateLimitedLog(log)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_SERVICE):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given, self._expected):
            return handler
        self.refused["token"] = self.refused.get("token", 0) + 1
        self._log.warning("token", f"refused a {details.method} call without the cluster token")
        return _refusing(handler)


def _refusing(handler: Any) -> Any:
    message = "the call lacks this cluster's token"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **options)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **options)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **options)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **options)
