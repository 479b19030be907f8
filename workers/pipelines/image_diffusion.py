"""Text-to-image generation with diffusers (the ``/imagine`` command), plus PNG recipe helpers.

``MUSESPARK_IMAGE_MODEL`` may be:

* unset: the tiny untrained demo pipeline (see :mod:`workers.pipelines.tiny_diffusion`), built
  once under ``models_dir / "tiny-demo"``. It works offline on any CPU but draws coloured noise.
* an existing local folder in diffusers layout (``model_index.json`` at the top).
* anything else: a Hugging Face hub id (SD-1.5, SD-Turbo, SDXL, SDXL-Turbo families).

Each family gets its usual defaults (steps, guidance, size), so callers may pass ``None`` for
any of them. Every loading failure becomes :class:`~core.errors.ModelUnavailableError`.

Reproducibility: image ``i`` of a request with seed ``s`` is drawn from its own generator seeded
``s + i``, so a single image can be re-made with ``n=1, seed=s+i`` (the same pixels on the same
device and dtype, up to floating-point differences between batch sizes).

Limits:
    * A pipeline is not thread-safe; :meth:`DiffusionGenerator.generate` holds a lock, so calls
      on one generator run one after another.
    * No upper bound on ``n`` or the size; callers cap them (memory grows with both).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.PngImagePlugin
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline

from core.errors import ModelUnavailableError
from core.metrics import model_loaded
from core.settings import get_settings
from workers.residency import check_fits, estimate_bytes, register
from workers.pipelines.tiny_diffusion import build_tiny_pipeline, is_demo_pipeline

__all__ = [
    "DEMO_FOLDER",
    "FAMILY_DEFAULTS",
    "PNG_RECIPE_KEY",
    "RECIPE_CHUNK",
    "DiffusionGenerator",
    "FamilyDefaults",
    "ImageResult",
    "get_image_generator",
    "load_image_generator",
    "read_png_recipe",
    "save_png",
]

#: Folder name of the demo pipeline inside ``models_dir``.
DEMO_FOLDER = "tiny-demo"
#: PNG text chunk that holds the JSON recipe (``RECIPE_CHUNK`` is the older name).
PNG_RECIPE_KEY = "musespark"
RECIPE_CHUNK = PNG_RECIPE_KEY

_SETTING = "MUSESPARK_IMAGE_MODEL"
_USER_MESSAGE = (
    "The picture model is not available right now, so I cannot draw this. "
    "The bot's operator has been told."
)


@dataclass(frozen=True, slots=True)
class FamilyDefaults:
    """What a model family is usually run with. ``size`` ``None``: the model's native size."""

    steps: int
    guidance: float
    size: int | None


#: Defaults per family. Turbo models are distilled for one step without guidance.
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "sd15": FamilyDefaults(steps=25, guidance=7.5, size=None),  # native: 512 (768 for SD-2 768)
    "sd-turbo": FamilyDefaults(steps=1, guidance=0.0, size=512),
    "sdxl": FamilyDefaults(steps=30, guidance=5.0, size=None),  # native: 1024
    "sdxl-turbo": FamilyDefaults(steps=1, guidance=0.0, size=512),
    # Two steps are enough to make (noise) pictures; guidance 1.0 skips the unconditional pass.
    "demo": FamilyDefaults(steps=2, guidance=1.0, size=None),  # native: 64
    "other": FamilyDefaults(steps=25, guidance=5.0, size=None),
}


# --------------------------------------------------------------------------------------------
# Results and the generator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageResult:
    """Images from one request, with the settings actually used (after defaults and rounding).

    Attributes:
        images: ``n`` RGB images.
        seed: the request's seed; image ``i`` used ``seed + i`` (see :attr:`seeds`).
        steps, guidance, width, height: what the pipeline ran with.
        model_name: human-readable model name.
        is_demo: ``True`` for the untrained demo pipeline (its pictures are noise).
        seconds: wall time of the pipeline call.
    """

    images: list[PIL.Image.Image]
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    model_name: str
    is_demo: bool
    seconds: float

    @property
    def seeds(self) -> list[int]:
        """The seed of each image; ``n=1`` with one of these re-makes that image."""
        return [self.seed + i for i in range(len(self.images))]

    def recipe(self, index: int, prompt: str, negative_prompt: str | None = None) -> dict[str, Any]:
        """A JSON-ready description of image ``index``, for :func:`save_png`.

        Keys: ``prompt``, ``negative_prompt``, ``seed`` (that image's own seed), ``steps``,
        ``guidance``, ``width``, ``height``, ``model``, ``demo``.
        """
        return {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": self.seeds[index],
            "steps": self.steps,
            "guidance": self.guidance,
            "width": self.width,
            "height": self.height,
            "model": self.model_name,
            "demo": self.is_demo,
        }


