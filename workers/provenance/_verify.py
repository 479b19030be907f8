"""What is known about a picture's origin: its C2PA manifest, its watermark, the store's job.

Used by ``musespark verify FILE`` and by ``/verify`` (a worker runs it on the picture a person
replied to or attached). The requester is named only when they opted in to credit
(``/settings credit on``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import PIL.Image

from core.errors import PromptError
from core.settings import Settings
from core.store import Job, Store
from workers.provenance import _watermark
from workers.provenance._c2pa import ManifestReport, read_manifest
from workers.provenance._trust import load_trust_anchors

__all__ = ["Verification", "verify_bytes"]

_STATE_WORDS = {
    "Trusted": "signed, intact, and trusted (the signer chains to this bot's certificate "
               "authority)",
    "Valid": "signed and intact, but by a signer this bot does not trust",
    "Invalid": "present but NOT valid (the picture or its manifest was altered after signing)",
}


@dataclass(slots=True)
class Verification:
    name: str
    manifest: ManifestReport
    watermark_job: str | None = None
    watermark_note: str = ""
    job: Job | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str | None:
        if self.manifest.found and self.manifest.state != "Invalid" and self.manifest.job_id:
            return self.manifest.job_id
        return self.watermark_job

    @property
    def found(self) -> bool:
        """Provenance found: a manifest that holds, or our watermark naming a known job."""
        return self.job_id is not None

    def text(self) -> str:
        return "\n".join(self.lines)


def _manifest_lines(report: ManifestReport) -> list[str]:
    if not report.found:
        return ["• C2PA manifest: none (chat apps that recompress pictures, such as Telegram "
                "photos, drop it; the original file keeps it)."]
    lines = [f"• C2PA manifest: {_STATE_WORDS.get(report.state, report.state)}."]
    if report.failures:
        lines.append(f"  Problems: {', '.join(report.failures)}.")
    made = [f"made by {report.generator or 'an unnamed generator'}"]
    if report.source_type and report.source_type.endswith("trainedAlgorithmicMedia"):
        made.append("with a trained AI model (trainedAlgorithmicMedia)")
    details = ", ".join(f"{k} {v}" for k, v in (("model", report.model), ("seed", report.seed),
                                                 ("job", report.job_id)) if v is not None)
    lines.append(f"  It says: {' '.join(made)}" + (f"; {details}" if details else "") + ".")
    if report.signer:
        lines.append(f"  Signed by: {report.signer}.")
    lines.append(f"  Creator: {report.creator}." if report.creator
                 else "  Creator: not named (the requester did not opt in to credit).")
    for ingredient in report.ingredients:
        lines.append(f"  Made from: {ingredient['title']} ({ingredient['relationship']}"
                     + (", with its own manifest" if ingredient["has_manifest"] else "") + ").")
    return lines


def _job_lines(store: Store, job: Job) -> list[str]:
    when = job.created_at.strftime("%Y-%m-%d %H:%M UTC")
    what = {"imagine": "a picture", "remix": "a remix of an uploaded picture",
            "refine": "a refinement of an earlier picture", "story": "a story"}.get(
        job.intent, f"a {job.kind} ({job.intent})")
    lines = [f"• This bot's records: job {job.id}, {what} asked for on {when}: "
             f"“{job.prompt[:200]}”; model {job.model or 'not yet known'}, seed {job.seed}, "
             f"{job.state}."]
    source = job.params.get("vary_from") or job.params.get("refine")
    if source:
        lines.append(f"  Drawn from job {source['job_id']}'s picture.")
    credit = store.credit_name(job.user_id)
    lines.append(f"  Requested by {credit} (they chose to be credited)." if credit else
                 "  The requester is not named: they did not opt in to credit.")
    return lines


def verify_bytes(data: bytes, name: str, *, settings: Settings, store: Store) -> Verification:
    """Everything known about the picture ``data`` (a file called ``name``).

    Raises:
        PromptError: ``data`` is not a picture.
    """
    try:
        with PIL.Image.open(io.BytesIO(data)) as probe:
            image = probe.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, ValueError, PIL.Image.DecompressionBombError):
        raise PromptError(f"“{name}” is not a picture I can read (PNG, JPEG or WebP), so I "
                          "can't check where it comes from.") from None
    result = Verification(name, read_manifest(data, load_trust_anchors(settings)))
    if _watermark.fits(image.width, image.height):
        result.watermark_job = _watermark.read_job_id(
            image, lambda job_id: store.get_job(job_id) is not None)
        result.watermark_note = (f"job {result.watermark_job}" if result.watermark_job else
                                 "none found (heavy editing or resizing can remove it)")
    else:
        result.watermark_note = (f"not checked: {image.width}x{image.height} px is below the "
                                 "256x256 px the watermark needs")
    job_id = result.job_id
    result.job = store.get_job(job_id) if job_id else None
    vouched = result.manifest.trusted or result.watermark_job is not None
    if result.found and vouched:
        result.lines.append(f"✅ Provenance of {name}: made by this MuseSpark, job {job_id}.")
    elif result.found:
        result.lines.append(f"⚠️ {name} carries signed provenance, but from a signer this bot "
                            f"does not trust; it names job {job_id}.")
    else:
        result.lines.append(f"❔ No MuseSpark provenance found in {name}.")
    result.lines += _manifest_lines(result.manifest)
    result.lines.append(f"• Invisible watermark: {result.watermark_note}.")
    if result.manifest.job_id and result.watermark_job and (
            result.manifest.job_id != result.watermark_job):
        result.lines.append("  ⚠️ The watermark and the manifest name different jobs.")
    if result.job is not None:
        result.lines += _job_lines(store, result.job)
    elif job_id:
        result.lines.append(f"• This bot's records: no job {job_id} (made by another "
                            "MuseSpark, or erased with /forget).")
    return result
