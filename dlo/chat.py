"""Chat rendering helpers: which tokens of a templated conversation are the assistant's.

SFT trains on assistant replies only. Rather than assume a particular template layout, the
assistant spans are found by rendering growing prefixes of the conversation with the
tokenizer's own chat template: the text a reply adds after ``add_generation_prompt=True`` is
that reply plus the template's end-of-turn marker. Token offsets then map those character
spans onto token ids, so the mask is exact for any prefix-stable template.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


def json_kind(value) -> str:
    """What a JSON value is, for messages: 'null', 'a list', 'an object', 'a number', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def check_messages(messages, where: str = "") -> None:
    """Refuse a conversation that is not a list of text messages with known roles (``where`` prefixes errors)."""
    at = f"{where}: " if where else ""
    if not isinstance(messages, list):
        raise ValueError(f"{at}messages is {json_kind(messages)}: expected a list of {{role, content}} objects")
    if not messages:
        raise ValueError(f"{at}messages is empty: a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{at}messages[{i}]={m!r}: each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{at}messages[{i}]: role {m['role']!r} is not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{at}messages[{i}].content is {json_kind(m['content'])}: only text content "
                             "is supported")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply + end marker."""
    check_messages(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; cannot render messages")
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        # Both must be prefixes of the full text, or the spans would point at the wrong characters.
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(f"the chat template is not prefix-stable at message {i}: rendering a prefix of the "
                             "conversation does not give a prefix of the full rendering")
        spans.append((len(prompt), len(upto)))
    return full, spans


def assistant_token_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and a 0/1 mask, 1 exactly on assistant tokens.

    The mask covers each assistant message's content and the end-of-turn marker that closes it
    (so the model learns to stop), and nothing of the system/user turns or role headers.
    """
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = []
    for start, end in offsets:
        overlapping = [(lo, hi) for lo, hi in spans if start < hi and end > lo]
        # A token that crosses a span edge would mix template text into the trained reply.
        if any(not (lo <= start and end <= hi) for lo, hi in overlapping):
            raise ValueError(f"token at characters {start}:{end} crosses an assistant span edge {overlapping}; "
                             "the chat template must put token boundaries around each reply")
        mask.append(int(bool(overlapping)))
    return ids, mask
