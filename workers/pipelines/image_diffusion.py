"""Text-to-image with a diffusers pipeline (the ``/imagine`` command).

``MUSESPARK_IMAGE_MODEL`` may be:

* unset: MuseSpark's tiny untrained demo pipeline (built offline on first use under the model
  cache, see :mod:`workers.pipelines.tiny_diffusion`). Its pictures are noise; every result
  made with it says so.
* a local folder holding a diffusers pipeline (``model_index.json``), or
* a Hugging Face hub id such as ``stabilityai/sd-turbo``, ``runwayml/stable-diffusion-v1-5`` or
  ``stabilityai/stable-diffusion-xl-base-1.0`` (needs network or a warm hub cache).

The family decides the usual steps, guidance and size (SD-Turbo: 1 step, no guidance, 512 px;
SD-1.5: 25 steps, 7.5, 512 px; SDXL: 30 steps, 5.0, 1024 px). Every loading failure becomes
:class:`~core.errors.ModelUnavailableError` naming the setting and the value.

Limits:
    * Sizes are rounded to multiples of 8 pixels (the VAE works on 8x8 blocks).
    * fp16 on CUDA, fp32 elsewhere; one pipeline per process, calls serialised by a lock.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from core.errors import ModelUnavailableError
from workers.pipelines.tiny_diffusion import DEMO_SIZE, build_tiny_pipeline, is_demo_pipeline

__all__ = [
    "DiffusionGenerator",
    "ImageResult",
    "RECIPE_CHUNK",
    "get_image_generator",
    "load_image_generator",
    "read_png_recipe",
    "save_png",
]

#: PNG text chunk holding the job's recipe as JSON.
RECIPE_CHUNK = "musespark"
_SETTING = "MUSESPARK_IMAGE_MODEL"
_USER_MESSAGE = ("The picture model is not available right now, so I cannot draw this. "
                 "The bot's operator has been told.")
_DEMO_NAME = "tiny-demo"
PIXEL_MULTIPLE = 8

#: family -> (steps, guidance, side in pixels)
FAMILY_DEFAULTS: dict[str, tuple[int, float, int]] = {
    "sd15": (25, 7.5, 512),
    "sd-turbo": (1, 0.0, 512),
    "sdxl": (30, 5.0, 1024),
    "sdxl-turbo": (1, 0.0, 512),
    "demo": (2, 1.0, DEMO_SIZE),
    "other": (25, 7.5, 512),
}


@dataclass(frozen=True, slots=True)
class ImageResult:
    images: list[Image.Image]
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    model_name: str
    is_demo: bool
    seconds: float


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _family(source: str, index: dict[str, Any], demo: bool) -> str:
    if demo:
        return "demo"
    name = source.lower()
    turbo = "turbo" in name
    if "XL" in str(index.get("_class_name", "")):
        return "sdxl-turbo" if turbo else "sdxl"
    if str(index.get("_class_name", "")).startswith("StableDiffusion") or "stable-diffusion" in name:
        return "sd-turbo" if turbo else "sd15"
    return "sd-turbo" if turbo else "other"


def _round8(value: int) -> int:
    return max(PIXEL_MULTIPLE, int(round(value / PIXEL_MULTIPLE)) * PIXEL_MULTIPLE)


class DiffusionGenerator:
    """A loaded pipeline. Keep it: loading is the slow part."""

    def __init__(self, pipe: Any, *, model_name: str, family: str, is_demo: bool,
                 device: str) -> None:
        self.pipe, self.model_name, self.family, self.is_demo = pipe, model_name, family, is_demo
        self.device = device
        steps, guidance, side = FAMILY_DEFAULTS[family]
        self.default_steps, self.default_guidance, self.default_size = steps, guidance, side
        self._lock = threading.Lock()

    def generate(self, prompt: str, *, n: int, seed: int, negative_prompt: str | None = None,
                 steps: int | None = None, guidance: float | None = None,
                 width: int | None = None, height: int | None = None) -> ImageResult:
        steps = steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        width = _round8(width or self.default_size)
        height = _round8(height or self.default_size)
        started = time.perf_counter()
        generator = torch.Generator(device="cpu" if self.device == "mps" else self.device)
        generator.manual_seed(seed)
        with self._lock, torch.inference_mode():
            output = self.pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                               guidance_scale=guidance, width=width, height=height,
                               num_images_per_prompt=n, generator=generator)
        return ImageResult(list(output.images), seed, steps, guidance, width, height,
                           self.model_name, self.is_demo, time.perf_counter() - started)


def _unavailable(spec: str | None, detail: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{_SETTING}={spec!r} cannot be loaded: {detail}. Set {_SETTING} to a diffusers "
        "pipeline folder or a Hugging Face id (e.g. stabilityai/sd-turbo), or unset it for "
        "the offline demo model.", user_message=_USER_MESSAGE)


def load_image_generator(spec: str | None, *, models_dir: Path,
                         device: str = "auto") -> DiffusionGenerator:
    """Load the pipeline named by ``spec`` (see the module docstring)."""
    from diffusers import AutoPipelineForText2Image

    device = _resolve_device(device)
    if spec is None:
        try:
            source = str(build_tiny_pipeline(Path(models_dir) / _DEMO_NAME))
        except OSError as exc:
            raise _unavailable(spec, f"could not build the demo pipeline: {exc}") from exc
    else:
        source = spec
        if (spec.startswith(("/", ".", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]
                or Path(spec).expanduser().exists()):
            folder = Path(spec).expanduser()
            if not (folder / "model_index.json").is_file():
                raise _unavailable(spec, f"{folder} is not a diffusers pipeline folder "
                                   "(no model_index.json)")
            source = str(folder)
    demo = Path(source).is_dir() and is_demo_pipeline(Path(source))
    index: dict[str, Any] = {}
    if Path(source, "model_index.json").is_file():
        index = json.loads(Path(source, "model_index.json").read_text())
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    except Exception as exc:  # hub errors, missing files, broken weights all end up here
        raise _unavailable(spec, f"{type(exc).__name__}: {exc}") from exc
    family = _family(source, index, demo)
    name = "untrained tiny demo pipeline" if demo else (spec or source)
    return DiffusionGenerator(pipe, model_name=name, family=family, is_demo=demo, device=device)


_cache: dict[tuple[str | None, str, str], DiffusionGenerator] = {}
_cache_lock = threading.Lock()


def get_image_generator(spec: str | None, models_dir: Path,
                        device: str = "auto") -> DiffusionGenerator:
    """The process's generator for these arguments, loaded once and kept."""
    key = (spec, str(models_dir), device)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_image_generator(spec, models_dir=models_dir, device=device)
        return _cache[key]


def save_png(image: Image.Image, path: Path, recipe: dict[str, Any]) -> Path:
    """Write ``image`` as PNG with ``recipe`` as JSON in the ``musespark`` text chunk, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECIPE_CHUNK, json.dumps(recipe, ensure_ascii=False, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            image.save(out, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_recipe(path: Path) -> dict[str, Any]:
    with Image.open(path) as image:
        return dict(json.loads(image.text[RECIPE_CHUNK]))  # type: ignore[attr-defined]
