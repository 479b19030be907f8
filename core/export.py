"""Feedback as training data, in the JSON-lines shapes TRL's trainers read.

* KTO (``trl.KTOTrainer``): ``{"prompt", "completion", "label"}``, one row per result with a
  net opinion (``label`` is True when the weighted feedback on it is positive).
* DPO (``trl.DPOTrainer``): ``{"prompt", "chosen", "rejected"}``, pairs of results of the same
  request (a result and its rerolls, variations and "more like this" runs) with opposite net
  opinions.

For text, a completion is the generated text. For images it is the artifact's file path, and
the row carries the artifact's ``recipe`` (prompt, seed, model, parameters) beside it.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, TextIO

from sqlalchemy import func, select

from core.store import Artifact, FeedbackEvent, Job, Store

__all__ = ["FORMATS", "export_feedback", "rows"]

FORMATS = ("kto", "dpo")


_Scored = tuple[Job, float, list[Artifact], str]  # job, net weight, artifacts, request root


def _scored(store: Store) -> list[_Scored]:
    with store.session() as s:
        scores = dict(s.execute(select(FeedbackEvent.job_id, func.sum(FeedbackEvent.weight))
                                .group_by(FeedbackEvent.job_id)).all())
        jobs = s.scalars(select(Job).where(Job.id.in_(list(scores)))).all()
        artifacts: dict[str, list[Artifact]] = defaultdict(list)
        for artifact in s.scalars(select(Artifact).where(Artifact.job_id.in_(list(scores)))
                                  .order_by(Artifact.position)).all():
            artifacts[artifact.job_id].append(artifact)
        by_id = {j.id: j for j in jobs}
        parents = {j.id: j.parent_job_id for j in s.scalars(select(Job)).all()}
    out = []
    for job_id, score in scores.items():
        job = by_id.get(job_id)
        if job is not None and artifacts.get(job_id):
            out.append((job, float(score or 0.0), artifacts[job_id], _root(job_id, parents)))
    return out


def _root(job_id: str, parents: dict[str, str | None]) -> str:
    seen = set()
    while parents.get(job_id) and job_id not in seen:
        seen.add(job_id)
        job_id = parents[job_id]  # type: ignore[assignment]
    return job_id


def _completion(job: Job, artifacts: list[Artifact]) -> tuple[str, dict[str, Any]]:
    first = artifacts[0]
    if job.kind == "text":
        return first.text or "", {}
    return first.path or "", {"recipe": first.recipe, "images": [a.path for a in artifacts]}


def rows(store: Store, fmt: str) -> Iterator[dict[str, Any]]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    scored = [item for item in _scored(store) if item[1] != 0]
    if fmt == "kto":
        for job, score, artifacts, _ in scored:
            completion, extra = _completion(job, artifacts)
            yield {"prompt": job.prompt, "completion": completion, "label": score > 0,
                   "kind": job.kind, "job_id": job.id, **extra}
        return
    yield from _brainstorm_pairs(store)
    groups: dict[tuple[str, str], list[_Scored]] = defaultdict(list)
    for item in scored:
        groups[(item[3], item[0].prompt)].append(item)
    for (_, prompt), members in groups.items():
        for a, b in itertools.combinations(members, 2):
            if (a[1] > 0) == (b[1] > 0):
                continue
            chosen, rejected = (a, b) if a[1] > b[1] else (b, a)
            chosen_text, chosen_extra = _completion(chosen[0], chosen[2])
            rejected_text, rejected_extra = _completion(rejected[0], rejected[2])
            row: dict[str, Any] = {"prompt": prompt, "chosen": chosen_text,
                                   "rejected": rejected_text, "kind": chosen[0].kind,
                                   "chosen_job_id": chosen[0].id,
                                   "rejected_job_id": rejected[0].id}
            if chosen[0].kind == "image":
                row["chosen_recipe"] = chosen_extra["recipe"]
                row["rejected_recipe"] = rejected_extra["recipe"]
            yield row


def _brainstorm_pairs(store: Store) -> Iterator[dict[str, Any]]:
    """A brainstorm pick is the cleanest preference there is: the picked direction over each
    direction shown beside it, for the same request."""
    with store.session() as s:
        picks = s.execute(select(FeedbackEvent, Job).join(Job, Job.id == FeedbackEvent.job_id)
                          .where(FeedbackEvent.kind == "button",
                                 FeedbackEvent.value.like("pick%"), FeedbackEvent.weight > 0,
                                 Job.intent == "brainstorm")
                          .order_by(FeedbackEvent.id)).all()
    for row, job in picks:
        ideas = job.params.get("ideas") or []
        number = int(row.value[4:]) if row.value[4:].isdigit() else 0
        if not 1 <= number <= len(ideas):
            continue
        chosen = ideas[number - 1]
        for other_number, other in enumerate(ideas, start=1):
            if other_number != number:
                yield {"prompt": job.prompt, "chosen": chosen["prompt"],
                       "rejected": other["prompt"], "kind": "brainstorm",
                       "chosen_job_id": job.id, "rejected_job_id": job.id,
                       "chosen_style": chosen["style"], "rejected_style": other["style"],
                       "feedback_id": row.id}


def export_feedback(store: Store, fmt: str, out: TextIO) -> int:
    count = 0
    for row in rows(store, fmt):
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count
