"""C2PA manifests with c2pa-python: signing a picture we made, and reading one back.

Both sides run offline: no timestamp authority (a TSA URL would make every signature a network
call), no OCSP, no remote manifests, and ``core.allowed_network_hosts`` empty, so c2pa never
opens a connection. Trust is anchored only in our roots (``trust.trust_anchors`` replaces c2pa's
built-in list): "trusted" means signed under the operator's CA, "valid" means intact and
well-signed by a chain we do not know.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import c2pa

from workers.provenance._trust import SigningMaterial

__all__ = ["CLAIM_GENERATOR", "DIGITAL_SOURCE_TYPE", "JOB_ASSERTION", "ManifestReport",
           "read_manifest", "sign_picture"]

CLAIM_GENERATOR = "MuseSpark"
CLAIM_GENERATOR_VERSION = "0.1.0"
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
#: Our own assertion: the job that made the picture, so a manifest leads back to the store.
JOB_ASSERTION = "org.musespark.job"
_OFFLINE: dict[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": []},
}


def _settings(anchors_pem: bytes) -> dict[str, Any]:
    settings: dict[str, Any] = json.loads(json.dumps(_OFFLINE))
    # An empty anchor list would leave c2pa's built-in roots in place; a dummy never matches.
    settings["trust"] = {"trust_anchors": anchors_pem.decode() if anchors_pem else None}
    return settings


@lru_cache(maxsize=4)
def _signing_context(material: SigningMaterial) -> c2pa.Context:
    """One context (settings and signer) per process and chain; builders reuse it."""
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
        c2pa.C2paSigningAlg.ES256, material.chain_pem, material.key_pem, None))
    settings = _settings(material.anchors_pem)
    settings["builder"] = {"thumbnail": {"enabled": False},
                           "claim_generator_info": {"name": CLAIM_GENERATOR,
                                                    "version": CLAIM_GENERATOR_VERSION}}
    return c2pa.Context.from_dict(settings, signer=signer)


def sign_picture(path: Path, material: SigningMaterial, *, job_id: str, model: str, seed: int,
                 creator: str | None = None, source: Path | None = None,
                 source_relation: str = "inputTo") -> None:
    """Embed a signed manifest into the PNG at ``path`` (replaced atomically).

    The manifest says: created by MuseSpark with a trained model (``c2pa.created``,
    ``trainedAlgorithmicMedia``), which model, seed and job; the requester as author only when
    ``creator`` is given (they opted in); ``source`` (a variation's, refinement's or remix's
    picture) as an ingredient, with its own manifest if it has one.

    Raises:
        c2pa.C2paError: the chain or key was refused by c2pa, or the file is not a PNG.
    """
    details = {"job_id": job_id, "model": model, "seed": seed}
    assertions: list[dict[str, Any]] = [
        {"label": "c2pa.actions.v2", "data": {"actions": [{
            "action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
            "softwareAgent": {"name": CLAIM_GENERATOR, "version": CLAIM_GENERATOR_VERSION},
            "parameters": details}]}},
        {"label": JOB_ASSERTION, "data": details},
    ]
    if creator:
        assertions.append({"label": "stds.schema-org.CreativeWork", "data": {
            "@context": "https://schema.org", "@type": "CreativeWork",
            "author": [{"@type": "Person", "name": creator}]}})
    builder = c2pa.Builder({"claim_generator_info": [{"name": CLAIM_GENERATOR,
                                                      "version": CLAIM_GENERATOR_VERSION}],
                            "title": path.name, "format": "image/png",
                            "assertions": assertions}, context=_signing_context(material))
    if source is not None:
        with source.open("rb") as ingredient:
            builder.add_ingredient({"title": source.name, "relationship": source_relation},
                                   _mime(source), ingredient)
    signed = io.BytesIO()
    with path.open("rb") as original:
        builder.sign("image/png", original, signed)
    tmp = path.with_name(f".{path.name}.signed")
    tmp.write_bytes(signed.getvalue())
    tmp.chmod(0o644)
    tmp.replace(path)


def _mime(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(12)
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


@dataclass(frozen=True, slots=True)
class ManifestReport:
    """What a picture's C2PA manifest says, and whether its signature holds."""

    found: bool
    #: c2pa's verdict: "Trusted" (signed under one of our roots), "Valid" (intact, signer
    #: unknown), "Invalid" (altered or badly signed); empty when nothing was found.
    state: str = ""
    failures: tuple[str, ...] = ()
    generator: str = ""
    signer: str = ""
    job_id: str | None = None
    model: str | None = None
    seed: int | None = None
    source_type: str | None = None
    creator: str | None = None
    ingredients: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    error: str | None = None

    @property
    def trusted(self) -> bool:
        return self.state == "Trusted"


def read_manifest(data: bytes, anchors_pem: bytes | None, mime: str | None = None) -> ManifestReport:
    """Read and validate the C2PA manifest in ``data`` with c2pa's own Reader, offline."""
    context = c2pa.Context.from_dict(_settings(anchors_pem or b""))
    try:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
    except c2pa.C2paError as exc:
        return ManifestReport(found=False, error=str(exc))
    if reader is None:
        return ManifestReport(found=False)
    with reader:
        manifest = reader.get_active_manifest() or {}
        state = reader.get_validation_state() or ""
        results = reader.get_validation_results() or {}
    failures = tuple(sorted({str(item.get("code")) for item in
                             (results.get("activeManifest") or {}).get("failure", [])}))
    report: dict[str, Any] = {}
    for assertion in manifest.get("assertions", []):
        label, content = assertion.get("label"), assertion.get("data") or {}
        if label == JOB_ASSERTION:
            report.update(job_id=content.get("job_id"), model=content.get("model"),
                          seed=content.get("seed"))
        elif str(label).startswith("c2pa.actions"):
            for action in content.get("actions", []):
                if action.get("action") == "c2pa.created":
                    report["source_type"] = str(action.get("digitalSourceType", ""))
        elif label == "stds.schema-org.CreativeWork":
            authors = [a.get("name") for a in content.get("author", []) if a.get("name")]
            report["creator"] = ", ".join(authors) or None
    generator = ", ".join(str(g.get("name")) for g in manifest.get("claim_generator_info", []))
    signature = manifest.get("signature_info") or {}
    ingredients = tuple({"title": i.get("title"), "relationship": i.get("relationship"),
                         "has_manifest": bool(i.get("active_manifest"))}
                        for i in manifest.get("ingredients", []))
    return ManifestReport(found=True, state=state, failures=failures, generator=generator,
                          signer=" / ".join(str(signature[k]) for k in ("common_name", "issuer")
                                            if signature.get(k)),
                          ingredients=ingredients, **report)
