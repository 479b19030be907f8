"""Accuracy of the free-text intent classifier: the rules alone against rules + text model.

The labelled set is ``bench/intent_messages.jsonl`` (one JSON object a line: ``text``,
``intent``, ``reply_to_result``). It was written by a separate engineer who did not look at the
rules in ``core/understanding.py``, as a held-out set: the cue words were not tuned on it, so
the numbers here estimate how the classifier does on messages it has not seen.

In one run, over the same messages, it reports side by side:

* rules alone: :func:`core.understanding.classify_rules`. When the rules return None (unsure)
  the message counts as ``write``, the old default behaviour (free text became a text request);
  how many were left undecided is reported too.
* rules + model: the production path. The rules first; only when they return None is the text
  model asked (``workers.understand.read``: the labels scored by the model, then
  :func:`core.understanding.combine`, as ``workers/runner.py`` ``_understand`` does it). When the
  combined confidence is under ``ASK_BELOW`` the bot asks the person with buttons instead of
  guessing; the report counts those, gives the accuracy on the messages that were not asked,
  and the accuracy when an asked message counts as correct (the person picks the right button).

For both: accuracy per true intent and overall, and the confusion matrix (rows = true intent,
columns = predicted) as plain text tables; plus the model's median wall time per message and
the model that answered (``generator.model_name``).

    .venv/bin/python bench/intent_accuracy.py --show-errors
    .venv/bin/python bench/intent_accuracy.py --model-cache /tmp/mscache --json intent.json

The model is the offline SmolLM2 default unless ``MUSESPARK_TEXT_MODEL`` names another. The
model cache is ``--model-cache``, else ``$MUSESPARK_MODEL_CACHE_DIR``, else
``musespark-data/models``; its first use converts the bundled GGUF (about 20 s).

Limits: the set has 200 messages, so one message is 0.5 points overall and several points of a
single intent's accuracy. CPU timings move with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core import understanding  # noqa: E402
from core.understanding import ASK_BELOW, ASK_CHOICES, INTENTS  # noqa: E402
from workers.understand import read  # noqa: E402

DEFAULT_SET = REPO / "bench" / "intent_messages.jsonl"
#: What "rules alone" did with a message the rules could not place.
OLD_DEFAULT = "write"
#: The intents the clarifying question offers as buttons.
ASKABLE = frozenset(intent for intent, _ in ASK_CHOICES)


@dataclass
class Row:
    """One labelled message and what each path made of it."""

    text: str
    intent: str
    replying: bool
    rules: str | None = None  # the rules' decision, None when unsure
    rules_confidence: float | None = None
    final: str = ""  # rules + model: the guess (before asking)
    final_confidence: float = 0.0
    source: str = ""  # "rules" | "model"
    model_seconds: float | None = None

    @property
    def rules_guess(self) -> str:
        return self.rules if self.rules is not None else OLD_DEFAULT

    @property
    def asked(self) -> bool:
        return self.final_confidence < ASK_BELOW


def load_set(path: Path, limit: int | None) -> list[Row]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if item["intent"] not in INTENTS:
            raise SystemExit(f"{path}:{number}: unknown intent {item['intent']!r}")
        rows.append(Row(item["text"], item["intent"], bool(item["reply_to_result"])))
    return rows[:limit] if limit is not None else rows


def default_cache() -> Path:
    return Path(os.environ.get("MUSESPARK_MODEL_CACHE_DIR") or "musespark-data/models")


# -- tables -----------------------------------------------------------------------------------


def table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(correct: int, total: int) -> str:
    return f"{100 * correct / total:.1f}% ({correct}/{total})" if total else "n/a (0)"


def confusion(rows: list[Row], guess: Any) -> dict[str, dict[str, int]]:
    matrix = {t: dict.fromkeys(INTENTS, 0) for t in INTENTS}
    for row in rows:
        matrix[row.intent][guess(row)] += 1
    return matrix


def confusion_table(rows: list[Row], guess: Any, extra: str, count_extra: Any) -> str:
    matrix = confusion(rows, guess)
    present = [t for t in INTENTS if any(r.intent == t for r in rows)]
    body = [[f"{t} (n={sum(matrix[t].values())})", *(matrix[t][p] for p in INTENTS),
             sum(1 for r in rows if r.intent == t and count_extra(r))] for t in present]
    return table(["true \\ predicted", *INTENTS, extra], body)


# -- the run ----------------------------------------------------------------------------------


def run(rows: list[Row], generator: Any) -> None:
    undecided = 0
    for row in rows:
        decided = understanding.classify_rules(row.text, replying=row.replying)
        if decided is not None:
            row.rules, row.rules_confidence = decided.intent, decided.confidence
            row.final, row.final_confidence, row.source = (decided.intent, decided.confidence,
                                                           "rules")
            continue
        undecided += 1
        start = time.perf_counter()
        combined = read(generator, row.text, replying=row.replying)  # what the worker runs
        row.model_seconds = time.perf_counter() - start
        row.final, row.final_confidence, row.source = (combined.intent, combined.confidence,
                                                       "model")
        print(f"  model {undecided}: {row.model_seconds:.2f} s  {combined.intent:<10} "
              f"{combined.confidence:.2f}  {row.text[:60]!r}", file=sys.stderr, flush=True)


def summarise(rows: list[Row], model_name: str) -> dict[str, Any]:
    n = len(rows)
    rules_ok = sum(r.rules_guess == r.intent for r in rows)
    undecided = [r for r in rows if r.rules is None]
    decided = [r for r in rows if r.rules is not None]
    final_ok = sum(r.final == r.intent for r in rows)
    asked = [r for r in rows if r.asked]
    not_asked = [r for r in rows if not r.asked]
    not_asked_ok = sum(r.final == r.intent for r in not_asked)
    asked_unofferable = [r for r in asked if r.intent not in ASKABLE]
    by_model = [r for r in rows if r.source == "model"]
    seconds = [r.model_seconds for r in by_model if r.model_seconds is not None]

    per_intent = {}
    for t in INTENTS:
        mine = [r for r in rows if r.intent == t]
        mine_not_asked = [r for r in mine if not r.asked]
        per_intent[t] = {
            "n": len(mine),
            "rules_alone_correct": sum(r.rules_guess == t for r in mine),
            "rules_undecided": sum(r.rules is None for r in mine),
            "rules_model_correct": sum(r.final == t for r in mine),
            "asked": len(mine) - len(mine_not_asked),
            "not_asked": len(mine_not_asked),
            "not_asked_correct": sum(r.final == t for r in mine_not_asked),
        }
    return {
        "messages": n,
        "model": model_name,
        "ask_below": ASK_BELOW,
        "rules_alone": {
            "correct": rules_ok, "accuracy": rules_ok / n if n else None,
            "undecided": len(undecided),
            "decided": len(decided),
            "decided_correct": sum(r.rules == r.intent for r in decided),
            "undecided_default": OLD_DEFAULT,
            "confusion": confusion(rows, lambda r: r.rules_guess),
        },
        "rules_model": {
            "correct": final_ok, "accuracy": final_ok / n if n else None,
            "by_rules": n - len(by_model), "by_model": len(by_model),
            "by_model_correct": sum(r.final == r.intent for r in by_model),
            "asked": len(asked),
            "asked_true_intent_not_a_button": len(asked_unofferable),
            "not_asked": len(not_asked),
            "not_asked_correct": not_asked_ok,
            "accuracy_not_asked": not_asked_ok / len(not_asked) if not_asked else None,
            "accuracy_asked_counted_correct": (not_asked_ok + len(asked)) / n if n else None,
            "accuracy_asked_counted_correct_if_a_button":
                (not_asked_ok + len(asked) - len(asked_unofferable)) / n if n else None,
            "confusion": confusion(rows, lambda r: r.final),
        },
        "model_seconds_median": statistics.median(seconds) if seconds else None,
        "model_seconds_max": max(seconds) if seconds else None,
        "per_intent": per_intent,
    }


def report(rows: list[Row], summary: dict[str, Any], show_errors: bool) -> None:
    n = summary["messages"]
    ra, rm = summary["rules_alone"], summary["rules_model"]
    seconds = summary["model_seconds_median"]
    print(f"\nIntent accuracy on {n} held-out messages "
          f"({sum(r.replying for r in rows)} replying to a result)")
    print(f"Model: {summary['model']}; asked {rm['by_model']} messages the rules left undecided, "
          + (f"median {seconds:.2f} s per message (max {summary['model_seconds_max']:.2f} s)"
             if seconds is not None else "no model call needed"))

    print("\n== Overall ==")
    print(table(["", "rules alone", "rules + model"], [
        ["accuracy (every message gets a guess)", pct(ra["correct"], n), pct(rm["correct"], n)],
        ["decided by rules", f"{ra['decided']}", f"{rm['by_rules']}"],
        ["left undecided by rules", f"{ra['undecided']} -> '{OLD_DEFAULT}'",
         f"{rm['by_model']} -> model"],
        ["accuracy where the rules decided", pct(ra["decided_correct"], ra["decided"]),
         pct(ra["decided_correct"], ra["decided"])],
        ["accuracy of the model on those left", "", pct(rm["by_model_correct"], rm["by_model"])],
    ]))

    print(f"\n== Rules + model with the clarifying question (asks when confidence < "
          f"{ASK_BELOW}) ==")
    asked_ok = rm["not_asked_correct"] + rm["asked"]
    offer_ok = asked_ok - rm["asked_true_intent_not_a_button"]
    print(table(["", "value"], [
        ["messages the bot would ASK about", f"{rm['asked']} of {n}"],
        ["accuracy on the messages NOT asked about", pct(rm["not_asked_correct"],
                                                          rm["not_asked"])],
        ["accuracy counting ASKED as correct (person picks)", pct(asked_ok, n)],
        [f"  ... asked, true intent not a button ({'/'.join(sorted(ASKABLE))})",
         f"{rm['asked_true_intent_not_a_button']}"],
        ["accuracy counting ASKED as correct only if a button fits", pct(offer_ok, n)],
    ]))

    print("\n== Per intent (accuracy = share of that true intent routed right) ==")
    body = []
    for t, p in summary["per_intent"].items():
        if not p["n"]:
            continue
        body.append([t, p["n"], pct(p["rules_alone_correct"], p["n"]), p["rules_undecided"],
                     pct(p["rules_model_correct"], p["n"]), p["asked"],
                     pct(p["not_asked_correct"], p["not_asked"])])
    print(table(["intent", "n", "rules alone", "undecided", "rules + model", "asked",
                 "r+m, not asked"], body))

    print(f"\n== Confusion: rules alone (undecided counted as '{OLD_DEFAULT}'; last column: "
          "how many of the row were undecided) ==")
    print(confusion_table(rows, lambda r: r.rules_guess, "undecided", lambda r: r.rules is None))
    print("\n== Confusion: rules + model (the guess, asked or not; last column: how many of "
          "the row would be asked) ==")
    print(confusion_table(rows, lambda r: r.final, "asked", lambda r: r.asked))

    if show_errors:
        print("\n== Misclassified by either path (rules= rules alone, r+m= rules + model, its "
              "source and confidence) ==")
        for r in rows:
            if r.rules_guess == r.intent and r.final == r.intent:
                continue
            rules = r.rules or f"(none->{OLD_DEFAULT})"
            mark = " ASKED" if r.asked else ""
            reply = " [reply]" if r.replying else ""
            print(f"true={r.intent:<10} rules={rules:<16} r+m={r.final:<10} "
                  f"{r.source:<5} {r.final_confidence:.2f}{mark}{reply}  {r.text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="converted model cache (default: $MUSESPARK_MODEL_CACHE_DIR or "
                             "musespark-data/models)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N messages")
    parser.add_argument("--show-errors", action="store_true", help="print misclassified messages")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--set", type=Path, default=DEFAULT_SET, help="labelled JSONL")
    parser.add_argument("--device", default=os.environ.get("MUSESPARK_DEVICE", "auto"),
                        help="auto, cpu, cuda, ... (default: $MUSESPARK_DEVICE or auto)")
    args = parser.parse_args(argv)

    rows = load_set(args.set, args.limit)
    if not rows:
        raise SystemExit(f"no messages in {args.set}")
    cache = args.model_cache or default_cache()
    spec = os.environ.get("MUSESPARK_TEXT_MODEL") or None

    from workers.pipelines.text_causal_lm import get_text_generator

    start = time.perf_counter()
    generator = get_text_generator(spec, cache, args.device)
    print(f"loaded {generator.model_name} on {generator.device} in "
          f"{time.perf_counter() - start:.1f} s (cache {cache})", file=sys.stderr, flush=True)

    run(rows, generator)
    summary = summarise(rows, generator.model_name)
    report(rows, summary, args.show_errors)
    if args.json:
        summary["errors"] = [
            {"text": r.text, "intent": r.intent, "replying": r.replying, "rules": r.rules,
             "rules_model": r.final, "source": r.source,
             "confidence": round(r.final_confidence, 3), "asked": r.asked}
            for r in rows if r.rules_guess != r.intent or r.final != r.intent]
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