@dataclass(frozen=True, slots=True)
class _Call:
    images: list[PIL.Image.Image]
    seconds: float


class DiffusionGenerator:
    """A loaded text-to-image pipeline; create it once per process and keep it.

    Attributes:
        model_name: human-readable name (hub id, folder name, or the demo's name).
        is_demo: ``True`` for a folder marked ``musespark-demo.json``.
        family: ``"sd15"``, ``"sd-turbo"``, ``"sdxl"``, ``"sdxl-turbo"``, ``"demo"`` or
            ``"other"``; picks the defaults in :data:`FAMILY_DEFAULTS`.
        device: the torch device the pipeline runs on.
        native_size: the side in pixels the model was trained at.
        default_steps, default_guidance, default_size: what ``None`` settings become (the
            family's defaults; ``default_size`` is a square side in pixels).
        size_multiple: width and height are rounded to multiples of this.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        model_name: str,
        is_demo: bool,
        family: str,
        device: torch.device,
    ) -> None:
        self.pipe = pipe
        self.model_name = model_name
        self.is_demo = is_demo
        self.family = family
        self.device = device
        self.defaults = FAMILY_DEFAULTS[family]
        vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
        unet_config = getattr(getattr(pipe, "unet", None), "config", None)
        sample_size = getattr(unet_config, "sample_size", None)
        self.native_size = int(sample_size) * vae_factor if sample_size else 512
        # Each UNet down block halves the latent, so sides must divide by all of it or the skip
        # connections stop lining up.
        blocks = len(getattr(unet_config, "block_out_channels", (0, 0, 0, 0)))
        self.size_multiple = vae_factor * 2 ** max(blocks - 1, 0)
        self.default_steps = self.defaults.steps
        self.default_guidance = self.defaults.guidance
        self.default_size = self.defaults.size or self.native_size
        self._lock = threading.Lock()
        self._img2img: DiffusionPipeline | None = None
        #: The cost of a call, ``pictures * (seconds_per_picture + steps *
        #: seconds_per_picture_step)``, measured by :meth:`warm_up` and raised whenever a call
        #: takes longer: what a batcher uses to keep a batch inside its time limit.
        self.seconds_per_picture = 0.0
        self.seconds_per_picture_step: float | None = None

    def __repr__(self) -> str:
        return (
            f"DiffusionGenerator({self.model_name!r}, family={self.family!r}, "
            f"device={str(self.device)!r}, demo={self.is_demo})"
        )

    def generate(
        self,
        prompt: str,
        *,
        n: int,
        seed: int,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> ImageResult:
        """Draw ``n`` images for ``prompt``.

        ``None`` settings take the family's defaults. Width and height are rounded to the nearest
        multiple the model accepts (64 px for SD models, 4 px for the demo), at least one
        multiple; the result reports the sizes used. ``negative_prompt`` has no effect when
        guidance is 1.0 or less (no unconditional pass runs).

        Args:
            prompt: what to draw.
            n: number of images, at least 1.
            seed: image ``i`` is seeded ``seed + i``.
            negative_prompt: what to avoid, or ``None``.
            steps: denoising steps, at least 1.
            guidance: classifier-free guidance scale, >= 0.
            width, height: requested size in pixels.

        Returns:
            The images and the settings used.

        Raises:
            ValueError: ``n`` or ``steps`` below 1, or negative guidance.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        steps, guidance = self._checked(steps, guidance)
        width = self.round_size(self.default_size if width is None else width)
        height = self.round_size(self.default_size if height is None else height)
        return self.generate_many([(prompt, n, seed)], negative_prompt=negative_prompt,
                                  steps=steps, guidance=guidance, width=width, height=height)[0]

    def generate_many(
        self,
        asks: Sequence[tuple[str, int, int]],
        *,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> list[ImageResult]:
        """Draw several requests' pictures in one pipeline call (micro-batching).

        Each ask is ``(prompt, n, seed)``; its image ``i`` comes from its own generator seeded
        ``seed + i``, so every picture is the one :meth:`generate` gives for that ask alone (up
        to floating-point differences between batch sizes). All asks share the size, steps
        and guidance: the caller groups compatible requests. Every result reports the whole
        call's wall time in ``seconds``.

        Raises:
            ValueError: no asks, an ``n`` below 1, or as in :meth:`generate`.
        """
        if not asks:
            raise ValueError("asks must not be empty")
        if any(n < 1 for _, n, _ in asks):
            raise ValueError(f"every n must be at least 1, got {[n for _, n, _ in asks]}")
        steps, guidance = self._checked(steps, guidance)
        width = self.round_size(self.default_size if width is None else width)
        height = self.round_size(self.default_size if height is None else height)
        prompts = [prompt for prompt, n, _ in asks for _ in range(n)]
        seeds = [seed + i for _, n, seed in asks for i in range(n)]
        call = self._run(self.pipe, prompt=prompts, negative_prompt=negative_prompt,
                         seeds=seeds, steps=steps, guidance=guidance,
                         inputs={"width": width, "height": height})
        results, start = [], 0
        for _, n, seed in asks:
            results.append(ImageResult(
                images=call.images[start:start + n], seed=seed, steps=steps, guidance=guidance,
                width=width, height=height, model_name=self.model_name, is_demo=self.is_demo,
                seconds=call.seconds))
            start += n
        return results

    def warm_up(self) -> float:
        """Render throw-away pictures at the default size: the first pays for lazy
        initialisation (and ``torch.compile``'s compilation); a one-step and a three-step one
        then measure the cost of a call (:meth:`predict_seconds`). Returns the one-step
        picture's wall time in seconds."""
        self.generate("warm-up", n=1, seed=0, steps=1)
        one = self.generate("warm-up", n=1, seed=1, steps=1).seconds
        three = self.generate("warm-up", n=1, seed=2, steps=3).seconds
        # A busy machine makes the difference noisy: never below a tenth of the mean step.
        per_step = max((three - one) / 2, three / 30)
        self.seconds_per_picture = max(one - per_step, 0.0)
        self.seconds_per_picture_step = per_step
        return one

    def predict_seconds(self, pictures: int, steps: int, width: int | None = None,
                        height: int | None = None) -> float | None:
        """Seconds a call of ``pictures`` at ``steps`` should take (None before warm-up).

        The measured cost is at the default size; other sizes scale with their pixel count.
        """
        if self.seconds_per_picture_step is None:
            return None
        side = self.round_size(self.default_size)
        scale = ((width or side) * (height or side)) / (side * side)
        return pictures * scale * (self.seconds_per_picture
                                   + steps * self.seconds_per_picture_step)

    def vary(
        self,
        prompt: str,
        image: PIL.Image.Image,
        *,
        strength: float,
        seed: int,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> ImageResult:
        """Redraw ``image`` for ``prompt`` (image to image), moving ``strength`` of the way.

        The image-to-image pipeline shares this pipeline's weights (``from_pipe``), so it costs
        no memory. It denoises ``int(steps * strength)`` steps, so ``steps`` is raised to make
        that at least one (turbo models run a single step by default).

        Raises:
            ValueError: ``strength`` outside (0, 1], or ``steps`` below 1.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        steps, guidance = self._checked(steps, guidance)
        steps = max(steps, math.ceil(1.0 / strength))
        width, height = self.round_size(image.width), self.round_size(image.height)
        with self._lock:
            if self._img2img is None:
                self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
        call = self._run(self._img2img, prompt=[prompt], negative_prompt=negative_prompt,
                         seeds=[seed], steps=steps, guidance=guidance,
                         inputs={"image": image.convert("RGB").resize((width, height)),
                                 "strength": strength})
        return ImageResult(images=call.images, seed=seed, steps=steps, guidance=guidance,
                           width=width, height=height, model_name=self.model_name,
                           is_demo=self.is_demo, seconds=call.seconds)

    def _checked(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        """Steps and guidance with the family's defaults for ``None``, validated."""
        steps = self.default_steps if steps is None else steps
        guidance = self.default_guidance if guidance is None else guidance
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        return steps, float(guidance)

    def _run(self, pipe: DiffusionPipeline, *, prompt: list[str], negative_prompt: str | None,
             seeds: list[int], steps: int, guidance: float,
             inputs: dict[str, Any]) -> _Call:
        """One pipeline call, one picture per prompt, each from its own seeded generator."""
        # mps generators are unreliable; diffusers draws on cpu and moves the noise over.
        gen_device = "cpu" if self.device.type == "mps" else self.device
        generators = [torch.Generator(gen_device).manual_seed(seed) for seed in seeds]
        negative = [negative_prompt] * len(prompt) if negative_prompt and guidance > 1.0 else None
        with self._lock:
            start = time.perf_counter()
            with torch.inference_mode():
                output = pipe(
                    prompt=prompt,
                    negative_prompt=negative,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=generators,
                    output_type="pil",
                    **inputs,
                )
            seconds = time.perf_counter() - start
            predicted = self.predict_seconds(len(prompt), steps, inputs.get("width"),
                                             inputs.get("height"))
            if predicted is not None and seconds > predicted:
                # Slower than the model of its cost says (a busy machine): scale it up.
                self.seconds_per_picture *= seconds / predicted
                self.seconds_per_picture_step = (self.seconds_per_picture_step or 0.0) * (
                    seconds / predicted)
        return _Call([image.convert("RGB") for image in output.images], seconds)

    def round_size(self, pixels: int) -> int:
        m = int(self.size_multiple)
        return max(m, int(round(pixels / m)) * m)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image_generator(
    spec: str | None, *, models_dir: Path, device: str = "auto"
) -> DiffusionGenerator:
    """Load an image model (slow); prefer :func:`get_image_generator`, which loads once.

    Args:
        spec: ``MUSESPARK_IMAGE_MODEL``: ``None`` for the demo, a local folder or a hub id. A value
            that looks like a path (absolute, ``./``, ``~``) is never sent to the hub.
        models_dir: where the demo pipeline is built (``models_dir / "tiny-demo"``).
        device: ``"auto"`` (cuda, else mps, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``.

    Returns:
        A ready generator: fp16 on cuda (the ``fp16`` weight variant when the model has one),
        fp32 on cpu and mps (half precision there is slow or gives black images).

    Raises:
        ModelUnavailableError: the model cannot be loaded. ``str()`` names
            ``MUSESPARK_IMAGE_MODEL``, the value and the cause; ``user_message`` is plain words.
    """
    torch_device = _resolve_device(device, spec)
    if spec is None:
        try:
            path = build_tiny_pipeline(Path(models_dir).expanduser() / DEMO_FOLDER)
        except Exception as exc:
            raise _unavailable(None, f"cannot build the demo pipeline: {exc}") from exc
        source, name = str(path), "MuseSpark tiny demo (untrained)"
    else:
        path = Path(spec).expanduser()
        looks_like_path = spec.startswith(("/", "./", "../", "~", "\\")) or (
            len(spec) > 1 and spec[1] == ":"
        )
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise _unavailable(
                    spec, f"{path} is not a diffusers pipeline folder (no model_index.json)"
                )
            source, name = str(path), path.resolve().name
        elif looks_like_path or path.exists():
            raise _unavailable(spec, f"no such folder: {path}")
        else:
            source, name = spec, spec
    is_local = Path(source).is_dir()
    demo = is_local and is_demo_pipeline(Path(source))
    if demo and spec is not None:
        name = f"{name} (demo, untrained)"

    check_fits("image", name, estimate_bytes(
        source, bytes_per_param=2 if torch_device.type == "cuda" else 4), torch_device,
        setting=_SETTING)
    try:
        pipe = _from_pretrained(source, torch_device)
    except Exception as exc:  # diffusers raises OSError, ValueError, KeyError, ... alike
        raise _unavailable(spec, f"{type(exc).__name__}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    register("image", name, [c for c in pipe.components.values()
                             if isinstance(c, torch.nn.Module)], torch_device)
    family = "demo" if demo else _detect_family(pipe, source)
    return DiffusionGenerator(
        pipe, model_name=name, is_demo=demo, family=family, device=torch_device
    )


_generators: dict[tuple[str | None, Path, str], DiffusionGenerator] = {}
_generators_lock = threading.Lock()


def get_image_generator(
    spec: str | None, models_dir: Path, device: str = "auto"
) -> DiffusionGenerator:
    """The process-wide generator for these arguments, loaded on first use.

    Failures are not remembered: after the operator fixes the setting, the next call tries again.

    Raises:
        ModelUnavailableError: as in :func:`load_image_generator`.
    """
    key = (spec, Path(models_dir).expanduser().resolve(), device)
    with _generators_lock:
        generator = _generators.get(key)
        if generator is None:
            started = time.monotonic()
            generator = load_image_generator(spec, models_dir=key[1], device=device)
            _generators[key] = generator
            model_loaded("image", generator.model_name, time.monotonic() - started)
        return generator


def _resolve_device(device: str, spec: str | None) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelUnavailableError(
            f"MUSESPARK_DEVICE={device!r} is not a torch device (for {_SETTING}={spec!r}): {exc}",
            user_message=_USER_MESSAGE,
        ) from exc


def _from_pretrained(source: str, device: torch.device) -> DiffusionPipeline:
    if device.type == "cuda":
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                source, dtype=torch.float16, variant="fp16"
            )
        except Exception:
            # Many checkpoints have no fp16 variant; the fp32 files are cast on load instead.
            pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=torch.float16)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=torch.float32)
    pipe.to(device)
    # Attention runs on torch's scaled_dot_product_attention (diffusers' default processor).
    if device.type == "cuda" and get_settings().compile:
        # Compiled once, in the warm-up (workers/batching.py) before the first real picture.
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs")
    if device.type == "mps":
        pipe.enable_attention_slicing()  # diffusers' advice for unified-memory Macs
    return pipe


