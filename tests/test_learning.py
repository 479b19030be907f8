"""The adaptive loop: signals, weights, caps, undo, opt-out, forgetting, rebuild, exports."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from core import taste
from core.export import export_feedback
from core.orchestrator import Orchestrator
from core.queue import RecordingPublisher
from core.settings import Settings
from core.store import FeedbackEvent, Store, utcnow
from tests._sim import SimChat


@pytest.fixture
def orchestrator(each_store: Store, tmp_path: Path) -> Orchestrator:
    """The real orchestrator and store on SQLite, and on PostgreSQL (its own database)."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    return Orchestrator(each_store, RecordingPublisher(), settings, rng=random.Random(7))


@pytest.fixture
def chat(orchestrator: Orchestrator) -> SimChat:
    return SimChat(orchestrator)


def _person_profile(orchestrator: Orchestrator, name: str, kind: str = "image") -> taste.Posterior:
    from core.events import Actor

    user = orchestrator.store.ensure_user("sim", Actor(name, name))
    return orchestrator.taste.profile("person", orchestrator.taste.person_of(user), kind)[0]


def _community_profile(orchestrator: Orchestrator, kind: str = "image") -> taste.Posterior:
    from core.events import Channel, ChannelKind

    community = orchestrator.store.ensure_community("sim", Channel("g1", ChannelKind.GROUP,
                                                                   guild_id="g1"))
    return orchestrator.taste.profile("community", community, kind)[0]


def _style_of(orchestrator: Orchestrator, job_id: str) -> str:
    return orchestrator.store.get_job(job_id).params["taste"]["choice"]["style"]  # type: ignore[union-attr]


def _weights(orchestrator: Orchestrator) -> list[float]:
    with orchestrator.store.session() as s:
        return [row.weight for row in s.query(FeedbackEvent).order_by(FeedbackEvent.id)]


@pytest.mark.parametrize(("emoji", "sign"), [(e, 1) for e in ("👍", "❤️", "🔥", "😍", "⭐")]
                         + [(e, -1) for e in ("👎", "😐", "💩")] + [("🦄", 0), ("🤔", 0)])
def test_every_default_emoji_means_what_the_table_says(chat: SimChat, orchestrator: Orchestrator,
                                                       emoji: str, sign: int) -> None:
    job_id, message = chat.ask("ann", "/imagine a fox")
    chat.react("ann", message, emoji)
    style = _style_of(orchestrator, job_id)
    a, b = _person_profile(orchestrator, "ann").get("style", {}).get(style, [0.0, 0.0])
    expected = taste.REQUESTER_WEIGHT * sign
    assert (a - b) == pytest.approx(expected)
    assert _weights(orchestrator) == [pytest.approx(expected)]


def test_a_community_admin_changes_what_an_emoji_means(chat: SimChat,
                                                       orchestrator: Orchestrator) -> None:
    from core.events import Actor, MessageReceived

    job_id, message = chat.ask("ann", "/imagine a fox")
    event = MessageReceived(platform="sim", event_id="settings-1", channel=chat.channel,
                            actor=Actor("boss", "Boss", is_admin=True),
                            text="/settings emoji 🦄 positive")
    (reply,) = orchestrator.handle(event)
    assert "now counts as positive" in reply.text
    refused = orchestrator.handle(MessageReceived(
        platform="sim", event_id="settings-2", channel=chat.channel, actor=Actor("ann", "ann"),
        text="/settings emoji 👍 negative"))
    assert refused[0].kind == "error" and "admin" in refused[0].text
    chat.react("ann", message, "🦄")
    assert _weights(orchestrator) == [pytest.approx(taste.REQUESTER_WEIGHT)]


@pytest.mark.parametrize("emoji", ["👍", "👎"])
def test_removing_a_reaction_undoes_its_signal(chat: SimChat, orchestrator: Orchestrator,
                                               emoji: str) -> None:
    (_, first), (_, second) = chat.ask_takes("ann", "/imagine a fox")
    chat.react("ann", second, "👎")
    before = [_person_profile(orchestrator, "ann"), _person_profile(orchestrator, "bob"),
              _community_profile(orchestrator)]
    chat.react("ann", first, emoji)
    chat.react("bob", first, "🔥")
    assert _person_profile(orchestrator, "ann") != before[0]
    chat.react("ann", first, emoji, remove=True)
    chat.react("bob", first, "🔥", remove=True)
    after = [_person_profile(orchestrator, "ann"), _person_profile(orchestrator, "bob"),
             _community_profile(orchestrator)]
    for old, new in zip(before, after, strict=True):
        # Every count is back where it was: not just the net, the evidence too.
        for dim, vals in new.items():
            for val, ab in vals.items():
                assert ab == pytest.approx(old.get(dim, {}).get(val, [0.0, 0.0]))


