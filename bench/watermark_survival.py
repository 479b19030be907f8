"""How often the invisible watermark's job id survives what chat apps do to pictures.

For each picture side the models render (the tiny demo pipeline's own 64 px, which is too small
to carry a watermark, and 256 / 512 / 768 / 1024 px, the sides of SD-Turbo, SD-1.5, SD-2 and
SDXL), it takes ``--pictures`` pictures, watermarks each with a random job id, applies each
transformation, and reads the id back the way ``musespark verify`` does (the picture as it is,
then scaled back to each side the models render; an id counts only when it is one of the jobs,
as the store would confirm). The library's default strength and ours are measured side by side
on the same pictures.

Pictures: the offline demo pipeline renders the 64 and 256 px ones (its untrained UNet makes
noise, and its full-resolution attention makes larger sides impractical on a CPU); no real
model's weights are available offline, so 512 px and up are synthetic paintings (smooth colour
fields, shapes, soft edges and fine grain), seeded, which stand in for a real model's output.

Transformations: ``png`` (none: Discord keeps files intact), ``tg-jpegQ`` (Telegram-like:
shrink to at most 1280 px, JPEG quality Q), ``half`` (a 50% resize, PNG) and ``half+jpeg80``.

    .venv/bin/python bench/watermark_survival.py --pictures 8
"""

from __future__ import annotations

import argparse
import io
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import PIL.ImageFilter  # noqa: E402

from workers.pipelines.image_diffusion import get_image_generator  # noqa: E402
from workers.provenance import _watermark  # noqa: E402

TELEGRAM_MAX_SIDE = 1280
SIDES = (64, 256, 512, 768, 1024)
STRENGTHS = {"default (0,36)": (0, 36), "ours (0,72)": _watermark.SCALES}


def _jpeg(image: PIL.Image.Image, quality: int) -> PIL.Image.Image:
    if max(image.size) > TELEGRAM_MAX_SIDE:
        scale = TELEGRAM_MAX_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             PIL.Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return PIL.Image.open(io.BytesIO(out.getvalue())).convert("RGB")


#: The largest side the demo pipeline renders here; larger pictures are synthetic.
DEMO_MAX_SIDE = 256


def _synthetic(side: int, seed: int) -> PIL.Image.Image:
    """A painting-like picture: smooth colour fields, a few shapes, soft edges, fine grain."""
    rng = random.Random(seed)
    field = PIL.Image.new("RGB", (6, 6))
    field.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(36)])
    image = field.resize((side, side), PIL.Image.Resampling.BICUBIC)
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(side), rng.randrange(side)
        r = rng.randrange(side // 20, side // 4)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r),
                                                                 fill=colour)
    image = image.filter(PIL.ImageFilter.GaussianBlur(side / 256))
    grain = PIL.Image.effect_noise((side, side), 12).convert("RGB")
    return PIL.Image.blend(image, grain, 0.08)


def _pictures(generator: Any, side: int, count: int) -> list[PIL.Image.Image]:
    if side <= DEMO_MAX_SIDE:
        return list(generator.generate("a lighthouse at dusk", n=count, seed=side, steps=1,
                                       width=side, height=side).images)
    return [_synthetic(side, seed) for seed in range(count)]


def _half(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.resize((image.width // 2, image.height // 2), PIL.Image.Resampling.LANCZOS)


TRANSFORMS: dict[str, Callable[[PIL.Image.Image], PIL.Image.Image]] = {
    "png": lambda image: image,
    "tg-jpeg90": lambda image: _jpeg(image, 90),
    "tg-jpeg80": lambda image: _jpeg(image, 80),
    "tg-jpeg70": lambda image: _jpeg(image, 70),
    "half": _half,
    "half+jpeg80": lambda image: _jpeg(_half(image), 80),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictures", type=int, default=8, help="pictures per side")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where the demo pipeline is built (default: a temporary folder)")
    args = parser.parse_args()
    models = args.models_dir or Path(os.environ.get("MUSESPARK_TEST_MODEL_CACHE")
                                     or tempfile.mkdtemp())
    generator = get_image_generator(None, models, "cpu")
    print(f"{args.pictures} pictures per side; recovery = the job id read back exactly\n")
    header = f"{'side':>5} {'pictures, strength':<25}" + "".join(f"{t:>12}" for t in TRANSFORMS)
    print(header + f"{'embed s':>9}{'read s':>8}")
    print("-" * len(header + " " * 17))
    for side in SIDES:
        pictures = _pictures(generator, side, args.pictures)
        if not _watermark.fits(side, side):
            print(f"{side:>5} {'demo':<25} {_watermark.why_not(side, side)}")
            continue
        for label, scales in STRENGTHS.items():
            ids = [secrets.token_hex(6) for _ in pictures]
            known = set(ids).__contains__
            started = time.perf_counter()
            marked = [_watermark.embed(p, i, scales=scales) for p, i in zip(pictures, ids)]
            embed_seconds = (time.perf_counter() - started) / len(marked)
            cells, read_seconds, reads = [], 0.0, 0
            for transform in TRANSFORMS.values():
                found = 0
                for picture, job_id in zip(marked, ids):
                    started = time.perf_counter()
                    found += _watermark.read_job_id(transform(picture), known,
                                                    scales=scales) == job_id
                    read_seconds += time.perf_counter() - started
                    reads += 1
                cells.append(f"{found}/{len(ids)}")
            content = "demo" if side <= DEMO_MAX_SIDE else "synthetic"
            print(f"{side:>5} {content + ' ' + label:<25}" + "".join(f"{c:>12}" for c in cells)
                  + f"{embed_seconds:>9.2f}{read_seconds / reads:>8.2f}")


def signing_cost(pictures: int) -> None:
    """What signing adds to saving a picture: PNG save alone versus save and sign, side by side."""
    from core.settings import Settings
    from workers.pipelines.image_diffusion import save_png
    from workers.provenance import create_local_chain, load_signing, sign_picture

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(_env_file=None, data_dir=Path(folder))  # type: ignore[call-arg]
        create_local_chain(settings.trust_dir)
        material = load_signing(settings)
        print(f"\nC2PA signing, {pictures} pictures per side (ms per picture):")
        print(f"{'side':>5}{'save PNG':>10}{'sign':>8}{'ratio':>8}")
        for side in (512, 1024):
            saved = signed = 0.0
            for seed in range(pictures):
                path = Path(folder) / f"{side}-{seed}.png"
                picture = _synthetic(side, seed)
                started = time.perf_counter()
                save_png(picture, path, {"job_id": "0" * 12})
                saved += time.perf_counter() - started
                started = time.perf_counter()
                sign_picture(path, material, job_id="0" * 12, model="bench", seed=seed)
                signed += time.perf_counter() - started
            print(f"{side:>5}{saved / pictures * 1000:>10.1f}{signed / pictures * 1000:>8.1f}"
                  f"{signed / saved:>8.2f}")


if __name__ == "__main__":
    main()
    signing_cost(8)