def _detect_family(pipe: DiffusionPipeline, source: str) -> str:
    """Family from the pipeline class (``model_index.json``'s ``_class_name``) and the name."""
    class_name = type(pipe).__name__
    if Path(source).is_dir():
        try:
            index = json.loads((Path(source) / "model_index.json").read_text("utf-8"))
            class_name = str(index.get("_class_name", class_name))
        except (OSError, ValueError):
            pass
    turbo = "turbo" in source.lower()
    if class_name.startswith("StableDiffusionXL"):
        return "sdxl-turbo" if turbo else "sdxl"
    if class_name.startswith("StableDiffusion") and not class_name.startswith("StableDiffusion3"):
        return "sd-turbo" if turbo else "sd15"
    return "other"


def _unavailable(spec: str | None, detail: str) -> ModelUnavailableError:
    detail = detail.rstrip(". \n")  # the text below adds its own full stop
    shown = "unset (built-in demo)" if spec is None else repr(spec)
    return ModelUnavailableError(
        f"cannot load image model {_SETTING}={shown}: {detail}. Set {_SETTING} to a diffusers "
        "pipeline folder or a Hugging Face id (e.g. stabilityai/sd-turbo), or unset it for the "
        "offline demo model.",
        user_message=_USER_MESSAGE,
    )


