"""A throwaway PKI for TLS tests and the reliability campaign (the `cryptography` package): a
CA, a server certificate for localhost / 127.0.0.1, a client certificate the CA signed, and a
client certificate from another CA that the server must refuse. EC P-256 keys: made in
milliseconds."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1")
VALID_FOR = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """PEM files in one directory."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAMES[0])]
        names.append(x509.IPAddress(ipaddress.ip_address(SERVER_NAMES[1])))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pem(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    """`<stem>.pem` and `<stem>.key` (PKCS#8, unencrypted, owner-only) in `directory`."""
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    """Write a CA, a server and a client certificate it signed, and a rogue client."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_ca_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca_cert = _issue("vae-test-ca", ca_key, None, ca=True)
    ca_path, _ = write_pem(directory, "ca", ca_cert, ca_key)
    ca = (ca_cert.subject, ca_key)
    rogue_ca = (_name("rogue-ca"), rogue_ca_key)
    keys = {stem: ec.generate_private_key(ec.SECP256R1()) for stem in ("server", "client", "rogue")}
    certs = {
        "server": _issue("vae-serve", keys["server"], ca, server=True),
        "client": _issue("vae-client", keys["client"], ca),
        "rogue": _issue("intruder", keys["rogue"], rogue_ca),
    }
    server, client, rogue = (write_pem(directory, s, certs[s], keys[s]) for s in certs)
    return Pki(ca_path, *server, *client, *rogue)
