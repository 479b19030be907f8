"""``musespark doctor telegram``: checks the bot's setup and says, in plain words, how to fix it.

Checks, against ``MUSESPARK_TELEGRAM_API_URL`` with ``MUSESPARK_TELEGRAM_TOKEN``:

1. the token is valid (getMe);
2. privacy mode (getMe's ``can_read_all_group_messages``): with it on, the bot sees in groups
   only commands, mentions and replies to it, which is all MuseSpark needs; it is reported as
   information, not as a problem;
3. with ``--chat ID``: whether the bot is an admin there (getChatMember). Telegram sends
   reactions from a group only to bots that are admins in it;
4. the webhook (getWebhookInfo): set while polling (getUpdates would fail with 409), missing in
   webhook mode, a different URL, or a recent delivery error.

Exit status: 0 when nothing needs fixing, 1 when something does (or the check could not run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import httpx

from core.settings import Settings, get_settings

__all__ = ["Finding", "check", "main"]

REQUEST_TIMEOUT_SECONDS = 15.0
REACTION_UPDATES = ("message_reaction", "message_reaction_count")


class Finding:
    """One line of the report: ``ok`` (fine), ``info`` or ``problem`` (with the fix)."""

    def __init__(self, level: str, text: str, fix: str = "") -> None:
        self.level, self.text, self.fix = level, text, fix

    def render(self) -> str:
        mark = {"ok": "✔", "info": "•", "problem": "✘"}[self.level]
        return f"{mark} {self.text}" + (f"\n    Fix: {self.fix}" if self.fix else "")


class _Api:
    def __init__(self, settings: Settings, client: httpx.Client) -> None:
        assert settings.telegram_token is not None
        self._token = settings.telegram_token.get_secret_value()
        self._base = f"{settings.telegram_api_url.rstrip('/')}/bot{self._token}"
        self._client = client

    def call(self, method: str, **params: Any) -> tuple[bool, Any, str]:
        """(ok, result, description); never raises for Telegram's own errors."""
        response = self._client.post(f"{self._base}/{method}", json=params)
        try:
            body = response.json()
        except ValueError:
            return False, None, f"HTTP {response.status_code}: not a Bot API answer"
        if body.get("ok"):
            return True, body.get("result"), ""
        return False, None, str(body.get("description") or f"HTTP {response.status_code}")


def check(settings: Settings, *, chat: str | None = None,
          client: httpx.Client | None = None) -> list[Finding]:
    """Run every check; returns the findings in order."""
    if settings.telegram_token is None:
        return [Finding("problem", "MUSESPARK_TELEGRAM_TOKEN is not set.",
                        "Create a bot with @BotFather (/newbot) and put its token in "
                        "MUSESPARK_TELEGRAM_TOKEN.")]
    own_client = client is None
    client = client or httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS)
    api = _Api(settings, client)
    try:
        return _checks(api, settings, chat)
    except httpx.HTTPError as exc:
        return [Finding("problem", f"Cannot reach the Bot API at {settings.telegram_api_url} "
                        f"({type(exc).__name__}).",
                        "Check the network, or MUSESPARK_TELEGRAM_API_URL if you run your own "
                        "Bot API server.")]
    finally:
        if own_client:
            client.close()


def _checks(api: _Api, settings: Settings, chat: str | None) -> list[Finding]:
    findings: list[Finding] = []
    ok, me, error = api.call("getMe")
    if not ok:
        return [Finding("problem", f"Telegram refused the token ({error}).",
                        "Copy the token again from @BotFather (/mybots -> API Token) into "
                        "MUSESPARK_TELEGRAM_TOKEN; /revoke there gives a new one.")]
    findings.append(Finding("ok", f"Token valid: the bot is @{me.get('username')} "
                                  f"(id {me.get('id')})."))
    if me.get("can_read_all_group_messages"):
        findings.append(Finding("info", "Privacy mode is off: the bot receives every group "
                                        "message. MuseSpark answers only commands, mentions "
                                        "and replies, so you may turn privacy on in @BotFather "
                                        "(/setprivacy -> Enable)."))
    else:
        findings.append(Finding("ok", "Privacy mode is on: in groups the bot sees commands, "
                                      "mentions and replies to it (all MuseSpark needs)."))
    if not me.get("can_join_groups", True):
        findings.append(Finding("problem", "The bot cannot be added to groups.",
                                "In @BotFather: /setjoingroups -> Enable."))
    if chat is not None:
        findings.append(_admin_check(api, chat, int(me["id"])))
    findings.extend(_webhook_checks(api, settings))
    return findings


