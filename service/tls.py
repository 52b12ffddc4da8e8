"""The server's TLS credentials (`server_credentials`), checked before gRPC sees them.

gRPC only fails to bind the port on an unusable key or certificate, so the PEM files are loaded
with `ssl` first, to refuse them with the reason. And gRPC loads an expired (or not yet valid)
certificate without complaint, and then every TLS client fails its handshake while the
plaintext health port says SERVING: the server refuses such a certificate at start instead.
`ssl` turns PEM into DER (`PEM_cert_to_DER_cert`) but exposes no public parser for a
certificate file, so the two dates are read from the DER here: a few lines of ASN.1 (RFC 5280,
4.1: Certificate -> tbsCertificate -> validity), no extra dependency.
"""

from __future__ import annotations

import datetime
import logging
import re
import ssl
from pathlib import Path

import grpc

from service.lifecycle import StartupError
from service.settings import Settings

log = logging.getLogger("service.server")  # the start-up's logger, like the rest of it

PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
UTC_TIME, GENERALIZED_TIME = 0x17, 0x18


class CertificateError(ValueError):
    """A certificate file that cannot be read, or is outside its validity period."""


def _element(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at `pos`."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(der[pos : pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise CertificateError("truncated DER")
    return tag, pos, pos + length


def _time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii")
    if tag == UTC_TIME:  # YYMMDDHHMMSSZ; years 50-99 are 19xx (RFC 5280, 4.1.2.5.1)
        year = int(text[:2])
        text = f"{19 if year >= 50 else 20}{text}"
    elif tag != GENERALIZED_TIME:
        raise CertificateError(f"unexpected time tag 0x{tag:02x}")
    moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return moment.replace(tzinfo=datetime.UTC)


def validity(der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter) of one DER certificate."""
    try:
        _, cert, _ = _element(der, 0)  # Certificate
        _, tbs, _ = _element(der, cert)  # tbsCertificate
        pos = tbs
        tag, _, end = _element(der, pos)
        if tag == 0xA0:  # [0] version, optional
            pos = end
        for _ in range(3):  # serialNumber, signature, issuer
            pos = _element(der, pos)[2]
        _, pos, _ = _element(der, pos)  # validity
        before_tag, start, end = _element(der, pos)
        not_before = _time(before_tag, der[start:end])
        after_tag, start, end = _element(der, end)
        return not_before, _time(after_tag, der[start:end])
    except (IndexError, ValueError) as e:
        raise CertificateError(f"not an X.509 certificate ({e})") from None


def check_validity(path: Path, now: datetime.datetime | None = None) -> None:
    """Raise CertificateError if any certificate in the PEM file `path` is expired or not yet
    valid, naming which and when."""
    now = now if now is not None else datetime.datetime.now(datetime.UTC)
    blocks = PEM_CERT.findall(path.read_bytes())
    if not blocks:
        raise CertificateError(f"{path}: no PEM certificate in it")
    for i, block in enumerate(blocks):
        which = f"{path}" + (f" (certificate {i + 1} of the chain)" if len(blocks) > 1 else "")
        try:
            der = ssl.PEM_cert_to_DER_cert(block.decode("ascii"))
        except ValueError as e:
            raise CertificateError(f"{which}: not a PEM certificate ({e})") from None
        not_before, not_after = validity(der)
        if now > not_after:
            raise CertificateError(f"{which}: expired on {not_after:%Y-%m-%d %H:%M:%S} UTC")
        if now < not_before:
            raise CertificateError(f"{which}: not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS when a client CA is set), or
    None for plaintext, which is for local development only (a warning is logged)."""
    if settings.tls_cert is None or settings.tls_key is None:
        log.warning(
            "serving PLAINTEXT gRPC (no TLS): for local development only; set VAE_TLS_CERT and "
            "VAE_TLS_KEY (and VAE_TLS_CLIENT_CA for mutual TLS) in production"
        )
        return None
    paths = [settings.tls_cert, settings.tls_key, settings.tls_client_ca]
    try:
        cert, key, client_ca = (p.read_bytes() if p is not None else None for p in paths)
    except OSError as e:
        raise StartupError(f"cannot read a TLS file: {e}") from e
    assert cert is not None and key is not None
    _check_pem(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    try:
        check_validity(settings.tls_cert)
    except CertificateError as e:
        raise StartupError(f"TLS certificate {e}") from None
    log.info(
        "serving TLS with %s%s",
        settings.tls_cert,
        f"; mutual TLS: client certificates must be signed by {settings.tls_client_ca}"
        if client_ca is not None
        else "",
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_pem(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Refuse unusable TLS files with the reason (gRPC itself only fails to bind the port)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise StartupError(f"{cert} and {key}: not a PEM certificate and its key ({e})") from e
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as e:
            raise StartupError(f"{client_ca}: not a PEM CA bundle ({e})") from e