def test_a_picture_request_renders_takes_in_different_styles(chat: SimChat,
                                                             orchestrator: Orchestrator) -> None:
    takes = orchestrator.settings.image_takes
    assert takes == 2, "the default"
    jobs = [orchestrator.store.get_job(job_id)
            for job_id, _ in chat.ask_takes("ann", "/imagine a fox")]
    choices = [job.params["taste"]["choice"] for job in jobs]  # type: ignore[union-attr]
    assert len({c["style"] for c in choices}) == takes, "each take has its own style"
    assert len({(c["guidance"], c["aspect"]) for c in choices}) == 1, "the rest is shared"
    for index, job in enumerate(jobs):
        assert job is not None
        assert job.params["takes"] == {"index": index, "of": takes,
                                       "siblings": [c for c in choices if c != choices[index]]}
        assert job.params["taste"]["choice"]["style"] in job.expanded_prompt.replace(" ", "-") or \
            taste.CATALOGUE["image"]["style"][choices[index]["style"]]["prompt"] in job.expanded_prompt
    # A named style, a number of pictures, a follow-up: one result, as asked.
    for text in ("/imagine a fox --style anime", "/imagine a fox --count 2"):
        assert len(chat.ask_takes("ann", text)) == 1, text
    replies = chat.press("ann", chat.ask_takes("ann", "/imagine an owl")[0][1],
                         f"reroll:{jobs[0].id}")  # type: ignore[union-attr]
    assert len([r for r in replies if r.job_id]) == 1
    assert "takes" not in orchestrator.store.get_job(replies[0].job_id).params  # type: ignore[union-attr,arg-type]


def test_picking_a_take_counts_against_the_other_style(chat: SimChat,
                                                       orchestrator: Orchestrator) -> None:
    (first_job, first), (second_job, _) = chat.ask_takes("ann", "/imagine a fox")
    picked = _style_of(orchestrator, first_job)
    passed = _style_of(orchestrator, second_job)
    chat.react("ann", first, "👍")
    for profile, weight in ((_person_profile(orchestrator, "ann"), taste.REQUESTER_WEIGHT),
                            (_community_profile(orchestrator), taste.REQUESTER_WEIGHT)):
        assert profile["style"][picked] == pytest.approx([weight, 0.0])
        assert profile["style"][passed] == pytest.approx([0.0, weight * taste.PASSED_OVER_WEIGHT])
        # The shared values are compared with nothing: they get the 👍 alone.
        guidance = orchestrator.store.get_job(first_job).params["taste"]["choice"]["guidance"]  # type: ignore[union-attr]
        assert profile["guidance"][guidance] == pytest.approx([weight, 0.0])
    # A 👎 on a take says nothing about the other one.
    (third_job, third), (fourth_job, _) = chat.ask_takes("ann", "/imagine a cat")
    before = _person_profile(orchestrator, "ann")
    chat.react("ann", third, "👎")
    after = _person_profile(orchestrator, "ann")
    other = _style_of(orchestrator, fourth_job)
    assert other != _style_of(orchestrator, third_job)
    assert after["style"].get(other) == before["style"].get(other)


def test_a_repeated_request_event_makes_no_extra_takes(orchestrator: Orchestrator) -> None:
    from core.events import Actor, Channel, ChannelKind, MessageReceived

    event = MessageReceived(platform="sim", event_id="same-event", actor=Actor("ann", "ann"),
                            channel=Channel("g1", ChannelKind.GROUP, guild_id="g1"),
                            text="/imagine a fox")
    assert orchestrator.handle(event)
    assert orchestrator.handle(event) == []
    with orchestrator.store.session() as s:
        from core.store import Job

        assert s.query(Job).count() == orchestrator.settings.image_takes


def test_the_requester_weighs_more_than_a_bystander_and_bots_not_at_all(
        chat: SimChat, orchestrator: Orchestrator) -> None:
    _, message = chat.ask("ann", "/imagine a fox")
    chat.react("ann", message, "👍")
    chat.react("bob", message, "👍")
    chat.react("robot", message, "👍", is_bot=True)
    assert _weights(orchestrator) == [pytest.approx(taste.REQUESTER_WEIGHT),
                                      pytest.approx(taste.BYSTANDER_WEIGHT)]
    assert taste.REQUESTER_WEIGHT > taste.BYSTANDER_WEIGHT


