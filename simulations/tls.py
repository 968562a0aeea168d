"""A throwaway PKI for trying a TLS + SuperNode-authenticated deployment on 127.0.0.1.

Flower secures a deployment with its own mechanisms: the SuperLink serves TLS
(``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``) and, with ``--enable-supernode-auth``,
admits only SuperNodes whose public key was registered (``flwr supernode register KEY.pub
CONNECTION``); each SuperNode trusts the CA (``--root-certificates``) and signs with its EC key
(``--auth-supernode-private-key``). This module makes the files for a local trial and the tests;
a real fleet uses its organisation's CA and keys generated on each device.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoopbackPKI:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[tuple[Path, Path], ...]  # (private key, public key) per SuperNode, OpenSSH format


def make_loopback_pki(folder: str | Path, nodes: int, valid_days: int = 1) -> LoopbackPKI:
    """A CA, a server certificate for 127.0.0.1 / localhost, and ``nodes`` EC (P-384) key pairs."""
    from cryptography.hazmat.primitives import serialization

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca, cert, key = _ca_and_server_certificate(valid_days)
    paths = LoopbackPKI(
        folder / "ca.crt",
        folder / "server.pem",
        folder / "server.key",
        tuple((folder / f"supernode-{i}", folder / f"supernode-{i}.pub") for i in range(nodes)),
    )
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    paths.server_key.chmod(0o600)
    for private, public in paths.node_keys:
        _write_node_key(private, public)
    return paths


def _ca_and_server_certificate(valid_days: int):
    """A self-signed CA and a server certificate it signs for 127.0.0.1 / localhost; returns (CA
    certificate, server certificate, server key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)

    def name(common_name: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("mobiflower loopback CA"))
        .issuer_name(name("mobiflower loopback CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca, cert, key


def _write_node_key(private: Path, public: Path) -> None:
    """One SuperNode's EC (P-384) key pair, in OpenSSH format (the private key readable by its owner only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    node_key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(
        node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
