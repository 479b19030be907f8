"""Text from an OpenAI-compatible serving engine (vLLM, llama.cpp server, Ollama, TGI, ...).

``MUSESPARK_TEXT_API_URL`` (for example ``http://gpu-box:8000/v1``) points the workers at the
server; ``MUSESPARK_TEXT_API_MODEL`` names the model (unset: the first one ``/models`` lists);
the key comes from the environment (``MUSESPARK_TEXT_API_KEY``; servers that need none accept
any). A serving engine batches every request it holds (continuous batching), so many chats
writing at once share the GPU instead of queueing behind one ``generate()`` each.

Same surface as :class:`workers.pipelines.text_causal_lm.CausalLMGenerator`, so the runner does
not care which one it holds:

* :meth:`ApiTextGenerator.generate` streams (``stream=True``): ``on_text`` gets the reply so far
  as it arrives (the runner turns that into throttled edits of the chat's status message).
* :meth:`ApiTextGenerator.generate_json` uses the server's structured output,
  ``response_format={"type": "json_schema", ...}`` (vLLM: xgrammar/guidance; llama.cpp: the
  schema becomes a GBNF grammar; Ollama: ``format``), never scraping JSON out of free text.
* :meth:`ApiTextGenerator.score_choices` asks for one label under a JSON schema whose only
  field is an ``enum`` of the choices; the chosen one scores 0 and the others
  :data:`UNCHOSEN_LOGPROB` (chat APIs give no log-probabilities of whole answers).

Limits:
    * ``repetition_penalty`` is not sent: it is not part of the OpenAI API, and strict servers
      refuse unknown fields. ``seed`` is sent; whether it makes replies repeatable is up to the
      server (vLLM and llama.cpp honour it).
    * Every failure to reach the server, or an error status from it, becomes
      :class:`~core.errors.ModelUnavailableError` naming the setting and the cause.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import openai

from core.errors import ModelUnavailableError
from workers.pipelines.text_causal_lm import TextResult

__all__ = ["UNCHOSEN_LOGPROB", "ApiTextGenerator", "get_api_text_generator"]

#: Score of the choices the model did not pick in :meth:`ApiTextGenerator.score_choices`.
UNCHOSEN_LOGPROB = -8.0
#: Seconds to wait for the server to answer a request (a long reply streams well within it).
REQUEST_TIMEOUT_SECONDS = 120.0
#: Retries the client makes on connection errors and 429/5xx answers.
MAX_RETRIES = 2

_SETTING = "MUSESPARK_TEXT_API_URL"
_USER_MESSAGE = (
    "The writing model is not available right now, so I cannot write this. "
    "The bot's operator has been told."
)

#: Called with the whole reply so far, each time more of it arrives.
TextCallback = Callable[[str], None]


class ApiTextGenerator:
    """A client of one OpenAI-compatible server and model; make it once per process.

    Attributes:
        model_name: shown under results, e.g. ``"Qwen2.5-1.5B-Instruct (vLLM at gpu-box)"``.
        model: the model id sent with every request.
    """

    def __init__(self, base_url: str, model: str | None, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "not-needed",
                                    timeout=REQUEST_TIMEOUT_SECONDS, max_retries=MAX_RETRIES)
        self.model = model or self._first_model()
        host = self.client.base_url.host or self.base_url
        self.model_name = f"{self.model} (served at {host})"
        self.device = None

    def __repr__(self) -> str:
        return f"ApiTextGenerator({self.model!r}, base_url={self.base_url!r})"

    def _first_model(self) -> str:
        try:
            models = [m.id for m in self.client.models.list()]
        except openai.OpenAIError as exc:
            raise _unavailable(self.base_url, f"cannot list its models: {exc}") from exc
        if not models:
            raise _unavailable(self.base_url, "it serves no model; set MUSESPARK_TEXT_API_MODEL")
        return str(models[0])

    def generate(
        self,
        messages: list[dict[str, str]],
        *,
        max_new_tokens: int,
        seed: int,
        temperature: float = 0.7,
        top_p: float = 0.9,
        repetition_penalty: float = 1.15,
        on_text: TextCallback | None = None,
    ) -> TextResult:
        """Write the assistant's next reply, streamed; ``on_text`` sees it grow.

        Raises:
            ModelUnavailableError: the server cannot be reached or answers with an error.
            ValueError: empty ``messages`` or ``max_new_tokens`` below 1.
        """
        del repetition_penalty  # not in the OpenAI API (see the module docstring)
        if not messages:
            raise ValueError("messages must not be empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        start = time.perf_counter()
        text, tokens, usage = "", 0, None
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=cast(Any, messages),
                max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    piece = choice.delta.content if choice.delta else None
                    if piece:
                        text += piece
                        tokens += 1
                        if on_text is not None:
                            on_text(text)
        except openai.OpenAIError as exc:
            raise _unavailable(self.base_url, f"{type(exc).__name__}: {exc}") from exc
        return TextResult(text.strip(), usage if usage is not None else tokens,
                          time.perf_counter() - start, self.model_name)

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
        """A reply that is JSON matching ``schema``, through the server's structured output.

        ``text`` is the raw JSON; callers validate it and fall back (as with the local model).

        Raises:
            ModelUnavailableError: the server cannot be reached or refuses the request.
        """
        del repetition_penalty
        start = time.perf_counter()
        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=cast(Any, messages),
                max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                response_format=cast(Any, {"type": "json_schema",
                                           "json_schema": {"name": "reply", "schema": schema,
                                                           "strict": True}}))
        except openai.OpenAIError as exc:
            raise _unavailable(self.base_url, f"{type(exc).__name__}: {exc}") from exc
        content = (reply.choices[0].message.content or "") if reply.choices else ""
        tokens = reply.usage.completion_tokens if reply.usage is not None else 0
        return TextResult(content.strip(), tokens, time.perf_counter() - start, self.model_name)

    def score_choices(self, messages: list[dict[str, str]],
                      choices: dict[str, str]) -> dict[str, float]:
        """The model's pick among ``choices`` (keys), as scores (see the module docstring)."""
        keys = list(choices)
        listing = "\n".join(f"- {key}: {words}" for key, words in choices.items())
        asked = [*messages, {"role": "user", "content": (
            f"Answer with the one label that fits best:\n{listing}")}]
        schema = {"type": "object", "properties": {"label": {"enum": keys}},
                  "required": ["label"], "additionalProperties": False}
        result = self.generate_json(asked, schema, max_new_tokens=32, seed=0, temperature=0.01,
                                    top_p=1.0)
        try:
            chosen = json.loads(result.text).get("label")
        except (ValueError, AttributeError):
            chosen = None
        return {key: (0.0 if key == chosen else UNCHOSEN_LOGPROB) for key in keys}


def _unavailable(base_url: str, detail: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"the text API {_SETTING}={base_url!r} failed: {detail.rstrip('. ')}. Check that the "
        "server runs and serves MUSESPARK_TEXT_API_MODEL, or unset MUSESPARK_TEXT_API_URL to "
        "use a local model.", user_message=_USER_MESSAGE)


_clients: dict[tuple[str, str | None, str | None], ApiTextGenerator] = {}
_clients_lock = threading.Lock()


def get_api_text_generator(base_url: str, model: str | None,
                           api_key: str | None) -> ApiTextGenerator:
    """The process-wide client for these settings (made on first use; failures not kept)."""
    key = (base_url, model, api_key)
    with _clients_lock:
        generator = _clients.get(key)
        if generator is None:
            generator = ApiTextGenerator(base_url, model, api_key)
            _clients[key] = generator
        return generator