def test_one_actor_moves_profiles_only_so_far_per_hour(chat: SimChat,
                                                       orchestrator: Orchestrator) -> None:
    start = utcnow()
    messages = [chat.ask("ann", f"/imagine fox {i}")[1] for i in range(20)]
    for i, message in enumerate(messages):
        chat.react("troll", message, "💩", at=start + timedelta(minutes=i))
    assert sum(abs(w) for w in _weights(orchestrator)) == pytest.approx(taste.HOURLY_CAP)
    chat.react("troll", messages[0], "👎", at=start + timedelta(minutes=70))
    assert abs(_weights(orchestrator)[-1]) > 0, "the cap must lift after an hour"


def test_anonymous_counts_move_the_community_only(chat: SimChat,
                                                  orchestrator: Orchestrator) -> None:
    job_id, message = chat.ask("ann", "/imagine a fox")
    chat.count(message, {"👍": 3})
    chat.count(message, {"👍": 5, "👎": 1})
    style = _style_of(orchestrator, job_id)
    a, b = _community_profile(orchestrator)["style"][style]
    assert a == pytest.approx(5 * taste.ANONYMOUS_WEIGHT) and b == pytest.approx(taste.ANONYMOUS_WEIGHT)
    assert _person_profile(orchestrator, "ann") == {}


def test_buttons_are_signals_and_more_like_this_keeps_the_style(
        chat: SimChat, orchestrator: Orchestrator) -> None:
    job_id, message = chat.ask("ann", "/imagine a fox")
    replies = chat.press("ann", message, f"more:{job_id}")
    (status,) = replies
    assert _style_of(orchestrator, status.job_id) == _style_of(orchestrator, job_id)
    chat.press("ann", message, f"down:{job_id}")
    assert _weights(orchestrator) == [pytest.approx(1.0), pytest.approx(-1.0)]
    (why,) = chat.press("bob", message, f"why:{job_id}")
    assert "Why this" in why.text and _style_of(orchestrator, job_id) in why.text


def test_learning_opt_out_is_honoured_at_once(chat: SimChat, orchestrator: Orchestrator) -> None:
    from core.events import Actor, MessageReceived

    _, message = chat.ask("ann", "/imagine a fox")
    (reply,) = orchestrator.handle(MessageReceived(platform="sim", event_id="optout",
                                                   actor=Actor("ann", "ann"),
                                                   channel=chat.channel,
                                                   text="/settings learning off"))
    assert "no longer learn" in reply.text
    chat.react("ann", message, "👍")
    assert _weights(orchestrator) == []
    assert _person_profile(orchestrator, "ann") == {}
    job_id, _ = chat.ask("ann", "/imagine a cat")
    assert "opted out" in orchestrator.store.get_job(job_id).params["taste"]["why"]  # type: ignore[union-attr]


def test_forget_feedback_leaves_no_row_and_rebuilds_profiles(chat: SimChat,
                                                             orchestrator: Orchestrator) -> None:
    from core.events import Actor, MessageReceived

    _, message = chat.ask("ann", "/imagine a fox")
    chat.react("ann", message, "👍")
    chat.react("bob", message, "👎")
    (reply,) = orchestrator.handle(MessageReceived(platform="sim", event_id="forget",
                                                   actor=Actor("ann", "ann"),
                                                   channel=chat.channel, text="/forget feedback"))
    assert "erased 1" in reply.text
    with orchestrator.store.session() as s:
        rows = s.query(FeedbackEvent).all()
        assert [r.user_id for r in rows] != [] and all(
            r.user_id != orchestrator.store.ensure_user("sim", Actor("ann", "ann")) for r in rows)
    assert _person_profile(orchestrator, "ann") == {}
    community = _community_profile(orchestrator)
    assert sum(a for vals in community.values() for a, _ in vals.values()) == pytest.approx(0.0)
    assert sum(b for vals in community.values() for _, b in vals.values()) > 0


