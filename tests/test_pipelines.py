"""The model pipelines on real (tiny or offline) models: no network, no GPU needed.

The default text model is converted once per session, by two processes racing to do it (the
situation of two workers starting at once); every other text test reuses that cache.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from core.errors import ModelUnavailableError
from workers.pipelines import image_diffusion, text_causal_lm, tiny_diffusion
from workers.pipelines.image_diffusion import (
    get_image_generator,
    load_image_generator,
    read_png_recipe,
    save_png,
)
from workers.pipelines.text_causal_lm import (
    DEFAULT_CACHE_NAME,
    DEFAULT_MODEL_NAME,
    get_text_generator,
    load_text_generator,
)
from workers.pipelines.tiny_diffusion import DEMO_MARKER, build_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Image: the tiny demo pipeline
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> image_diffusion.DiffusionGenerator:
    return load_image_generator(str(tiny_path), models_dir=tiny_path.parent, device="cpu")


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_tiny_pipeline_is_a_marked_complete_diffusers_folder(tiny_path: Path) -> None:
    assert json.loads((tiny_path / DEMO_MARKER).read_text()) == {
        "demo": True,
        "note": "untrained random weights",
    }
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_path / part).is_dir(), part
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (tiny_path / "tokenizer" / name).is_file(), name
    # No build folder is left behind beside it.
    assert [p.name for p in tiny_path.parent.iterdir() if ".tmp-" in p.name] == []


def test_tiny_tokenizer_is_clip_like() -> None:
    from transformers import CLIPTokenizer

    tokenizer = tiny_diffusion._train_tokenizer()
    ids = tokenizer("A photo of a Cat, 😀")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "photo</w>" in tokens and "cat</w>" in tokens  # learned from the corpus, lower-cased
    assert tokenizer.unk_token_id not in ids[1:-1]  # every byte has a token, emoji included
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.model_max_length == 77
    assert isinstance(tokenizer, CLIPTokenizer)


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_path: Path) -> None:
    again = build_tiny_pipeline(tmp_path / "again")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"):
        assert (again / part).read_bytes() == (tiny_path / part).read_bytes(), part


def test_tiny_build_is_idempotent_and_never_overwrites(tmp_path: Path, tiny_path: Path) -> None:
    stamp = (tiny_path / "model_index.json").stat().st_mtime_ns
    assert build_tiny_pipeline(tiny_path) == tiny_path
    assert (tiny_path / "model_index.json").stat().st_mtime_ns == stamp
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_pipeline(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_tiny_pipeline_loads_as_a_demo(tiny: image_diffusion.DiffusionGenerator) -> None:
    assert tiny.is_demo and tiny.family == "demo"
    assert "demo" in tiny.model_name
    assert (tiny.default_steps, tiny.default_guidance, tiny.default_size) == (2, 1.0, 64)


def test_demo_images_have_the_native_size_and_follow_the_seed(
    tiny: image_diffusion.DiffusionGenerator,
) -> None:
    first = tiny.generate("a lighthouse at dusk", n=2, seed=11)
    assert len(first.images) == 2
    assert all(image.size == (64, 64) and image.mode == "RGB" for image in first.images)
    assert (first.width, first.height, first.steps, first.guidance) == (64, 64, 2, 1.0)
    assert first.is_demo and first.seed == 11 and first.seeds == [11, 12]
    assert first.seconds > 0

    same = tiny.generate("a lighthouse at dusk", n=2, seed=11)
    for a, b in zip(first.images, same.images):
        assert np.array_equal(pixels(a), pixels(b))
    # Two images of one request differ, and another seed gives other pictures.
    assert not np.array_equal(pixels(first.images[0]), pixels(first.images[1]))
    other = tiny.generate("a lighthouse at dusk", n=1, seed=99)
    assert not np.array_equal(pixels(other.images[0]), pixels(first.images[0]))
    # Each image can be re-made alone from its own seed.
    alone = tiny.generate("a lighthouse at dusk", n=1, seed=12)
    assert np.abs(pixels(alone.images[0]) - pixels(first.images[1])).max() <= 1


def test_sizes_are_rounded_to_what_the_model_accepts(
    tiny: image_diffusion.DiffusionGenerator,
) -> None:
    result = tiny.generate("x", n=1, seed=1, width=90, height=50, steps=1, guidance=3.0,
                           negative_prompt="blur")
    assert (result.width, result.height) == (88, 48) == result.images[0].size
    assert (result.steps, result.guidance) == (1, 3.0)
    with pytest.raises(ValueError):
        tiny.generate("x", n=0, seed=1)


def test_a_variation_redraws_the_picture_further_the_stronger_it_is(
    tiny: image_diffusion.DiffusionGenerator,
) -> None:
    source = tiny.generate("a lighthouse at dusk", n=1, seed=5, width=88, height=48).images[0]
    subtle = tiny.vary("a lighthouse at dusk", source, strength=0.35, seed=6, steps=4)
    bold = tiny.vary("a lighthouse at dusk", source, strength=0.85, seed=6, steps=4)
    for result in (subtle, bold):
        assert result.images[0].size == source.size == (result.width, result.height)
        assert result.is_demo and result.seed == 6
    moved = [float(np.abs(pixels(r.images[0]) - pixels(source)).mean()) for r in (subtle, bold)]
    assert 0 < moved[0] < moved[1], moved
    # One step at strength 0.35 would denoise nothing; the steps are raised to make one.
    assert tiny.vary("x", source, strength=0.35, seed=1, steps=1).steps == 3
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError):
            tiny.vary("x", source, strength=strength, seed=1)


def test_default_spec_builds_the_demo_under_models_dir(tmp_path: Path) -> None:
    generator = get_image_generator(None, tmp_path, "cpu")
    assert generator.is_demo and (tmp_path / "tiny-demo" / DEMO_MARKER).is_file()
    assert get_image_generator(None, tmp_path, "cpu") is generator  # loaded once per process


def test_png_recipe_round_trips(tmp_path: Path, tiny: image_diffusion.DiffusionGenerator) -> None:
    result = tiny.generate("un phare au crépuscule ☃", n=1, seed=3)
    recipe = result.recipe(0, "un phare au crépuscule ☃", "fog")
    path = save_png(result.images[0], tmp_path / "out" / "1.png", recipe)
    assert read_png_recipe(path) == recipe
    assert recipe["seed"] == 3 and recipe["demo"] is True and recipe["width"] == 64
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and np.array_equal(pixels(image), pixels(result.images[0]))
    assert [p.name for p in path.parent.iterdir()] == ["1.png"]  # no temp file left

    plain = tmp_path / "plain.png"
    result.images[0].save(plain)
    assert read_png_recipe(plain) == {}


@pytest.mark.parametrize("problem", ["missing", "empty", "broken-index", "broken-weights"])
def test_unloadable_image_folders_raise_model_unavailable(
    tmp_path: Path, tiny_path: Path, problem: str
) -> None:
    import shutil

    folder = tmp_path / "model"
    if problem == "empty":
        folder.mkdir()
    elif problem == "broken-index":
        folder.mkdir()
        (folder / "model_index.json").write_text("{not json")
    elif problem == "broken-weights":
        shutil.copytree(tiny_path, folder)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelUnavailableError) as caught:
        load_image_generator(str(folder), models_dir=tmp_path, device="cpu")
    assert "MUSESPARK_IMAGE_MODEL" in str(caught.value) and str(folder) in str(caught.value)
    assert "MUSESPARK" not in caught.value.user_message and str(tmp_path) not in (
        caught.value.user_message
    )


# ---------------------------------------------------------------------------------------------
# Text: the offline SmolLM2 default
# ---------------------------------------------------------------------------------------------

_CONVERT_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
    from workers.pipelines.text_causal_lm import load_text_generator
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # both processes start converting on the same signal
    start = time.perf_counter()
    generator = load_text_generator(None, cache_dir=Path(sys.argv[1]), device="cpu")
    print(json.dumps({"seconds": time.perf_counter() - start, "name": generator.model_name}))
    """
)


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A cache dir converted by two worker-like processes started at the same moment."""
    cache = tmp_path_factory.mktemp("text-cache")
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONVERT_SCRIPT, str(cache)], cwd=REPO, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        report["converted"] = "LOG converting" in err
        reports.append(report)
    return cache, reports


def test_two_processes_converting_at_once_make_one_valid_cache(
    text_cache: tuple[Path, list[dict]],
) -> None:
    cache, reports = text_cache
    assert sorted(r["converted"] for r in reports) == [False, True], reports
    assert all(r["name"] == DEFAULT_MODEL_NAME for r in reports)
    folder = cache / DEFAULT_CACHE_NAME
    marker = json.loads((folder / "musespark-cache.json").read_text())
    assert marker["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    assert not (folder / "config.json").read_text().count("quantization_config")
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_later_loads_read_the_cache_without_converting(
    text_cache: tuple[Path, list[dict]], caplog: pytest.LogCaptureFixture
) -> None:
    cache, _ = text_cache
    weights = cache / DEFAULT_CACHE_NAME / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger=text_causal_lm.__name__)
    start = time.perf_counter()
    generator = get_text_generator(None, cache, "cpu")
    seconds = time.perf_counter() - start
    assert seconds < 10, seconds  # about 0.4 s; converting takes about 20 s
    assert weights.stat().st_mtime_ns == stamp
    assert not [r for r in caplog.records if "converting" in r.getMessage()]
    assert generator.model_name == DEFAULT_MODEL_NAME
    assert get_text_generator(None, cache, "cpu") is generator  # loaded once per process


def test_default_model_writes_new_text_within_budget(text_cache: tuple[Path, list[dict]]) -> None:
    generator = get_text_generator(None, text_cache[0], "cpu")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write one sentence about the sea."},
    ]
    result = generator.generate(messages, max_new_tokens=16, seed=7)
    assert result.text and result.text == result.text.strip()
    assert 0 < result.new_tokens <= 16
    assert "Write one sentence" not in result.text  # only the new text comes back
    assert result.model_name == DEFAULT_MODEL_NAME and result.seconds > 0
    seen: list[str] = []
    again = generator.generate(messages, max_new_tokens=16, seed=7, on_text=seen.append)
    assert again.text == result.text  # the seed makes sampling reproducible (streamed too)
    assert len(seen) > 1 and seen[-1] == result.text, seen  # the reply grew token by token
    assert all(later.startswith(earlier[:-1]) for earlier, later in zip(seen, seen[1:])), seen
    with pytest.raises(ValueError):
        generator.generate(messages, max_new_tokens=0, seed=7)


def test_batch_generation_answers_each_chat(text_cache: tuple[Path, list[dict]]) -> None:
    generator = get_text_generator(None, text_cache[0], "cpu")
    chats = [[{"role": "user", "content": "Name a colour."}],
             [{"role": "user", "content": "Say hello to a long list of friends, one by one."}]]
    results = generator.generate_batch(chats, max_new_tokens=8, seed=1)
    assert len(results) == 2
    assert all(r.text and 0 < r.new_tokens <= 8 for r in results)
    # One budget per chat: the batch runs to the longest, each reply stops at its own.
    short, long = generator.generate_batch(chats, max_new_tokens=[2, 12], seed=1)
    assert 0 < short.new_tokens <= 2 and 0 < long.new_tokens <= 12
    with pytest.raises(ValueError, match="one max_new_tokens per conversation"):
        generator.generate_batch(chats, max_new_tokens=[2], seed=1)


def test_a_foreign_folder_in_the_cache_slot_is_never_loaded(tmp_path: Path) -> None:
    # A folder without the completion marker (not made by our atomic rename) is refused, not
    # loaded and not built over.
    slot = tmp_path / DEFAULT_CACHE_NAME
    slot.mkdir()
    (slot / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailableError) as caught:
        load_text_generator(None, cache_dir=tmp_path, device="cpu")
    assert "MUSESPARK_TEXT_MODEL" in str(caught.value) and "delete" in str(caught.value)
    assert (slot / "config.json").read_text() == "{}"


@pytest.mark.parametrize("problem", ["missing", "broken"])
def test_unloadable_text_folders_raise_model_unavailable(tmp_path: Path, problem: str) -> None:
    folder = tmp_path / "llm"
    if problem == "broken":
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": "lots"')
    with pytest.raises(ModelUnavailableError) as caught:
        load_text_generator(str(folder), cache_dir=tmp_path, device="cpu")
    assert "MUSESPARK_TEXT_MODEL" in str(caught.value) and str(folder) in str(caught.value)
    assert "MUSESPARK" not in caught.value.user_message
