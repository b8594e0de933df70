"""Message and system hashes: the reference's test vectors (§4.8) and every normalisation rule."""

from __future__ import annotations

import hashlib

import pytest

from prompttrain.conversation.hashing import (
    deduplicate,
    hash_system,
    message_hashes,
    normalise_content,
    stable_system_text,
)

HELLO = "ebdeb188f7a2cac009a02cfc5d4edaacf0ea635cef72cd31e1fe86b15787c3a7"
REMINDER = "<system-reminder>You have tools.</system-reminder>"


def current(messages: list[dict[str, object]]) -> str | None:
    return message_hashes(messages).current


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hello"}],
        [{"role": "user", "content": [{"type": "text", "text": "Hello", "cache_control": {"type": "ephemeral"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": REMINDER}, {"type": "text", "text": "Hello"}]}],
        [{"role": "system", "content": REMINDER}, {"role": "user", "content": "Hello"}],
        [{"role": "user", "content": f"Hello  {REMINDER}"}],
        [{"role": "user", "content": "  Hello\r\n"}],
    ],
)
def test_reference_vector_hello(messages: list[dict[str, object]]) -> None:
    assert current(messages) == HELLO == hashlib.sha256(b"user\n[0]text:Hello\n").hexdigest()


def test_reference_vector_three_messages_and_parent() -> None:
    hashes = message_hashes(
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "Can you help me?"},
        ]
    )
    assert hashes.current == "73c2c537feab4031513ad1b73ed490af605df3c01acdf908fcc9917f300f4565"
    assert hashes.parent == HELLO
    assert hashes.grandparent is None


def test_reference_vectors_for_system_prompts() -> None:
    assert hash_system("You are a helpful assistant") == (
        "11ec99cfa6e6f58a352f4aee9cdb6d96e2eca86d437158f18efc6d4fe5909b07"
    )
    claude_code = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.003; cc_entrypoint=cli"},
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": {}},
        {"type": "text", "text": "Long instructions that change between versions."},
    ]
    assert hash_system(claude_code) == "0a2af0093d48f56418b092975df6cc3dc10bbde8c22311d290f4349c2ab56ada"
    assert hash_system(None) is None
    assert hash_system([{"type": "text", "text": "x-anthropic-billing-header: only"}]) is None


def test_system_prompt_volatile_parts_are_ignored() -> None:
    base = "You are a reviewer.\n\nBe kind."
    noisy = (
        "You are a reviewer.\n\n\n\nBe kind.<transient_context>now 12:00</transient_context>\n"
        "Current branch: feature\nMain branch (you will usually use this for PRs): main\n"
        "Status:\nM file.py\n?? new.py\n\nRecent commits:\nabc fix\n\n"
        "gitStatus: everything after this goes"
    )
    assert stable_system_text(noisy) == base
    assert hash_system(noisy) == hash_system(base)
    assert hash_system("You are an agent for Claude Code, Anthropic's official CLI for Claude. Extra") == hash_system(
        "You are an agent for Claude Code, Anthropic's official CLI for Claude"
    )


def test_item_normalisation() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    content = [
        {"type": "text", "text": "   "},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls", "timeout": 2.0}},
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": f"out {REMINDER}"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "x"}]},
        {"type": "tool_result", "tool_use_id": "toolu_3"},
        image,
        {"type": "image", "source": {"type": "url", "url": "https://x"}},
        {"type": "thinking", "thinking": "secret thoughts", "signature": "s"},
        {"type": "tool_use", "id": "toolu_4", "name": "Read"},
    ]
    assert normalise_content(content).split("\n") == [
        '[0]tool_use:Bash:toolu_1:{"command":"ls","timeout":2}',
        "[1]tool_result:toolu_1:out",
        '[2]tool_result:toolu_2:[{"type":"text","text":"x"}]',
        "[3]tool_result:toolu_3:",
        f"[4]image:image/png:{hashlib.sha256(b'AAAA').hexdigest()}",
        "[5]image:no-source",
        "[6]thinking:unknown",
        "[7]tool_use:Read:toolu_4:undefined",
    ]
    assert normalise_content("   ") == ""


def test_messages_repeating_tool_blocks_are_dropped() -> None:
    use = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}
    text = {"role": "user", "content": "again"}
    assert deduplicate([use, result, use, result, text]) == [use, result, text]


def test_grandparent_and_counts() -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(7)]
    hashes = message_hashes([{"role": "system", "content": "injected"}, *messages])
    assert hashes.parent == message_hashes(messages[:5]).current
    assert hashes.grandparent == message_hashes(messages[:3]).current
    assert (hashes.message_count, hashes.conversation_length) == (8, 7)
    assert message_hashes([{"role": "assistant", "content": "alone"}]).parent is None
    assert message_hashes([]).current is None