def test_a_profile_rebuilt_from_the_log_equals_the_live_one(chat: SimChat,
                                                            orchestrator: Orchestrator) -> None:
    rng = random.Random(3)
    start = utcnow()
    people = ["ann", "bob", "cyd", "troll"]
    messages = []
    for i in range(30):
        person = rng.choice(people[:3])
        messages.append(chat.ask(person, rng.choice(["/imagine a fox", "/write a poem"]))[1])
        for reactor in rng.sample(people, 2):
            chat.react(reactor, rng.choice(messages), rng.choice(["👍", "👎", "🔥", "😐", "🦄"]),
                       at=start + timedelta(minutes=i))
        if rng.random() < 0.3:
            chat.react(rng.choice(people), rng.choice(messages), "👍", remove=True,
                       at=start + timedelta(minutes=i))
    chat.count(messages[0], {"👍": 4})
    live = orchestrator.taste.all_profiles()
    live_weights = _weights(orchestrator)
    rebuilt = orchestrator.taste.rebuild()
    assert live and set(live) == set(rebuilt)
    for key, (stats, version) in live.items():
        assert rebuilt[key][1] == version
        for dim, vals in stats.items():
            for val, (a, b) in vals.items():
                assert rebuilt[key][0][dim][val] == pytest.approx([a, b]), key
    assert _weights(orchestrator) == pytest.approx(live_weights)


def test_generation_follows_what_people_liked(chat: SimChat, orchestrator: Orchestrator) -> None:
    start = utcnow()
    for i in range(40):
        job_id, message = chat.ask("ann", "/imagine a fox", at=start + timedelta(hours=i))
        liked = _style_of(orchestrator, job_id) == "watercolor"
        chat.react("ann", message, "👍" if liked else "👎", at=start + timedelta(hours=i))
    styles = Counter(_style_of(orchestrator, chat.ask("ann", "/imagine a fox")[0])
                     for _ in range(20))
    assert styles["watercolor"] >= 14, styles
    job = orchestrator.store.get_job(chat.ask("ann", "/imagine a fox")[0])
    assert job is not None
    style = job.params["taste"]["choice"]["style"]
    assert job.expanded_prompt == f"a fox, {taste.CATALOGUE['image']['style'][style]['prompt']}"
    assert job.params["taste"]["profile_version"]["person"] >= 40


def test_a_newcomer_starts_from_the_communitys_taste(chat: SimChat,
                                                     orchestrator: Orchestrator) -> None:
    start = utcnow()
    for i in range(60):
        person = f"member{i % 6}"
        job_id, message = chat.ask(person, "/imagine a fox", at=start + timedelta(hours=i))
        liked = _style_of(orchestrator, job_id) == "pixel-art"
        chat.react(person, message, "👍" if liked else "👎", at=start + timedelta(hours=i))
    styles = Counter(_style_of(orchestrator, chat.ask("newcomer", "/imagine a fox")[0])
                     for _ in range(20))
    assert styles["pixel-art"] >= 10, styles


def test_exports_parse_as_trl_kto_and_dpo(chat: SimChat, orchestrator: Orchestrator) -> None:
    job_id, message = chat.ask("ann", "/write a poem about rain")
    chat.react("ann", message, "👍")
    (status,) = chat.press("ann", message, f"reroll:{job_id}")
    from tests._sim import deliver

    reroll_message = deliver(orchestrator.store, status.job_id, text="another poem")
    chat.react("ann", reroll_message, "👎")
    image_job, image_message = chat.ask("bob", "/imagine a fox")
    chat.react("bob", image_message, "🔥")

    kto = io.StringIO()
    assert export_feedback(orchestrator.store, "kto", kto) == 3
    rows = [json.loads(line) for line in kto.getvalue().splitlines()]
    for row in rows:
        assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)
        assert isinstance(row["label"], bool)
    by_job = {r["job_id"]: r for r in rows}
    assert by_job[image_job]["completion"].endswith(".png") and by_job[image_job]["recipe"]
    assert by_job[status.job_id]["label"] is False
    # The reroll press itself is a (weak) negative on the first result, the 👍 outweighs it.
    assert by_job[job_id]["label"] is True

    dpo = io.StringIO()
    assert export_feedback(orchestrator.store, "dpo", dpo) == 1
    (pair,) = [json.loads(line) for line in dpo.getvalue().splitlines()]
    assert pair["prompt"] == "a poem about rain"
    assert pair["chosen"] == "a result" and pair["rejected"] == "another poem"


