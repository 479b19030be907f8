"""The gallery's read model (core/gallery.py): what one piece gathers and what the filters keep.
Rows are written straight into a SQLite store; the browser tests (tests/test_web.py) show the
pages on real results."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from core import gallery
from core.events import Actor, Channel, ChannelKind
from core.store import Artifact, FeedbackEvent, Job, JobState, Store, utcnow
from core.store._store import new_job_id


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    made = Store(f"sqlite:///{tmp_path / 'gallery.db'}")
    made.upgrade()
    yield made
    made.dispose()


class _Rows:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.community = store.ensure_community("discord", Channel("c", ChannelKind.GUILD_CHANNEL,
                                                                   guild_id="g"))
        self.other = store.ensure_community("discord", Channel("d", ChannelKind.GUILD_CHANNEL,
                                                               guild_id="h"))
        self.ann = store.ensure_user("discord", Actor("1", "Ann"))
        self.bob = store.ensure_user("discord", Actor("2", "Bob"))
        self.clock = utcnow() - timedelta(hours=1)

    def job(self, key: str, *, intent: str = "imagine", kind: str = "image",
            style: str = "watercolor", parent: str | None = None, user: int | None = None,
            community: int | None = None, prompt: str = "a fox", **params: Any) -> str:
        self.clock += timedelta(seconds=1)
        job_id = new_job_id()
        with self.store.session() as s:
            s.add(Job(id=job_id, idempotency_key=key, kind=kind, intent=intent,
                      state=JobState.DELIVERED, user_id=user or self.ann,
                      community_id=community or self.community, parent_job_id=parent,
                      prompt=prompt, expanded_prompt=prompt,
                      params={"taste": {"choice": {"style": style}}, **params}, seed=1,
                      platform="discord", delivery={}, attempts=1, created_at=self.clock,
                      updated_at=self.clock, finished_at=self.clock))
            s.flush()
            s.add(Artifact(job_id=job_id, kind=kind, position=0,
                           path=f"/x/{job_id}.png" if kind == "image" else None,
                           text="words" if kind == "text" else None, content_hash="0" * 64,
                           recipe={}, created_at=self.clock))
        return job_id

    def like(self, job_id: str, weight: float) -> None:
        with self.store.session() as s:
            s.add(FeedbackEvent(event_key=f"k{job_id}{weight}", job_id=job_id, user_id=self.bob,
                                platform="discord", chat_id="c", message_id="m", kind="reaction",
                                value="👍", delta=1, weight=weight, created_at=self.clock))


def test_a_piece_gathers_takes_refinements_and_story_scenes(store: Store) -> None:
    rows = _Rows(store)
    take1 = rows.job("discord:1")
    take2 = rows.job("discord:1:take2", style="anime")
    refined = rows.job("discord:9", intent="refine", parent=take1)
    story = rows.job("discord:2", intent="story", kind="text", prompt="a brave mouse",
                     user=rows.bob)
    scenes = [rows.job(f"discord:2:scene{n}", intent="scene", parent=story) for n in (1, 2)]
    rows.job("discord:3", community=rows.other, prompt="elsewhere")

    pieces, more = gallery.gallery(store, rows.community)
    assert not more
    assert [p.root.id for p in pieces] == [story, take1]  # newest first, one per request
    assert [part.job.id for part in pieces[1].parts] == [take1, take2, refined]
    assert [part.job.id for part in pieces[0].parts] == [story, *scenes]
    assert pieces[0].person == "Bob" and pieces[0].parts[0].text == "words"
    # A refinement's (or a take's, or a scene's) page shows its whole piece.
    found = gallery.piece(store, refined)
    assert found is not None and found[0].root.id == take1 and found[1].id == refined
    found = gallery.piece(store, take2)
    assert found is not None and found[0].root.id == take1


def test_filters_person_style_kind_and_liked(store: Store) -> None:
    rows = _Rows(store)
    fox = rows.job("discord:1")
    rows.job("discord:1:take2", style="anime")
    poem = rows.job("discord:2", intent="write", kind="text", style="", user=rows.bob)
    story = rows.job("discord:3", intent="story", kind="text", style="")

    def ids(**filters: Any) -> list[str]:
        return [p.root.id for p in gallery.gallery(store, rows.community, **filters)[0]]

    assert ids(style="anime") == [fox]  # the second take's style finds the request
    assert ids(style="pixel-art") == []
    assert ids(person=rows.bob) == [poem]
    assert ids(kind="story") == [story] and ids(kind="text") == [poem]
    assert ids(kind="picture") == [fox]
    assert ids(liked=True) == []
    rows.like(fox, 1.0)
    assert ids(liked=True) == [fox]
    rows.like(fox, -1.0)  # taken back: no longer liked on balance
    assert ids(liked=True) == []
    assert gallery.community_styles(store, rows.community) == ["anime", "watercolor"]
    assert gallery.gallery(store, rows.community, per_page=2)[1] is True
