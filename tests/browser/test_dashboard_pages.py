"""The dashboard as a person uses it: Playwright drives chromium against a live proxy and dashboard on PostgreSQL.

Every test saves screenshots of the pages it visits under test-artifacts/screenshots/.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import anthropic
import pytest

from tests.browser.conftest import Stack, Watched, log_in
from tests.browser.support import DASHBOARD_KEY, conversation_rows, insert, notify, request_row
from tests.helpers import FakeUpstream

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

LIVE_SECONDS = 2.0


def client(stack: Stack, train: str = "default") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.proxy.url, api_key="sk-ant-own-key", default_headers={"train-id": train}, max_retries=0
    )


def send(stack: Stack, text: str, train: str = "default") -> str:
    """One request through the proxy with the SDK; returns the proxy's request id."""
    raw = client(stack, train).messages.with_raw_response.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": text}]
    )
    return str(raw.headers["x-prompttrain-request-id"])


def test_wrong_key_is_refused_and_the_right_one_logs_in(stack: Stack, watched: Watched) -> None:
    page = watched.page
    page.goto(stack.dashboard.url + "/requests?train_id=default")
    assert page.url.startswith(stack.dashboard.url + "/login?next=")
    page.fill("input[name=key]", "not-the-key")
    with page.expect_response(lambda response: response.request.method == "POST") as refused:
        page.click(".login button[type=submit]")
    assert refused.value.status == 401
    assert page.get_by_role("alert").inner_text() == "That key is not right."
    watched.screenshot("login-refused")
    page.fill("input[name=key]", DASHBOARD_KEY)
    page.click(".login button[type=submit]")
    page.wait_for_url(stack.dashboard.url + "/requests?train_id=default")
    assert page.get_by_role("heading", name="Requests").is_visible()
    cookie = next(item for item in page.context.cookies() if item["name"] == "prompttrain_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    page.click("text=Log out")
    page.wait_for_url(stack.dashboard.url + "/login")
    page.goto(stack.dashboard.url + "/")
    assert "/login" in page.url


def test_a_request_appears_live_then_its_detail_shows_the_tool_use(
    stack: Stack, watched: Watched, upstream: FakeUpstream
) -> None:
    page = watched.page
    log_in(watched, stack.dashboard)
    page.wait_for_selector("#live-status[data-state=on]")
    page.evaluate("window.__sameDocument = true")
    upstream.script(
        {
            "content": [
                {"type": "thinking", "thinking": "The user wants the hosts file."},
                {"type": "text", "text": "Reading it now."},
                {"type": "tool_use", "name": "Read", "input": {"file_path": "/etc/hosts"}},
            ],
            "stop_reason": "tool_use",
        }
    )
    request_id = send(stack, "Show me /etc/hosts")
    sent = time.monotonic()
    row = page.locator(f"#request-rows tr[data-id='{request_id}']")
    row.wait_for(state="visible", timeout=LIVE_SECONDS * 1000)
    appeared = time.monotonic() - sent
    assert appeared < LIVE_SECONDS
    assert page.evaluate("window.__sameDocument") is True  # no reload
    assert "claude-haiku-4-5" in row.inner_text()
    watched.screenshot("requests-live")

    row.locator("a").first.click()
    page.wait_for_url(f"{stack.dashboard.url}/requests/{request_id}")
    tool = page.locator(".block.tool-use")
    assert tool.locator("strong").inner_text() == "Read"
    assert "/etc/hosts" in tool.locator("pre").inner_text()
    assert page.locator(".block.thinking summary").inner_text() == "Thinking"
    assert "Show me /etc/hosts" in page.locator(".message.user").inner_text()
    page.locator("details.raw summary").click()
    page.locator("[data-json-tree] .key").first.wait_for()
    watched.screenshot("request-detail")
    page.check("#hide-tools")
    assert not tool.is_visible()
    assert watched.errors == []


def test_conversation_tree_shows_the_subagent_branch_and_updates_live(stack: Stack, watched: Watched) -> None:
    page = watched.page
    conversation = uuid.uuid4()
    rows = conversation_rows(conversation)
    insert(stack.database_url, rows)
    log_in(watched, stack.dashboard, "/conversations")
    listed = page.locator(f"a[href='/conversations/{conversation}']")
    assert listed.is_visible()
    cells = listed.locator("xpath=ancestor::tr").inner_text()
    assert "5" in cells  # requests
    watched.screenshot("conversations")

    listed.click()
    page.wait_for_url(f"{stack.dashboard.url}/conversations/{conversation}")
    branch = page.locator("a[data-branch='subtask_1']")
    assert branch.is_visible()
    assert "Survey the test suite" in branch.locator("xpath=ancestor::tr").inner_text()
    assert page.locator("svg.graph .node.subagent").count() == 2
    assert page.locator("svg.graph .edge.subagent").count() == 1
    watched.screenshot("conversation-tree")

    page.evaluate("window.__sameDocument = true")
    page.wait_for_selector("#live-status[data-state=on]")
    later = request_row(
        conversation_id=conversation,
        branch_id="main",
        parent_request_id=rows[-1]["request_id"],
        model="claude-opus-4-1",
    )
    insert(stack.database_url, [later])
    notify(stack.database_url, [later])
    page.locator(f"svg.graph a[data-request='{later['request_id']}']").wait_for(timeout=LIVE_SECONDS * 1000)
    assert page.locator("[data-requests]").inner_text() == "6"
    assert page.evaluate("window.__sameDocument") is True

    branch.click()
    page.wait_for_url("**branch=subtask_1**")
    assert page.locator("svg.graph .node").count() == 2
    page.click("text=Timeline")
    assert page.locator("ol.timeline li").count() == 2
    watched.screenshot("conversation-timeline")


def test_filter_by_train_keeps_other_trains_out_also_live(stack: Stack, watched: Watched) -> None:
    page = watched.page
    alpha = send(stack, "first alpha", "alpha")
    beta = send(stack, "first beta", "beta")
    log_in(watched, stack.dashboard)
    page.locator(f"tr[data-id='{beta}']").wait_for()
    page.fill("input[name=train_id]", "alpha")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**train_id=alpha**")
    assert page.locator(f"tr[data-id='{alpha}']").is_visible()
    assert page.locator(f"tr[data-id='{beta}']").count() == 0
    page.wait_for_selector("#live-status[data-state=on]")
    later_beta = send(stack, "second beta", "beta")
    later_alpha = send(stack, "second alpha", "alpha")
    page.locator(f"tr[data-id='{later_alpha}']").wait_for(timeout=LIVE_SECONDS * 1000)
    assert page.locator(f"tr[data-id='{later_beta}']").count() == 0
    trains = page.locator("#request-rows tr td:nth-child(2)").all_inner_texts()
    assert trains and set(trains) == {"alpha"}
    watched.screenshot("requests-filtered")


XSS_SCRIPT = "<script>window.__xss = 'script'; alert('xss-script')</script>"
XSS_IMAGE = "<img src=x onerror=\"window.__xss = 'img'; alert('xss-img')\">"


def test_markup_in_messages_is_shown_as_text_and_never_runs(
    stack: Stack, watched: Watched, upstream: FakeUpstream
) -> None:
    page = watched.page
    upstream.script({"content": [{"type": "text", "text": "Echo: " + XSS_IMAGE}]})
    request_id = send(stack, f"Please print {XSS_SCRIPT} and {XSS_IMAGE}")
    log_in(watched, stack.dashboard, f"/requests/{request_id}")
    user = page.locator(".message.user pre.content")
    assert user.inner_text() == f"Please print {XSS_SCRIPT} and {XSS_IMAGE}"
    assert page.locator(".message.assistant pre.content").inner_text() == "Echo: " + XSS_IMAGE
    page.locator("details.raw summary").click()
    page.locator("[data-json-tree] .key").first.wait_for()
    page.click("[data-json-expand]")
    page.locator("[data-json-tree] .string", has_text="onerror").first.wait_for()
    assert page.locator("#messages img").count() == 0
    page.goto(f"{stack.dashboard.url}/requests?q={XSS_IMAGE}")
    page.goto(f"{stack.dashboard.url}/requests")
    page.wait_for_timeout(300)
    watched.screenshot("request-markup-escaped")
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert watched.dialogs == []
    assert watched.errors == []
    assert not [line for line in watched.console if "Content Security Policy" in line]


def test_overview_token_usage_and_trains_pages(stack: Stack, watched: Watched) -> None:
    page = watched.page
    send(stack, "hello", "alpha")
    insert(
        stack.database_url,
        [
            request_row(
                train_id="beta",
                account_id="team-max",
                ratelimit_status="allowed_warning",
                ratelimit_5h_utilization=0.87,
                ratelimit_5h_reset=request_row()["timestamp"].replace(microsecond=0) + _hours(2),
                ratelimit_7d_utilization=0.31,
                ratelimit_7d_reset=request_row()["timestamp"].replace(microsecond=0) + _hours(50),
            )
        ],
    )
    log_in(watched, stack.dashboard, "/")
    assert page.get_by_role("heading", name="Overview").is_visible()
    page.locator("[data-chart=overview-requests] canvas").wait_for()
    assert "alpha" in page.locator("section", has_text="Per train").inner_text()
    watched.screenshot("overview")

    page.click("nav >> text=Token usage")
    account = page.locator("tr[data-account='team-max']")
    assert "87%" in account.inner_text() and "31%" in account.inner_text()
    assert "allowed_warning" in account.inner_text()
    assert "(in 1h" in account.inner_text() or "(in 2h" in account.inner_text()
    passthrough = page.locator("tr[data-account='passthrough']").inner_text()
    assert "42%" in passthrough  # from the fake upstream's anthropic-ratelimit-unified-* headers
    watched.screenshot("token-usage")

    page.click("nav >> text=Trains & accounts")
    configured = page.locator("section", has_text="Configured trains").inner_text()
    assert "alpha" in configured and "passthrough" in configured
    watched.screenshot("trains")
    assert watched.errors == []


def _hours(count: int) -> Any:
    from datetime import timedelta

    return timedelta(hours=count)