def test_upscale_renders_the_same_picture_bigger(chat: SimChat, orchestrator: Orchestrator) -> None:
    job_id, message = chat.ask("ann", "/imagine a fox --count 2")
    (status,) = chat.press("bob", message, f"upscale:{job_id}")
    first, bigger = orchestrator.store.get_job(job_id), orchestrator.store.get_job(status.job_id)
    assert first is not None and bigger is not None
    assert bigger.seed == first.seed and bigger.params["scale"] == 2 and bigger.params["count"] == 1
    assert bigger.params["taste"]["choice"] == first.params["taste"]["choice"]
    text_job, text_message = chat.ask("ann", "/write a poem")
    (refusal,) = chat.press("ann", text_message, f"upscale:{text_job}")
    assert refusal.kind == "error" and "pictures" in refusal.text


def test_profile_shows_the_learned_taste_in_words_and_as_a_chart(
        chat: SimChat, orchestrator: Orchestrator) -> None:
    from PIL import Image

    from core.events import Actor, MessageReceived

    job_id, message = chat.ask("ann", "/imagine a fox")
    chat.react("ann", message, "👍")
    (reply,) = orchestrator.handle(MessageReceived(platform="sim", event_id="profile-1",
                                                   actor=Actor("ann", "ann"),
                                                   channel=chat.channel, text="/profile"))
    style = _style_of(orchestrator, job_id)
    assert f"style {style} (67% liked)" in reply.text
    assert "from 1.0 weighted reactions" in reply.text
    assert "Your writing: nothing learned yet" in reply.text
    (chart,) = reply.images
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width > 200


def test_variation_strength_is_chosen_and_learned_only_for_variations(
        chat: SimChat, orchestrator: Orchestrator) -> None:
    from tests._sim import deliver

    job_id, message = chat.ask("ann", "/imagine a fox --style anime")
    job = orchestrator.store.get_job(job_id)
    assert job is not None and "variation" not in job.params["taste"]["choice"]
    factor = taste.CATALOGUE["image"]["steps"][job.params["taste"]["choice"]["steps"]]["factor"]
    assert job.params["steps_factor"] == factor
    chat.react("ann", message, "👍")
    assert "variation" not in _person_profile(orchestrator, "ann")

    replies = chat.press("ann", message, f"vary1:{job_id}")
    varied = orchestrator.store.get_job(replies[0].job_id)
    assert varied is not None
    chosen = varied.params["taste"]["choice"]["variation"]
    assert varied.params["variation_strength"] == \
        taste.CATALOGUE["image"]["variation"][chosen]["strength"]
    assert varied.params["vary_from"] == {"job_id": job_id, "position": 0}
    chat.react("ann", deliver(orchestrator.store, varied.id), "👎")
    assert _person_profile(orchestrator, "ann")["variation"] == {chosen: [0.0, 1.0]}


def test_a_replayed_reaction_is_a_no_op_while_add_remove_add_counts_three_times(
        chat: SimChat, orchestrator: Orchestrator) -> None:
    """Reaction ids are pure functions of the payload; Discord's name only the transition
    (``message:user:emoji:add``), so the log's state tells a replay from a genuine add-again."""
    from concurrent.futures import ThreadPoolExecutor

    from core.events import Actor, ReactionChanged, ReactionsCleared

    _, message = chat.ask("ann", "/imagine a fox")
    add, remove = (ReactionChanged(
        platform="sim", event_id=f"{message}:bob:👍:{kind}", actor=Actor("bob", "bob"),
        channel=chat.channel, message_id=message, **{field: frozenset({"👍"})})
        for kind, field in (("add", "added"), ("remove", "removed")))
    clear = ReactionsCleared(platform="sim", event_id=f"{message}:clear:*", actor=Actor("0"),
                             channel=chat.channel, message_id=message)
    w = taste.BYSTANDER_WEIGHT

    with ThreadPoolExecutor(8) as pool:  # copies racing each other still count once
        assert list(pool.map(orchestrator.handle, [add] * 8)) == [[]] * 8
    assert _weights(orchestrator) == pytest.approx([w])
    for event in (remove, remove, add, add):
        orchestrator.handle(event)
    assert _weights(orchestrator) == pytest.approx([w, -w, w])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(orchestrator.handle, [clear] * 4))
    assert _weights(orchestrator) == pytest.approx([w, -w, w, -w])
    orchestrator.handle(remove)  # nothing stands any more
    orchestrator.handle(add)
    orchestrator.handle(clear)  # the same clear again, with a reaction standing: it counts
    assert _weights(orchestrator) == pytest.approx([w, -w, w, -w, w, -w])
    live = orchestrator.taste.all_profiles()
    rebuilt = orchestrator.taste.rebuild()
    assert {k: v[1] for k, v in live.items()} == {k: v[1] for k, v in rebuilt.items()}