# --------------------------------------------------------------------------------------------
# PNG files that remember how they were made
# --------------------------------------------------------------------------------------------


def save_png(image: PIL.Image.Image, path: Path, recipe: dict[str, Any]) -> Path:
    """Write ``image`` as PNG with ``recipe`` as JSON in the text chunk ``"musespark"``.

    The file appears atomically (temporary file in the same folder, then rename), so a reader
    never sees half a PNG. The parent folder is created if missing.

    Args:
        image: the picture.
        path: destination, normally ending in ``.png``.
        recipe: JSON-serialisable settings (see :meth:`ImageResult.recipe`).

    Returns:
        ``path``.

    Raises:
        TypeError: ``recipe`` is not JSON-serialisable.
        OSError: the file cannot be written.
    """
    path = Path(path)
    info = PIL.PngImagePlugin.PngInfo()
    # iTXt keeps non-Latin-1 prompts intact; plain tEXt is Latin-1 only.
    info.add_itxt(PNG_RECIPE_KEY, json.dumps(recipe, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the bot process may be another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_png_recipe(path: Path) -> dict[str, Any]:
    """The recipe stored by :func:`save_png`, or ``{}`` when the PNG has none.

    Raises:
        OSError: the file is missing or not an image (``PIL.UnidentifiedImageError``).
        ValueError: the chunk is there but is not a JSON object.
    """
    with PIL.Image.open(path) as image:
        raw = getattr(image, "text", {}).get(PNG_RECIPE_KEY)
    if raw is None:
        return {}
    recipe = json.loads(raw)
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: the {PNG_RECIPE_KEY!r} chunk is not a JSON object")
    return recipe
