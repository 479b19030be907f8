"""MuseSpark's exception tree.

Every layer raises from one root, so callers can catch as broadly or narrowly as they need::

    MuseSparkError
    ├── UserInputError          shown to the person as it is; never a stack trace
    │   ├── UnknownCommandError
    │   ├── PromptError         empty, too long, refused by policy or quota, ...
    │   └── ContentBlockedError a rendered picture the community's safety policy refuses
    ├── ConfigurationError      the operator's setting is wrong (bad URL, missing model)
    ├── ModelUnavailableError   a model path/id cannot be loaded; has ``user_message``
    ├── QueueUnavailableError   the broker cannot be reached; the job stays queued
    └── DeliveryError           posting to a platform failed; has ``retry_after`` / ``final``

``user_message`` is always plain words meant for the person in the chat; ``str(exc)`` is for the
operator's log and may carry detail (paths, URLs) the person should not see.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ContentBlockedError",
    "DeliveryError",
    "ModelUnavailableError",
    "MuseSparkError",
    "PromptError",
    "QueueUnavailableError",
    "UnknownCommandError",
    "UserInputError",
]


class MuseSparkError(Exception):
    """Root of every error MuseSpark raises on purpose."""

    #: Plain words for the person in the chat. Subclasses set a sensible default.
    user_message: str = "Something went wrong on my side. Please try again in a moment."

    def __init__(self, message: str = "", *, user_message: str | None = None) -> None:
        super().__init__(message or user_message or self.user_message)
        if user_message is not None:
            self.user_message = user_message


class UserInputError(MuseSparkError):
    """The person asked for something we cannot do as asked; ``str(exc)`` is the answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, user_message=message)


class UnknownCommandError(UserInputError):
    """A ``/command`` that MuseSpark does not know."""


class PromptError(UserInputError):
    """A prompt that is empty, too long or otherwise unusable."""


class ContentBlockedError(UserInputError):
    """A picture was made but the community's safety policy does not let it be posted."""


class ConfigurationError(MuseSparkError):
    """The operator's configuration is wrong; the message says which setting and how to fix it."""

    user_message = "The bot is misconfigured; its operator has been told what to fix."


class ModelUnavailableError(MuseSparkError):
    """A text or image model cannot be loaded (missing path, unknown hub id, broken files)."""

    user_message = "The model for this request could not be loaded; the operator has been told."


class QueueUnavailableError(MuseSparkError):
    """The broker cannot be reached. The job is persisted and will be sent when it is back."""

    user_message = (
        "The work queue is unreachable right now. Your request is saved and will run as soon "
        "as it is back."
    )


class DeliveryError(MuseSparkError):
    """Posting a result to a platform failed.

    Attributes:
        retry_after: seconds the platform asked us to wait (HTTP 429), or ``None``.
        final: ``True`` when retrying cannot help (chat gone, bot blocked, bad request).
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, final: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.final = final

