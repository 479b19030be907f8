"""A job's parameters: what was decided for it, typed, versioned, and checked on every write.

``Job.params`` is stored as JSON. The keys that several modules read are typed here;
:class:`ParamsJSON` (the column's type) validates every value written to the column, through the
ORM or a Core ``INSERT``/``UPDATE``, against :class:`JobParams` and stamps the version ``v``. A
value that does not fit raises at once, in the process that wrote it, instead of breaking
whichever worker or adapter reads it later.

Keys not named here are allowed (``extra="allow"``) so a feature can add its own; a key that
more than one module reads belongs here. Reading stays plain ``dict`` access (``job.params``);
:meth:`JobParams.of` gives the typed view.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import JSON, Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["PARAMS_VERSION", "JobParams", "ParamsJSON", "Takes", "TasteRecord", "versioned"]

#: The version stamped on params written now. Bump it with a migration when a key's meaning
#: changes; readers of older rows see the version they were written with.
PARAMS_VERSION = 1


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TasteRecord(_Open):
    """What the taste learner chose for a job, and why (the "why this?" answer)."""

    choice: dict[str, str]
    why: str = ""
    learned: bool = False
    profile_version: dict[str, int] = Field(default_factory=dict)


class Takes(_Open):
    """One take of a request drawn in several (``index`` 0 speaks for the request)."""

    index: int = Field(ge=0)
    of: int = Field(ge=2)
    siblings: list[dict[str, str]] = Field(default_factory=list)


class StoryParams(_Open):
    """On a story job: how many scenes (``scenes``). On a scene's picture job: which story and
    scene it draws (``id``, ``title``, ``scene``, ``of``, ``text``)."""

    scenes: int | None = Field(default=None, ge=1)
    id: str | None = None
    scene: int | None = Field(default=None, ge=1)
    of: int | None = Field(default=None, ge=1)


class RemixParams(_Open):
    path: str


class JobParams(_Open):
    """The typed part of ``Job.params``."""

    v: int = PARAMS_VERSION
    max_new_tokens: int | None = Field(default=None, ge=1)
    count: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    size: int | None = Field(default=None, ge=1)
    taste: TasteRecord | None = None
    #: A story's shared picture style.
    picture_taste: TasteRecord | None = None
    takes: Takes | None = None
    story: StoryParams | None = None
    #: The story job a scene picture belongs to.
    part_of: str | None = None
    #: A reply to a text result: the worker gives the model the earlier turns.
    thread: bool | None = None
    remix: RemixParams | None = None

    @classmethod
    def of(cls, params: dict[str, Any]) -> JobParams:
        """The typed view of a stored ``params`` dict."""
        return cls.model_validate(params)


class InvalidParams(ValueError):
    """A job's params do not fit :class:`JobParams`."""


class ParamsJSON(TypeDecorator[dict[str, Any]]):
    """JSON checked against :class:`JobParams` on the way in; a plain dict on the way out."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: dict[str, Any] | None,
                           dialect: Dialect) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            JobParams.model_validate(value)
        except ValidationError as exc:
            raise InvalidParams(f"job params do not fit JobParams: {exc}") from exc
        return versioned(value)


def versioned(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as stored: with the version of :class:`JobParams` they were written in."""
    return params if "v" in params else {"v": PARAMS_VERSION, **params}
