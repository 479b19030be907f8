"""Pictures people upload for ``/remix``: checked, then kept under the data dir.

Adapters fetch the bytes (a Telegram photo or image document, a Discord attachment, a local
file) and hand them to :func:`keep_upload`, which refuses anything that is not a picture we can
draw from, with words the person understands. The kept file is the job's input artifact, so
``/forget uploads`` can erase it with the rest of the person's uploads.
"""

from __future__ import annotations

import io
import secrets
from pathlib import Path

import PIL.Image

from core.errors import PromptError

__all__ = ["UPLOADS_FOLDER", "UPLOAD_MAX_BYTES", "UPLOAD_MAX_PIXELS", "keep_upload"]

#: Largest upload accepted (Telegram's photo limit; Discord's default attachment limit).
UPLOAD_MAX_BYTES = 10 * 1000 * 1000
#: Larger pictures are refused before decoding (decompression bombs).
UPLOAD_MAX_PIXELS = 40_000_000
UPLOADS_FOLDER = "uploads"
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif"}


def keep_upload(data: bytes, data_dir: Path, *, name: str = "upload",
                intact: bool = False) -> Path:
    """Check ``data`` is a picture and store it as PNG under ``data_dir/uploads``.

    ``intact`` keeps the bytes as they came (for ``/verify``: re-encoding would drop the
    picture's C2PA manifest), under the picture format's usual extension.

    Raises:
        PromptError: empty, over :data:`UPLOAD_MAX_BYTES`, not a picture, or corrupt.
    """
    if not data:
        raise PromptError("That file is empty. Attach a picture (PNG, JPEG or WebP).")
    if len(data) > UPLOAD_MAX_BYTES:
        raise PromptError(f"That file is {len(data) / 1e6:.1f} MB; I take pictures up to "
                          f"{UPLOAD_MAX_BYTES / 1e6:.0f} MB. Send a smaller one.")
    try:
        with PIL.Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # checks the structure without decoding every pixel
        with PIL.Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > UPLOAD_MAX_PIXELS:
                raise PromptError("That picture has too many pixels for me to work with; send "
                                  "a smaller one.")
            kind = (image.format or "png").lower()
            picture = image.convert("RGB")
    except PromptError:
        raise
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError,
            PIL.Image.DecompressionBombError):
        raise PromptError(f"I can't read “{name}” as a picture (it may be another kind of "
                          "file, or damaged). Send a PNG, JPEG or WebP picture.") from None
    folder = Path(data_dir) / UPLOADS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if intact:
        path = folder / f"{secrets.token_hex(8)}.{_EXTENSIONS.get(kind, 'img')}"
        path.write_bytes(data)
        return path
    path = folder / f"{secrets.token_hex(8)}.png"
    picture.save(path, format="PNG")
    return path
