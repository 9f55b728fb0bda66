"""Making a cluster's credentials: ``dsgd keys init DIR`` and ``dsgd keys add DIR NAME``.

A cluster's key directory holds everything :class:`dsgd.security.Security` loads:

    ca.crt                  the cluster's certificate authority
    ca/ca.key               ... and its key, which only issues more members: keep it off
                            the machines that train (a subdirectory, so a Kubernetes
                            Secret made with --from-file=DIR leaves it out)
    member.crt, member.key  this member's TLS certificate (client and server) and key
    token                   the cluster token every control call carries
    curve-server.key        the shards' CURVE public key (clients check it)
    curve-server.key_secret ... and its secret (shards only)
    curve-member.key[_secret]  this member's CURVE key pair (the client side)
    admitted-NAME.key       a CURVE public key the shards admit, one file per member; a
                            file added later is admitted without a restart

``keys init`` makes a directory every process of a cluster can use. ``keys add`` makes a
directory for one more member with its own keys (no CA key, no shard secret) and admits
its CURVE key in the cluster directory: deleting that file turns the member away again.

Certificates name :data:`dsgd.security.TLS_NAME`, which dsgd's clients check whatever
address they dial, plus ``localhost``, the loopback addresses and every ``--host`` given
(for other tools, such as grpcurl, that check the address they dial).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import secrets
import shutil
from pathlib import Path

import zmq
import zmq.auth
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dsgd.errors import ConfigError
from dsgd.security import (
    ADMITTED,
    CA_CERT,
    CA_KEY,
    CURVE_MEMBER,
    CURVE_SERVER,
    MEMBER_CERT,
    MEMBER_KEY,
    TLS_NAME,
    TOKEN,
)

DEFAULT_DAYS = 365
Key = ec.EllipticCurvePrivateKey


def init(directory: Path, hosts: list[str], days: int = DEFAULT_DAYS) -> None:
    """Create a new cluster's credentials in ``directory`` (which must be new or empty)."""
    _require_empty(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsgd cluster CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / CA_KEY).parent.mkdir(mode=0o700)
    _write(directory / CA_KEY, _key_pem(ca_key), private=True)
    _write(directory / CA_CERT, ca.public_bytes(serialization.Encoding.PEM))
    _write(directory / TOKEN, secrets.token_hex(32).encode() + b"\n", private=True)
    zmq.auth.create_certificates(str(directory), CURVE_SERVER)
    _private(directory / f"{CURVE_SERVER}.key_secret")
    _member(directory, directory, hosts, days)
    shutil.copy2(directory / f"{CURVE_MEMBER}.key", directory / f"{ADMITTED}member.key")


def add(directory: Path, name: str, out: Path, hosts: list[str], days: int = DEFAULT_DAYS) -> None:
    """Make ``out``, a key directory for one more member called ``name``, and admit its
    CURVE key in the cluster's ``directory``."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"member name {name!r} may hold only letters, digits, - and _")
    if not (directory / CA_KEY).is_file():
        raise ConfigError(f"{directory} holds no {CA_KEY}; run `dsgd keys init {directory}` first")
    admitted = directory / f"{ADMITTED}{name}.key"
    if admitted.exists():
        raise ConfigError(f"a member called {name!r} exists already ({admitted})")
    _require_empty(out)
    for shared in (CA_CERT, TOKEN, f"{CURVE_SERVER}.key"):
        shutil.copy2(directory / shared, out / shared)
    _member(directory, out, hosts, days)
    shutil.copy2(out / f"{CURVE_MEMBER}.key", admitted)


def issue_certificate(
    directory: Path,
    common_name: str,
    hosts: list[str],
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[bytes, bytes]:
    """A certificate (PEM) and its key (PEM), signed by the CA in ``directory``, valid for
    client and server use between the two times."""
    ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    ca = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    if not isinstance(ca_key, Key):
        raise ConfigError(f"{directory / CA_KEY} is not an EC key made by dsgd keys init")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(TLS_NAME)]
    for host in ["localhost", "127.0.0.1", "::1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _member(ca_dir: Path, out: Path, hosts: list[str], days: int) -> None:
    """``out``'s member certificate and key, and its CURVE key pair."""
    now = _now()
    cert, key = issue_certificate(
        ca_dir,
        f"dsgd member {out.name}",
        hosts,
        not_before=now - datetime.timedelta(minutes=5),
        not_after=now + datetime.timedelta(days=days),
    )
    _write(out / MEMBER_CERT, cert)
    _write(out / MEMBER_KEY, key, private=True)
    zmq.auth.create_certificates(str(out), CURVE_MEMBER)
    _private(out / f"{CURVE_MEMBER}.key_secret")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _require_empty(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} is not empty; give a new directory for the keys")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        _private(path)


def _private(path: Path) -> None:
    path.chmod(0o600)


def main(argv: list[str]) -> int:
    """``dsgd keys init|add ...``"""
    parser = argparse.ArgumentParser(prog="dsgd keys", description="Make a cluster's credentials.")
    actions = parser.add_subparsers(dest="action", required=True)
    make = actions.add_parser("init", help="a new cluster's CA, certificates and keys in DIR")
    make.add_argument("dir", type=Path, help="a new (or empty) directory")
    more = actions.add_parser("add", help="a key directory for one more member")
    more.add_argument("dir", type=Path, help="the cluster's directory (made by keys init)")
    more.add_argument("name", help="the member's name (its CURVE key's file name)")
    more.add_argument("--out", type=Path, required=True, help="the new member's directory")
    for action in (make, more):
        action.add_argument(
            "--host",
            action="append",
            default=[],
            help="a DNS name or address the certificate also names (repeat for more)",
        )
        action.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    args = parser.parse_args(argv)
    if args.days < 1:
        raise ConfigError("--days must be at least 1")
    if args.action == "init":
        init(args.dir, args.host, args.days)
        print(f"made a cluster's keys in {args.dir}; start every process with --secure {args.dir}")  # noqa: T201
    else:
        add(args.dir, args.name, args.out, args.host, args.days)
        print(  # noqa: T201
            f"made {args.out} for member {args.name!r} and admitted its key in {args.dir}"
        )
    return 0
