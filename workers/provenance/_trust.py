"""Signing keys for C2PA manifests: a local certificate chain made offline, or the operator's.

c2pa accepts a manifest's signature only from an end-entity certificate that chains to a
certificate authority: a self-signed signing certificate is rejected. ``musespark trust init``
therefore makes three certificates with ``cryptography`` (no network, no external tool):

* a root CA (``trust-anchors.pem``; the verifier trusts pictures whose chain ends there),
* an intermediate CA, and
* the signing certificate (``signing-chain.pem`` holds it and the intermediate; its key is
  ``signing.key``).

The CAs' private keys are never written: nothing can issue another certificate under this root,
and a lost signing key is replaced by a fresh ``trust init --force`` (which keeps the old root
among the trust anchors, so earlier pictures still verify as trusted). Keys are written 0600
and never logged. An operator with their own chain sets ``MUSESPARK_SIGNING_CERT`` and
``MUSESPARK_SIGNING_KEY`` (and ``MUSESPARK_SIGNING_TRUST_ANCHORS`` for its root).
"""

from __future__ import annotations

import datetime
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.errors import MuseSparkError
from core.settings import Settings

__all__ = ["SigningMaterial", "TrustError", "create_local_chain", "load_signing",
           "load_trust_anchors"]

ANCHORS_FILE = "trust-anchors.pem"
CHAIN_FILE = "signing-chain.pem"
KEY_FILE = "signing.key"
#: The local root and intermediate live long; the signing certificate is renewed by re-running
#: ``trust init --force``. Pictures signed while it was valid stay valid afterwards.
CA_VALID_DAYS = 20 * 365
SIGNER_VALID_DAYS = 5 * 365
ORGANIZATION = "MuseSpark"


class TrustError(MuseSparkError):
    """The signing chain or key cannot be used; the message says which file and what to do."""

    user_message = ("I made the picture but could not sign it, so I am not posting it unsigned. "
                    "The operator must fix the signing key (the worker log says what is wrong).")


@dataclass(frozen=True, slots=True)
class SigningMaterial:
    """What signs: the PEM chain (signing certificate first), its key, and the roots we trust."""

    chain_pem: bytes
    key_pem: bytes
    anchors_pem: bytes
    source: str  # where it came from, for messages (never the key itself)

    def __repr__(self) -> str:  # the key must not reach a log through a repr
        return f"SigningMaterial(source={self.source!r})"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, path_length: int | None,
                 days: int) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                   crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if issuer_key is not key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if not ca:
        # c2pa's default trust configuration accepts these purposes for claim signers.
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600 from the first byte)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def create_local_chain(folder: Path, *, force: bool = False) -> Path:
    """Make a root CA, an intermediate and a signing certificate under ``folder``, offline.

    Returns the folder. Without ``force`` an existing signing key is kept (nothing is written);
    with it, a new chain replaces the old and the old root stays a trust anchor.
    """
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers starting together make one chain
        if (folder / KEY_FILE).exists() and not force:
            return folder
        root_key, middle_key, signer_key = (ec.generate_private_key(ec.SECP256R1())
                                            for _ in range(3))
        root_name = "MuseSpark local root CA"
        middle_name = "MuseSpark local intermediate CA"
        root = _certificate(root_name, root_key, root_name, root_key, ca=True, path_length=1,
                            days=CA_VALID_DAYS)
        middle = _certificate(middle_name, middle_key, root_name, root_key, ca=True,
                              path_length=0, days=CA_VALID_DAYS)
        signer = _certificate("MuseSpark picture signer", signer_key, middle_name, middle_key,
                              ca=False, path_length=None, days=SIGNER_VALID_DAYS)
        anchors = folder / ANCHORS_FILE
        earlier = anchors.read_bytes() if anchors.exists() else b""
        anchors.write_bytes(_pem(root) + earlier)
        (folder / CHAIN_FILE).write_bytes(_pem(signer) + _pem(middle))
        _write_private(folder / KEY_FILE, signer_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return folder


def _read(path: Path, what: str, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TrustError(f"The {what} {path} does not exist. Set {setting} to a readable PEM "
                         "file, or unset it and run `musespark trust init`.") from None
    except OSError as exc:
        raise TrustError(f"The {what} {path} cannot be read ({exc.strerror}). Make it readable "
                         f"by the worker's user, or point {setting} elsewhere.") from None
    if b"-----BEGIN" not in data:
        raise TrustError(f"The {what} {path} is not a PEM file.")
    return data


def load_trust_anchors(settings: Settings) -> bytes | None:
    """The PEM roots a verifier trusts, or None when there are none yet."""
    path = settings.signing_trust_anchors or settings.trust_dir / ANCHORS_FILE
    if settings.signing_trust_anchors is None and not path.exists():
        return None
    return _read(path, "trust anchor file", "MUSESPARK_SIGNING_TRUST_ANCHORS")


def load_signing(settings: Settings, *, create: bool = True) -> SigningMaterial:
    """The chain and key that sign pictures, checked: they parse and belong together.

    Without ``MUSESPARK_SIGNING_CERT``/``MUSESPARK_SIGNING_KEY`` the local chain under
    ``DATA_DIR/trust`` is used, made first when the folder has none and ``create`` is set.

    Raises:
        TrustError: a file is missing, unreadable or not PEM, the key does not match the
            certificate, or only one of the two settings is set.
    """
    cert_path, key_path = settings.signing_cert, settings.signing_key
    if (cert_path is None) != (key_path is None):
        raise TrustError("Set both MUSESPARK_SIGNING_CERT and MUSESPARK_SIGNING_KEY (a chain "
                         "and its private key), or neither to use the local chain.")
    if cert_path is None or key_path is None:
        folder = settings.trust_dir
        if create and not (folder / KEY_FILE).exists() and not (folder / CHAIN_FILE).exists():
            create_local_chain(folder)
        cert_path, key_path = folder / CHAIN_FILE, folder / KEY_FILE
        source = f"local chain in {folder}"
        setting_cert = setting_key = "`musespark trust init --force`"
    else:
        source = f"MUSESPARK_SIGNING_CERT={cert_path}"
        setting_cert, setting_key = "MUSESPARK_SIGNING_CERT", "MUSESPARK_SIGNING_KEY"
    chain_pem = _read(Path(cert_path), "signing certificate chain", setting_cert)
    key_pem = _read(Path(key_path), "signing key", setting_key)
    try:
        certificates = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise TrustError(f"The signing certificate chain {cert_path} holds no readable "
                         "certificate.") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TrustError(f"The signing key {key_path} is not an unencrypted PEM private "
                         "key.") from None
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    if certificates[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != public:
        raise TrustError(f"The signing key {key_path} does not belong to the first certificate "
                         f"in {cert_path}.")
    anchors = load_trust_anchors(settings) or b""
    return SigningMaterial(chain_pem, key_pem, anchors, source)
