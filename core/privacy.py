"""Privacy: ``/forget everything``, ``/mydata`` and the retention sweep.

What MuseSpark keeps about a person, and where (each is covered below):

* ``users``: one row per platform identity (linked identities share ``person_id``);
* ``jobs``: their requests (prompt, parameters, delivery target, outbox with the result text),
  with ``artifacts`` (result texts and pictures, uploads as ``input``), ``delivered_messages``
  and the feedback others left on them (all cascade with the job);
* files in the data dir: ``artifacts/JOB/``, ``uploads/`` (remix inputs), ``profiles/`` (the
  ``/profile`` charts, named ``PLATFORM-PERSON-…``), ``exports/`` (``/mydata`` zips);
* ``feedback_events`` they made anywhere, ``profiles`` (derived: rebuilt from the log),
  ``link_codes``, ``confirmations``, ``request_log`` (quotas), ``audit_events`` they made or that
  are about their results, ``local_messages`` of the terminal chat;
* a private chat's community and flood-wait rows, whose ids are the person's own on Telegram.

Forgetting deletes all of it, rebuilds every profile from what is left of the feedback log (so
communities no longer count them) and, on SQLite, overwrites the freed pages (``secure_delete``)
and folds the write-ahead log back, so the database file keeps no copy either.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, update

from core.learning import TasteService
from core.settings import Settings
from core.store import Artifact, Community, FeedbackEvent, Job, JobState, LocalMessage, Store
from core.store import User, as_utc, rows_changed, utcnow
from core.store.models import (
    AuditEvent,
    Confirmation,
    LinkCode,
    Profile,
    RateLimit,
    RequestLog,
    WebSignIn,
)

__all__ = ["CONFIRM_TTL", "Forgotten", "Privacy", "RetentionSweeper", "Purged"]

log = logging.getLogger(__name__)

#: A ``/forget everything`` confirmation code is good for this long.
CONFIRM_TTL = timedelta(minutes=10)
EXPORTS_FOLDER = "exports"
PROFILE_CHARTS_FOLDER = "profiles"
_PURPOSE_FORGET = "forget"


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What ``/forget everything`` erased."""

    requests: int
    files: int
    uploads: int
    feedback: int
    identities: tuple[str, ...]

    def describe(self) -> str:
        platforms = ", ".join(self.identities) or "none"
        return (f"Done: I forgot you. Erased {self.requests} request(s) with their results, "
                f"{self.files} file(s) of results, {self.uploads} upload(s), {self.feedback} "
                f"reaction(s) and button press(es), your profile, links and "
                f"{len(self.identities)} identit{'y' if len(self.identities) == 1 else 'ies'} "
                f"({platforms}); the community profiles you counted in were rebuilt without "
                "you. Messages already posted in chats stay there (delete them with 🗑️).")


@dataclass(frozen=True, slots=True)
class Purged:
    """What one retention sweep erased."""

    jobs: int
    files: int
    uploads: int


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    return value


