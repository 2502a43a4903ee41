"""The orchestrator's own CA, and a TLS context per intercepted host.

Minted with ``cryptography`` (a well-kept library; no hand-written X.509): an EC P-256
CA, kept as ``<data_dir>/gateway/ca.pem`` and ``ca-key.pem`` (0600), valid ten years,
``pathlen = 0`` (it signs leaves only); a leaf per host, signed on first use and cached
(an ``ssl.SSLContext`` per host, valid 30 days, re-minted at each start). Agents trust
the CA through ``ca-bundle.pem``: the system's bundle plus our certificate, a public
file (0644) mounted or pointed at by ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE`` /
``NODE_EXTRA_CA_CERTS``. The key never leaves the host.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                  "/etc/ssl/cert.pem")
CA_NAME = "orchestrator egress gateway CA"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        os.fchmod(fd, mode)
        with open(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def mint_ca(common_name: str = CA_NAME) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def mint_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str,
              days: int = 30) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def system_bundle() -> bytes:
    for path in SYSTEM_BUNDLES:
        try:
            return Path(path).read_bytes()
        except OSError:
            continue
    return b""


class Authority:
    """The CA of one data dir: loaded, or minted on first use; leaf contexts cached."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = folder / "ca-key.pem", folder / "ca.pem"
        if key_path.exists() and cert_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            self.key = loaded
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            self.key, self.cert = mint_ca()
            _write(key_path, pem_key(self.key), 0o600)
            _write(cert_path, pem_cert(self.cert), 0o644)
        self.bundle = folder / "ca-bundle.pem"
        _write(self.bundle, system_bundle().rstrip(b"\n") + b"\n" + pem_cert(self.cert), 0o644)
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for ``host`` signed by our CA."""
        ctx = self._contexts.get(host)
        if ctx is not None:
            return ctx
        key, cert = mint_leaf(self.key, self.cert, host)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        with tempfile.TemporaryDirectory() as tmp:  # ssl loads chains from files only
            chain, keyfile = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
            chain.write_bytes(pem_cert(cert) + pem_cert(self.cert))
            keyfile.write_bytes(pem_key(key))
            keyfile.chmod(0o600)
            ctx.load_cert_chain(chain, keyfile)
        self._contexts[host] = ctx
        return ctx
