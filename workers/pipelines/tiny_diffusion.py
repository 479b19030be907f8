"""A tiny, untrained Stable Diffusion pipeline built entirely offline (the image demo model).

When ``MUSESPARK_IMAGE_MODEL`` is unset, MuseSpark still has to answer ``/imagine`` on a machine
with no network and no GPU. This module builds a real ``diffusers.StableDiffusionPipeline``
(UNet, VAE, CLIP text encoder, CLIP tokenizer, scheduler) at toy size with random weights from a
fixed seed. It exercises the same code path as a real model, is about 7 MB on disk and makes a
64x64 image in a fraction of a second on a CPU. Its pictures are coloured noise, not art: the
folder carries ``musespark-demo.json`` so loaders can tell people so.

Limits:
    * Untrained: prompts do not influence the picture in any meaningful way.
    * The tokenizer is a byte-level BPE trained on the small built-in corpus below; any text
      tokenizes (every byte is in the vocabulary), but rare words split into many pieces.
    * The build lock uses ``fcntl.flock``, so it is POSIX-only (Linux, macOS).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = ["DEMO_MARKER", "DEMO_SIZE", "build_tiny_pipeline", "is_demo_pipeline"]

#: File inside a pipeline folder that marks it as MuseSpark's untrained demo.
DEMO_MARKER = "musespark-demo.json"
#: Native output side in pixels: UNet sample_size 32 times the VAE's scale factor 2.
DEMO_SIZE = 64

_SEED = 20240601
_VOCAB_SIZE = 1024
_MAX_TOKENS = 77  # CLIP's usual context; the text encoder's position table has this many rows
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP splits words like this before byte-level BPE; the trainer must see the same pieces.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# A small English corpus of the kind of text people type as image prompts.
_CORPUS = """\
a photo of a cat sitting on a windowsill in the morning sun
a painting of a lighthouse on a rocky coast during a storm, oil on canvas
an astronaut riding a horse on the moon, digital art, highly detailed
a bowl of fresh fruit on a wooden table, still life, soft light
a futuristic city at night with neon lights and flying cars, cyberpunk
a watercolor landscape of mountains and a lake at sunset
portrait of an old man with a beard, dramatic lighting, black and white photograph
a cute dog wearing sunglasses at the beach, sharp focus
a forest path in autumn with red and orange leaves, misty atmosphere
a castle on a hill under a starry sky, fantasy illustration
a red sports car driving through the desert, cinematic, wide angle
a cozy cabin in the snow with smoke rising from the chimney
a dragon flying over a medieval village, concept art, trending
a cup of coffee and a book on a rainy day, warm colors, bokeh
a robot painting a picture in a studio, whimsical, children's book style
the ocean waves crashing against the cliffs, long exposure photography
a field of sunflowers under a blue sky with white clouds
an owl perched on a branch at night, moonlight, detailed feathers
a bustling market street in the old town, people, colorful, vibrant
a minimalist logo of a mountain, flat design, vector, simple shapes
a bowl of ramen with egg and green onions, food photography, 4k
a spaceship landing on an alien planet with two suns, science fiction
a garden full of flowers and butterflies in spring, pastel colors
a knight in shining armor holding a sword, epic, heroic pose
a small boat on a calm river at dawn, reflections in the water
a pixel art scene of a village with houses, trees and a river
an abstract painting with bold shapes and bright colors, modern art
a snowy mountain peak above the clouds, aerial view, crisp light
a happy family having a picnic in the park on a sunny afternoon
a steampunk airship with brass gears and propellers in the sky
"""


def is_demo_pipeline(path: Path) -> bool:
    """Whether ``path`` is a pipeline folder marked as a MuseSpark demo."""
    return (Path(path) / DEMO_MARKER).is_file()


def build_tiny_pipeline(path: Path) -> Path:
    """Build the tiny random-weight demo pipeline at ``path`` unless it is already there.

    Idempotent and safe to call from several processes at once: the first caller builds into a
    temporary sibling folder under a file lock and renames it into place, so ``path`` never holds
    a half-written pipeline. The build is deterministic (fixed seeds) and needs no network.

    Args:
        path: folder to create; its parent is created if missing.

    Returns:
        ``path``, holding a ``StableDiffusionPipeline`` loadable with ``from_pretrained`` and the
        ``musespark-demo.json`` marker.

    Raises:
        FileExistsError: ``path`` exists but is not a demo pipeline (never overwritten).
        OSError: the folder cannot be written.
    """
    path = Path(path).expanduser().resolve()
    if is_demo_pipeline(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        if is_demo_pipeline(path):
            return path  # another process built it while we waited
        if path.exists():
            raise FileExistsError(f"{path} exists and is not a MuseSpark demo pipeline")
        # Only the lock holder creates build folders, so leftovers are from a crashed build.
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        build.chmod(0o755)  # mkdtemp makes it private; other worker users must read it
        try:
            pipe = _make_pipeline()
            pipe.save_pretrained(build, safe_serialization=True)
            _write_vocab_files(pipe.tokenizer, build / "tokenizer")
            marker = {"demo": True, "note": "untrained random weights"}
            (build / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")
            _sync_tree(build)
            os.replace(build, path)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return path


def _make_pipeline() -> StableDiffusionPipeline:
    """All components at toy size, each created right after re-seeding so the build is stable."""
    tokenizer = _train_tokenizer()

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=DEMO_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=DEMO_SIZE,
    )
    torch.manual_seed(_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="trailing",  # few-step sampling starts from pure noise this way
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _train_tokenizer() -> CLIPTokenizer:
    """A CLIP-style byte-level BPE trained on :data:`_CORPUS`, wrapped as ``CLIPTokenizer``.

    The BPE model mirrors CLIP's (``</w>`` end-of-word suffix, CLIP's word split, lower-casing),
    so the vocab and merges it learns mean the same thing inside ``CLIPTokenizer``.
    """
    bpe = Tokenizer(models.BPE(unk_token=_EOS, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    word_ends = [char + "</w>" for char in alphabet]
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        # Listing every "x</w>" up front fixes their ids. Left to the trainer they are created in
        # hash-map order, and ids break ties between equally frequent pairs, so the merges would
        # change from run to run (huggingface/tokenizers#1794).
        special_tokens=[_BOS, _EOS, *word_ends],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)

    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    # Number the vocabulary the way CLIP's is: bytes, bytes ending a word, merge results in
    # merge order, then the two special tokens.
    ordered = [*alphabet, *word_ends, *(a + b for a, b in merges), _BOS, _EOS]
    vocab: dict[str, int] = {}
    for token in ordered:
        vocab.setdefault(token, len(vocab))
    # CLIPTokenizer rebuilds CLIP's normalizer, word split and post-processor around these.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_TOKENS, pad_token=_EOS)


def _write_vocab_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Add ``vocab.json``/``merges.txt`` beside ``tokenizer.json`` for loaders that want them.

    transformers 5 saves only ``tokenizer.json``; older transformers and the slow CLIP tokenizer
    read the two classic files instead.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in state["merges"]]
    (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False), "utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, "utf-8")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` between processes; released when the process dies."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _sync_tree(folder: Path) -> None:
    # Data must be durable before the rename that publishes it (power loss mid-build).
    for item in folder.rglob("*"):
        if item.is_file():
            item.chmod(0o644)
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


if __name__ == "__main__":  # `musespark models tiny PATH`
    import sys

    if len(sys.argv) != 2:
        print("usage: python -m workers.pipelines.tiny_diffusion PATH", file=sys.stderr)
        raise SystemExit(2)
    try:
        built = build_tiny_pipeline(Path(sys.argv[1]))
    except (FileExistsError, OSError) as error:
        print(f"could not build the demo pipeline: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Built an untrained tiny demo pipeline at {built} (random weights: its pictures are "
          "noise). Point MUSESPARK_IMAGE_MODEL at it, or leave the setting unset to use the "
          "built-in one.")
