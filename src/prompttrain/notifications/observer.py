"""The writer observer that turns recorded exchanges into Slack notifications.

Where a notification goes: the train's own webhook (the `slack` block of its train file) when it has one, else
the global SLACK_WEBHOOK_URL / SLACK_CHANNEL. A train whose `slack` block says `"enabled": false` gets none, not
even through the global webhook.

What is sent:
- a turn summary when a `/v1/messages` response ends a turn of an agent conversation (see `slack.turn_summary`),
  once per distinct (train, user text, answer): retries and replays do not repeat it;
- an error notice when the upstream failed: 429, 5xx/529, an in-band stream error, a timeout, a broken or
  unreachable connection, or an account's credentials refused (401/403, not for passthrough trains, whose
  credentials are the client's own). A client's own mistakes (400, 404, 413) are not notified.

It runs in the recording processes, after the row was built: the formatting costs nothing on the request path.
The notices go to the proxy's one Slack sender (`NoticeSink`), which only queues them, so each webhook has one queue
and one rate limit whatever the number of recording processes.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from prompttrain.credentials import CredentialSnapshot, SlackSettings
from prompttrain.notifications import slack
from prompttrain.notifications.sender import Notice
from prompttrain.settings import Settings
from prompttrain.storage.records import BuiltRows, ExchangeRecord, Outcome

SEEN_TURNS = 1000
PASSTHROUGH_ACCOUNT = "passthrough"
CLIENT_MISTAKES = frozenset({400, 404, 405, 413, 422})
FAILURES = frozenset({Outcome.UPSTREAM_ERROR, Outcome.STREAM_ERROR, Outcome.TIMEOUT, Outcome.UNREACHABLE})


# Each configured train and its own `slack` block (None: the train has none and uses the global webhook).
TrainSlack = Mapping[str, SlackSettings | None]


def train_slack(snapshot: CredentialSnapshot) -> dict[str, SlackSettings | None]:
    return {train_id: train.slack for train_id, train in snapshot.trains.items()}


class NoticeSink(Protocol):
    """Takes a notification without waiting: the Slack sender, or the relay from a recording process to it."""

    def offer(self, notice: Notice) -> None: ...


class SlackObserver:
    def __init__(self, sender: NoticeSink, settings: Settings, trains: Callable[[], TrainSlack]) -> None:
        self.sender = sender
        self.trains = trains
        self.global_url = str(settings.slack_webhook_url) if settings.slack_webhook_url else None
        self.global_channel = settings.slack_channel
        self.username = settings.slack_username
        self.icon_emoji = settings.slack_icon_emoji
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def destination(self, train_id: str) -> tuple[str, str | None] | None:
        trains = self.trains()
        own = trains.get(train_id)
        if own is not None:
            if not own.enabled:
                return None
            return own.webhook_url, own.channel
        if train_id not in trains or self.global_url is None:
            return None  # an unknown train: the request was rejected, and rejections are not notified
        return self.global_url, self.global_channel

    def __call__(self, record: ExchangeRecord, built: BuiltRows) -> None:
        if record.account_id is None:
            return
        where = self.destination(record.train_id)
        if where is None:
            return
        row = built.metadata
        if row.get("outcome") in FAILURES:
            if self._notable_failure(record, row):
                self._send(
                    "error",
                    where,
                    slack.error_text(row.get("error_type"), row.get("error_message"), row.get("status_code")),
                    record,
                    row,
                )
            return
        message = built.message
        request = record.request_json()
        if row.get("outcome") != Outcome.COMPLETED or not isinstance(message, dict) or not isinstance(request, dict):
            return
        if not record.path.startswith("/v1/messages") or record.path.startswith("/v1/messages/count_tokens"):
            return
        text = slack.turn_summary(request, message)
        if text is None or not self._first_time(record.train_id, text):
            return
        self._send("turn", where, text, record, row)

    @staticmethod
    def _notable_failure(record: ExchangeRecord, row: dict[str, Any]) -> bool:
        status = row.get("status_code")
        if row.get("outcome") != Outcome.UPSTREAM_ERROR or status is None:
            return True
        if status in CLIENT_MISTAKES:
            return False
        return not (status in (401, 403) and record.account_id == PASSTHROUGH_ACCOUNT)

    def _first_time(self, train_id: str, text: str) -> bool:
        key = hashlib.sha256(f"{train_id}\0{text}".encode()).digest()
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        while len(self._seen) > SEEN_TURNS:
            self._seen.popitem(last=False)
        return True

    def _send(
        self, kind: str, where: tuple[str, str | None], text: str, record: ExchangeRecord, row: dict[str, Any]
    ) -> None:
        url, channel = where
        parts: list[str | None] = [record.train_id, record.model, record.account_id]
        if kind == "turn":
            parts.append(f"Tokens: {row.get('input_tokens', 0)}/{row.get('output_tokens', 0)}")
            cost = row.get("cost_usd")
            if cost:
                parts.append(f"{'~' if row.get('cost_estimated') else ''}${cost:.4f}")
        else:
            parts.append(f"request {record.request_id}")
        body = slack.payload(
            text,
            slack.footer(parts),
            time.time(),
            channel=channel,
            username=self.username,
            icon_emoji=self.icon_emoji,
        )
        self.sender.offer(Notice(kind, url, body))
