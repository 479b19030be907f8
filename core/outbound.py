"""What the bot says: platform-neutral outbound messages and where they go."""

from __future__ import annotations

import copy
import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["STREAM_CURSOR", "Button", "DeliveryTarget", "MessageKind", "OutboundMessage"]

#: Shown after the text so far while a reply streams in (the worker's edits of a status message).
STREAM_CURSOR = " ▌"


class MessageKind(enum.StrEnum):
    RESULT = "result"  # a generated text or image set
    STATUS = "status"  # "queued", "drawing..."
    ERROR = "error"  # plain-words failure for the person
    INFO = "info"  # help, profile, acknowledgements


@dataclass(frozen=True, slots=True)
class Button:
    """A button under a result. Only ``action:job_id`` travels; the rest stays server-side."""

    action: str
    label: str
    job_id: str

    @property
    def custom_id(self) -> str:
        return f"{self.action}:{self.job_id}"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    kind: MessageKind
    text: str
    images: tuple[str, ...] = ()  # artifact file paths
    buttons: tuple[Button, ...] = ()
    job_id: str | None = None
    reply_to: str | None = None
    ephemeral: bool = False
    #: Set on the answer to a "delete" button: the adapter deletes this platform message.
    delete_message_id: str | None = None
    #: Files to hand to the person privately (``/mydata``): Telegram sends them in the private
    #: chat, Discord as an ephemeral attachment; the local chat shows the path in ``text``.
    #: The adapter deletes them once sent.
    files: tuple[str, ...] = ()
    #: Pictures sent as files (Telegram: documents), byte for byte, and kept (they are the
    #: results' artifacts): unlike photos, which chat apps recompress, they keep their signed
    #: provenance (C2PA manifest). The 📎 Original file button's answer.
    originals: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["images"] = list(self.images)
        data["buttons"] = [asdict(b) for b in self.buttons]
        data["files"] = list(self.files)
        data["originals"] = list(self.originals)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutboundMessage:
        return cls(kind=MessageKind(data["kind"]), text=data["text"],
                   images=tuple(data.get("images", ())),
                   buttons=tuple(Button(**b) for b in data.get("buttons", ())),
                   job_id=data.get("job_id"), reply_to=data.get("reply_to"),
                   ephemeral=bool(data.get("ephemeral", False)),
                   delete_message_id=data.get("delete_message_id"),
                   files=tuple(data.get("files", ())),
                   originals=tuple(data.get("originals", ())))


@dataclass(frozen=True, slots=True)
class DeliveryTarget:
    """Where a job's result goes: stored with the job so any worker can deliver it."""

    platform: str
    chat_id: str
    thread_id: str | None = None
    reply_to: str | None = None
    interaction_token: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As stored with the job (``asdict``'s result, written out: made once per job, on
        the request path, where ``asdict``'s generic recursion was a measurable cost)."""
        return {"platform": self.platform, "chat_id": self.chat_id,
                "thread_id": self.thread_id, "reply_to": self.reply_to,
                "interaction_token": self.interaction_token,
                "extra": copy.deepcopy(self.extra) if self.extra else {}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeliveryTarget:
        return cls(**data)