def _admin_check(api: _Api, chat: str, bot_id: int) -> Finding:
    ok, member, error = api.call("getChatMember", chat_id=chat, user_id=bot_id)
    if not ok:
        return Finding("problem", f"Cannot look at chat {chat} ({error}).",
                       "Add the bot to the group first, and pass the chat's numeric id "
                       "(groups start with -100...).")
    status = member.get("status")
    if status in ("administrator", "creator"):
        return Finding("ok", f"The bot is an admin in chat {chat}: reactions there arrive.")
    if status in ("left", "kicked"):
        return Finding("problem", f"The bot is not in chat {chat} (status: {status}).",
                       "Add the bot to the group again.")
    return Finding("problem", f"The bot is not an admin in chat {chat} (status: {status}), so "
                              "Telegram sends it no reactions from there; people can still use "
                              "the 👍/👎 buttons.",
                   "In the group: Manage group -> Administrators -> Add admin -> pick the bot "
                   "(no special rights needed).")


def _webhook_checks(api: _Api, settings: Settings) -> list[Finding]:
    ok, info, error = api.call("getWebhookInfo")
    if not ok:
        return [Finding("problem", f"Cannot read the webhook state ({error}).")]
    url = info.get("url") or ""
    findings: list[Finding] = []
    wanted = settings.telegram_webhook_url
    if not wanted and url:
        findings.append(Finding("problem", f"A webhook is set ({url}) but MuseSpark is set up "
                                           "for long polling: getUpdates fails while it is.",
                                "Set MUSESPARK_TELEGRAM_WEBHOOK_URL to that URL to use the "
                                "webhook, or leave it unset: `musespark bot` removes the "
                                "webhook when it starts polling."))
    elif wanted and url != wanted:
        findings.append(Finding("info", f"The webhook is {url or 'not set'}; MuseSpark will set "
                                        f"it to {wanted} when it starts."))
    elif wanted:
        findings.append(Finding("ok", f"Webhook set to {url}."))
    else:
        findings.append(Finding("ok", "No webhook set: long polling works."))
    if url and info.get("last_error_message"):
        findings.append(Finding("problem", f"Telegram's last delivery to the webhook failed: "
                                           f"{info['last_error_message']}.",
                                "Make the URL reachable from the internet over HTTPS (ports "
                                "443, 80, 88 or 8443) with a valid certificate, forwarding to "
                                "MUSESPARK_TELEGRAM_WEBHOOK_LISTEN:PORT."))
    allowed = info.get("allowed_updates")
    if url and allowed and not all(u in allowed for u in REACTION_UPDATES):
        findings.append(Finding("problem", "The webhook does not ask for reactions "
                                           "(message_reaction, message_reaction_count).",
                                "Restart `musespark bot`: it sets the webhook with them."))
    if info.get("pending_update_count"):
        findings.append(Finding("info", f"{info['pending_update_count']} update(s) wait for "
                                        "the bot; it takes them when it runs."))
    return findings


def main(argv: list[str] | None = None, *, out: TextIO | None = None) -> int:
    """``musespark doctor telegram [--chat ID]``."""
    parser = argparse.ArgumentParser(
        prog="musespark doctor telegram",
        description="Check the Telegram bot's token, privacy mode, admin rights in a group "
                    "(needed for reactions) and webhook, and say how to fix what is wrong.")
    parser.add_argument("--chat", help="a group's chat id: is the bot an admin there?")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    findings = check(get_settings(), chat=args.chat)
    for finding in findings:
        print(finding.render(), file=out)
    problems = sum(f.level == "problem" for f in findings)
    print(f"\n{problems} problem(s) found." if problems else "\nAll good.", file=out)
    return 1 if problems else 0