class Privacy:
    """Forgets a person, exports what is kept about them, and purges what outlived retention."""

    def __init__(self, store: Store, settings: Settings, taste: TasteService) -> None:
        self.store, self.settings, self.taste = store, settings, taste

    @property
    def _data_dir(self) -> Path:
        return self.settings.resolved_data_dir

    # -- /forget everything -------------------------------------------------------------------

    def ask_to_forget(self, user_id: int) -> str:
        """A one-time code the person repeats to confirm (a typo must not erase everything)."""
        code = secrets.token_hex(3)
        with self.store.session() as s:
            s.add(Confirmation(code=code, user_id=user_id, purpose=_PURPOSE_FORGET,
                               created_at=utcnow()))
        return code

    def confirmed(self, user_id: int, code: str) -> bool:
        """Whether ``code`` is a live forget confirmation of this person (it is used up)."""
        ids = self.taste.identities_of(user_id)
        with self.store.session() as s:
            found = s.get(Confirmation, code.strip().lower())
            if (found is None or found.purpose != _PURPOSE_FORGET or found.user_id not in ids
                    or as_utc(found.created_at) < utcnow() - CONFIRM_TTL):
                return False
            s.delete(found)
            return True

    def what_is_kept(self, user_id: int) -> tuple[int, int]:
        """(requests, feedback rows) kept about the person behind ``user_id``."""
        ids = self.taste.identities_of(user_id)
        with self.store.session() as s:
            jobs = len(s.scalars(select(Job.id).where(Job.user_id.in_(ids))).all())
            feedback = len(s.scalars(select(FeedbackEvent.id).where(
                FeedbackEvent.user_id.in_(ids))).all())
        return jobs, feedback

    def forget_everything(self, user_id: int) -> Forgotten:
        ids = self.taste.identities_of(user_id)
        person = self.taste.person_of(user_id)
        with self.store.session() as s:
            users = list(s.scalars(select(User).where(User.id.in_(ids))).all())
            identities = [(u.platform, u.platform_user_id) for u in users]
            job_ids = list(s.scalars(select(Job.id).where(Job.user_id.in_(ids))).all())
            artifacts = list(s.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids))).all())
            uploads = {a.path for a in artifacts if a.path and a.kind == "input"}
            files = {a.path for a in artifacts if a.path and a.kind != "input"}
            feedback = rows_changed(s.execute(delete(FeedbackEvent).where(or_(
                FeedbackEvent.user_id.in_(ids), FeedbackEvent.job_id.in_(job_ids)))))
            # The terminal chat: what they typed, what the bot answered them, their results.
            local_authors = [pid for platform, pid in identities if platform == "local"]
            typed = list(s.scalars(select(LocalMessage.id).where(
                LocalMessage.author.in_(local_authors))).all())
            # Blanked, not deleted: a message's number is what people refer to, and SQLite
            # would hand a deleted last number to the next message.
            s.execute(update(LocalMessage).where(or_(
                LocalMessage.id.in_(typed), LocalMessage.reply_to.in_(typed),
                LocalMessage.job_id.in_(job_ids))).values(
                author="forgotten", job_id=None, text="(forgotten)", attachments={},
                reply_to=None))
            # Someone else's follow-up of their result is someone else's request now.
            s.execute(update(Job).where(Job.parent_job_id.in_(job_ids))
                      .values(parent_job_id=None))
            s.execute(delete(AuditEvent).where(or_(
                AuditEvent.actor_user_id.in_(ids), AuditEvent.subject_user_id.in_(ids),
                AuditEvent.job_id.in_(job_ids))))
            s.execute(delete(RequestLog).where(RequestLog.user_id.in_(ids)))
            s.execute(delete(Confirmation).where(Confirmation.user_id.in_(ids)))
            s.execute(delete(LinkCode).where(LinkCode.user_id.in_(ids)))
            s.execute(delete(WebSignIn).where(WebSignIn.user_id.in_(ids)))
            s.execute(delete(Profile).where(Profile.subject == "person",
                                            Profile.subject_id.in_(ids + [person])))
            s.execute(delete(Job).where(Job.id.in_(job_ids)))
            # A private chat is a community of one whose id is the person's own (Telegram).
            for platform, platform_id in identities:
                s.execute(delete(Community).where(Community.platform == platform,
                                                  Community.platform_community_id == platform_id))
                s.execute(delete(RateLimit).where(RateLimit.platform == platform,
                                                  RateLimit.chat_id == platform_id))
            s.execute(delete(User).where(User.id.in_(ids)))
        self.store.forget_cached_ids()
        self.taste.rebuild()
        for path in files | uploads:
            Path(path).unlink(missing_ok=True)
        for job_id in job_ids:
            shutil.rmtree(self.settings.artifacts_dir / job_id, ignore_errors=True)
        for folder, pattern in ((PROFILE_CHARTS_FOLDER, f"*-{person}-*"),
                                (EXPORTS_FOLDER, f"mydata-{person}-*")):
            for leftover in (self._data_dir / folder).glob(pattern):
                leftover.unlink(missing_ok=True)
        self.store.compact()
        log.info("forgot a person: %d request(s), %d identity(ies)", len(job_ids), len(ids))
        return Forgotten(len(job_ids), len(files), len(uploads), int(feedback or 0),
                         tuple(sorted({platform for platform, _ in identities})))

    # -- /mydata ------------------------------------------------------------------------------

    def export(self, user_id: int) -> tuple[Path, int, int]:
        """A zip of everything kept about the person: ``data.json`` (identities, requests with
        their results, feedback, profiles, audit entries about them) and ``files/`` (result
        pictures and uploads). Returns its path, the number of requests and of files."""
        ids = self.taste.identities_of(user_id)
        person = self.taste.person_of(user_id)
        data: dict[str, Any] = {"exported_at": utcnow().isoformat(), "person": person}
        files: list[tuple[str, Path]] = []
        with self.store.session() as s:
            data["identities"] = [
                {"platform": u.platform, "id": u.platform_user_id, "name": u.display_name,
                 "learning_opt_out": u.learning_opt_out, "since": _jsonable(u.created_at)}
                for u in s.scalars(select(User).where(User.id.in_(ids)))]
            requests = []
            for job in s.scalars(select(Job).where(Job.user_id.in_(ids))
                                 .order_by(Job.created_at)):
                results = []
                for artifact in s.scalars(select(Artifact).where(Artifact.job_id == job.id)
                                          .order_by(Artifact.position, Artifact.id)):
                    entry: dict[str, Any] = {"kind": artifact.kind, "position": artifact.position,
                                             "text": artifact.text, "recipe": artifact.recipe}
                    if artifact.path and Path(artifact.path).is_file():
                        name = f"files/{job.id}/{artifact.kind}-{artifact.position}-" \
                               f"{Path(artifact.path).name}"
                        files.append((name, Path(artifact.path)))
                        entry["file"] = name
                    results.append(entry)
                requests.append({
                    "job": job.id, "kind": job.kind, "intent": job.intent, "state": job.state,
                    "prompt": job.prompt, "expanded_prompt": job.expanded_prompt,
                    "params": job.params, "seed": job.seed, "model": job.model,
                    "platform": job.platform, "created_at": _jsonable(job.created_at),
                    "finished_at": _jsonable(job.finished_at), "results": results})
            data["requests"] = requests
            data["feedback"] = [
                {"job": f.job_id, "platform": f.platform, "kind": f.kind, "value": f.value,
                 "delta": f.delta, "weight": f.weight, "at": _jsonable(f.created_at)}
                for f in s.scalars(select(FeedbackEvent).where(FeedbackEvent.user_id.in_(ids))
                                   .order_by(FeedbackEvent.id))]
            data["profiles"] = {p.kind: p.stats for p in s.scalars(select(Profile).where(
                Profile.subject == "person", Profile.subject_id == person))}
            data["audit"] = [
                {"kind": a.kind, "job": a.job_id, "detail": a.detail,
                 "at": _jsonable(a.created_at)}
                for a in s.scalars(select(AuditEvent).where(or_(
                    AuditEvent.actor_user_id.in_(ids), AuditEvent.subject_user_id.in_(ids))))]
        folder = self._data_dir / EXPORTS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mydata-{person}-{secrets.token_hex(4)}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("data.json", json.dumps(data, indent=2, ensure_ascii=False,
                                                     default=str))
            for name, source in files:
                archive.write(source, name)
        return path, len(data["requests"]), len(files)

    # -- retention ----------------------------------------------------------------------------

    def purge_expired(self, now: datetime | None = None) -> Purged:
        """Erase results and uploads of jobs finished more than ``retention_days`` ago: their
        files, artifact rows and outbox, and the local chat's copies. Prompts, feedback and
        profiles stay (profiles are rebuilt from feedback, which needs the jobs' choices)."""
        days = self.settings.retention_days
        if days <= 0:
            return Purged(0, 0, 0)
        cutoff = (now or utcnow()) - timedelta(days=days)
        final = [JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED]
        with self.store.session() as s:
            job_ids = list(s.scalars(select(Job.id).where(
                Job.state.in_(final), Job.finished_at < cutoff,
                Job.id.in_(select(Artifact.job_id)) | Job.outbox.is_not(None))).all())
            if not job_ids:
                return Purged(0, 0, 0)
            artifacts = list(s.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids))).all())
            s.execute(delete(Artifact).where(Artifact.job_id.in_(job_ids)))
            s.execute(update(Job).where(Job.id.in_(job_ids)).values(outbox=None))
            s.execute(update(LocalMessage).where(LocalMessage.job_id.in_(job_ids),
                                                 LocalMessage.kind == "result")
                      .values(text=f"(erased after {days:g} days)", attachments={}))
        uploads = {a.path for a in artifacts if a.path and a.kind == "input"}
        files = {a.path for a in artifacts if a.path and a.kind != "input"}
        for path in files | uploads:
            Path(path).unlink(missing_ok=True)
        for job_id in job_ids:
            shutil.rmtree(self.settings.artifacts_dir / job_id, ignore_errors=True)
        log.info("retention: erased the results of %d job(s) (%d file(s), %d upload(s))",
                 len(job_ids), len(files), len(uploads))
        return Purged(len(job_ids), len(files), len(uploads))


class RetentionSweeper:
    """Runs :meth:`Privacy.purge_expired` every ``retention_sweep_seconds`` in a thread of the
    bot process (like the redriver); does nothing while ``retention_days`` is 0."""

    def __init__(self, privacy: Privacy, settings: Settings) -> None:
        self._privacy, self._interval = privacy, settings.retention_sweep_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._privacy.purge_expired()
            except Exception:  # the next sweep may succeed
                log.exception("retention sweep failed")

    def start(self) -> RetentionSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

