"""Provenance of the pictures MuseSpark makes: signed C2PA manifests, an invisible watermark
with the job id, and verification (``musespark verify``, ``/verify``).

A worker signs every picture before anything is posted; a picture that cannot be signed is a
failed job, never an unsigned result. See README "Provenance and privacy".
"""

from __future__ import annotations

from workers.provenance._c2pa import ManifestReport, read_manifest, sign_picture
from workers.provenance._stamp import check_signing, signing_material, stamp, watermark
from workers.provenance._trust import (
    SigningMaterial,
    TrustError,
    create_local_chain,
    load_signing,
    load_trust_anchors,
)
from workers.provenance._verify import Verification, verify_bytes

__all__ = [
    "ManifestReport",
    "SigningMaterial",
    "TrustError",
    "Verification",
    "check_signing",
    "create_local_chain",
    "load_signing",
    "load_trust_anchors",
    "read_manifest",
    "sign_picture",
    "signing_material",
    "stamp",
    "verify_bytes",
    "watermark",
]
