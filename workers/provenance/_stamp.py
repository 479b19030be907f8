"""What a worker does to each picture it makes: watermark, then (after the PNG is written) sign.

The signing material is loaded once per process. ``check_signing`` runs when a worker starts,
so a missing or unreadable key stops the worker with a clear message instead of failing (or,
worse, skipping) the signature of the first picture.
"""

from __future__ import annotations

import logging
from pathlib import Path

import PIL.Image

from core.settings import Settings
from workers.provenance import _watermark
from workers.provenance._c2pa import _signing_context, read_manifest, sign_picture
from workers.provenance._trust import SigningMaterial, TrustError, load_signing

__all__ = ["check_signing", "signing_material", "stamp", "watermark"]

log = logging.getLogger(__name__)
_loaded: dict[tuple[str, str, str], SigningMaterial] = {}


def signing_material(settings: Settings) -> SigningMaterial:
    key = (str(settings.signing_cert), str(settings.signing_key), str(settings.trust_dir))
    if key not in _loaded:
        _loaded[key] = load_signing(settings)
    return _loaded[key]


def check_signing(settings: Settings) -> SigningMaterial:
    """Load the chain and key and sign a small test picture with them, as c2pa would.

    Raises:
        TrustError: the files are missing, unreadable or mismatched, or c2pa refuses the chain
            (a self-signed signing certificate, a CA certificate used to sign, ...).
    """
    material = signing_material(settings)
    probe = settings.trust_dir / ".probe.png"
    probe.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (16, 16)).save(probe, format="PNG")
    try:
        sign_picture(probe, material, job_id="000000000000", model="probe", seed=0)
        report = read_manifest(probe.read_bytes(), material.anchors_pem)
    except Exception as exc:  # c2pa says why in its message
        raise TrustError(f"c2pa refused the signing chain from {material.source}: {exc}. "
                         "It needs a signing certificate issued by a CA (not self-signed) "
                         "with its intermediates, and the matching key.") from None
    finally:
        probe.unlink(missing_ok=True)
    if report.state == "Invalid":
        raise TrustError(f"A test picture signed with {material.source} does not validate: "
                         f"{', '.join(report.failures)}.")
    log.info("pictures are signed with the %s (test signature: %s)", material.source,
             report.state)
    # The context holds native c2pa state; a prefork pool's children make their own.
    _signing_context.cache_clear()
    return material


def watermark(image: PIL.Image.Image, job_id: str) -> tuple[PIL.Image.Image, str]:
    """``image`` with the job id watermarked in, and what the recipe says about it."""
    if not _watermark.fits(image.width, image.height):
        return image, _watermark.why_not(image.width, image.height)
    return (_watermark.embed(image, job_id),
            f"{_watermark.METHOD} watermark with the job id ({_watermark.PAYLOAD_BITS} bits)")


def stamp(path: Path, settings: Settings, *, job_id: str, model: str, seed: int,
          creator: str | None, source: Path | None) -> None:
    """Sign the PNG at ``path`` in place (C2PA manifest, see :func:`sign_picture`)."""
    sign_picture(path, signing_material(settings), job_id=job_id, model=model, seed=seed,
                 creator=creator, source=source)
