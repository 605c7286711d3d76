"""Telegram's ``parse_mode=HTML`` (and a MarkdownV2 subset) and message-text rules, as pure functions.

The fake Bot API must refuse what api.telegram.org refuses, otherwise a template with a stray ``<`` or a
``<br>`` passes every test and fails in production. The parser follows the behaviour of Telegram's own
HTML parser (tdlib's ``parse_html``):

* only the documented tags are accepted: ``b strong i em u ins s strike del span(class=tg-spoiler)
  tg-spoiler a(href) code pre blockquote(expandable) tg-emoji(emoji-id)``; anything else, including a bare
  ``<`` in text, is "Unsupported start tag";
* end tags must match the innermost open tag; unclosed tags are an error at the end;
* ``&lt; &gt; &amp; &quot;`` and numeric character references are decoded; any other ``&`` stays literal;
* error messages name *UTF-8 byte* offsets, entity offsets and lengths are in *UTF-16 code units*;
* the resulting text is stripped of leading/trailing whitespace, entities are shifted accordingly.

Errors are raised as :class:`EntityParseError` whose ``str`` is the part after
``"Bad Request: can't parse entities: "``.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

__all__ = [
    "EntityParseError",
    "ParsedText",
    "detect_bot_commands",
    "parse_html",
    "parse_markdown_v2",
    "plain_text",
    "utf16_len",
]

_SIMPLE_TAGS: dict[str, str] = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
}
_OTHER_TAGS = frozenset({"a", "span", "code", "pre", "blockquote", "tg-emoji"})
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_TAG_NAME_CHARS = re.compile(r"[A-Za-z0-9-]*")
_ATTR_NAME_CHARS = re.compile(r"[A-Za-z0-9_-]*")
_BOT_COMMAND = re.compile(r"(?<![\w/])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?(?![\w/@])")


class EntityParseError(ValueError):
    """The text cannot be parsed in the requested parse mode (Telegram answers 400)."""


@attrs.frozen
class ParsedText:
    """Message text after entity parsing: what the recipient sees, plus Bot API ``MessageEntity`` dicts."""

    text: str
    entities: tuple[dict[str, Any], ...]


@attrs.define
class _OpenTag:
    name: str
    byte_offset: int
    start: int  # UTF-16 offset in the output
    entity: dict[str, Any] | None


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit Telegram uses for entity offsets and text limits."""
    return len(text.encode("utf-16-le")) // 2


def _byte_offset(source: str, index: int) -> int:
    return len(source[:index].encode("utf-8"))


def _decode_entity(source: str, index: int) -> tuple[str, int] | None:
    """Decode the character reference starting at ``source[index] == "&"``; None if it is not one."""
    end = source.find(";", index + 1, index + 12)
    if end < 0:
        return None
    body = source[index + 1 : end]
    if body in _NAMED_ENTITIES:
        return _NAMED_ENTITIES[body], end + 1
    code: int | None = None
    if re.fullmatch(r"#[0-9]{1,7}", body):
        code = int(body[1:])
    elif re.fullmatch(r"#[xX][0-9A-Fa-f]{1,6}", body):
        code = int(body[2:], 16)
    if code is None or code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return None
    return chr(code), end + 1


def _read_attributes(source: str, index: int, tag: str, tag_offset: int) -> tuple[dict[str, str], int]:
    """Parse attributes up to and including ``>``; returns them and the index after ``>``."""
    attributes: dict[str, str] = {}
    length = len(source)
    while True:
        while index < length and source[index].isspace():
            index += 1
        if index >= length:
            raise EntityParseError(f"Unclosed start tag at byte offset {tag_offset}")
        if source[index] == ">":
            return attributes, index + 1
        if source[index] == "/" and source.startswith("/>", index):
            raise EntityParseError(f'Unsupported start tag "{tag}/" at byte offset {tag_offset}')
        match = _ATTR_NAME_CHARS.match(source, index)
        assert match is not None
        name = match.group().lower()
        index = match.end()
        if not name:
            raise EntityParseError(
                f'Empty attribute name in the tag "{tag}" at byte offset {_byte_offset(source, index)}'
            )
        while index < length and source[index].isspace():
            index += 1
        if index >= length:
            raise EntityParseError(f"Unclosed start tag at byte offset {tag_offset}")
        if source[index] != "=":
            # Valueless attributes (``<blockquote expandable>``) are allowed.
            attributes[name] = ""
            continue
        index += 1
        while index < length and source[index].isspace():
            index += 1
        if index >= length:
            raise EntityParseError(f"Unclosed start tag at byte offset {tag_offset}")
        quote = source[index]
        value_chars: list[str] = []
        if quote in "\"'":
            index += 1
            while True:
                if index >= length:
                    raise EntityParseError(f"Unclosed start tag at byte offset {tag_offset}")
                char = source[index]
                if char == quote:
                    index += 1
                    break
                if char == "&":
                    decoded = _decode_entity(source, index)
                    if decoded is not None:
                        value_chars.append(decoded[0])
                        index = decoded[1]
                        continue
                value_chars.append(char)
                index += 1
        else:
            while index < length and not source[index].isspace() and source[index] != ">":
                value_chars.append(source[index])
                index += 1
        attributes[name] = "".join(value_chars)


def _entity_for(tag: str, attributes: dict[str, str], stack: list[_OpenTag], tag_offset: int) -> (
    dict[str, Any] | None
):
    """Map a start tag to the entity it opens (None: the tag opens no entity of its own)."""
    if tag in _SIMPLE_TAGS:
        return {"type": _SIMPLE_TAGS[tag]}
    if tag == "span":
        if attributes.get("class") != "tg-spoiler":
            raise EntityParseError(f'Tag "span" must have class "tg-spoiler" at byte offset {tag_offset}')
        return {"type": "spoiler"}
    if tag == "a":
        href = attributes.get("href", "").strip()
        if not href:
            return None  # Telegram keeps the text and drops a link without a target.
        if href.startswith("tg://user?id="):
            user_id = href.removeprefix("tg://user?id=")
            if user_id.isdigit():
                return {"type": "text_mention", "user": {"id": int(user_id), "is_bot": False, "first_name": ""}}
        return {"type": "text_link", "url": href}
    if tag == "code":
        language = attributes.get("class", "")
        if stack and stack[-1].name == "pre" and stack[-1].entity is not None:
            if language.startswith("language-") and "language" not in stack[-1].entity:
                stack[-1].entity["language"] = language.removeprefix("language-")
            return None  # <pre><code> is one pre entity.
        return {"type": "code"}
    if tag == "pre":
        return {"type": "pre"}
    if tag == "blockquote":
        return {"type": "expandable_blockquote" if "expandable" in attributes else "blockquote"}
    if tag == "tg-emoji":
        emoji_id = attributes.get("emoji-id", "")
        if not emoji_id.isdigit():
            raise EntityParseError('Custom emoji entity must contain a valid custom emoji identifier')
        return {"type": "custom_emoji", "custom_emoji_id": emoji_id}
    raise AssertionError(tag)


def _finish(chunks: list[str], entities: list[dict[str, Any]]) -> ParsedText:
    """Strip surrounding whitespace like Telegram does and shift/clip entities to the stripped text."""
    raw = "".join(chunks)
    stripped_left = raw.lstrip()
    shift = utf16_len(raw) - utf16_len(stripped_left)
    text = stripped_left.rstrip()
    total = utf16_len(text)
    result: list[dict[str, Any]] = []
    for entity in entities:
        start = max(entity["offset"] - shift, 0)
        end = min(entity["offset"] + entity["length"] - shift, total)
        if end > start:
            result.append({**entity, "offset": start, "length": end - start})
    result.sort(key=lambda e: (e["offset"], -e["length"]))
    return ParsedText(text=text, entities=tuple(result))


def parse_html(source: str) -> ParsedText:
    """Parse Telegram-flavoured HTML into plain text and entities, or raise :class:`EntityParseError`."""
    chunks: list[str] = []
    position = 0  # UTF-16 length of the output so far
    entities: list[dict[str, Any]] = []
    stack: list[_OpenTag] = []
    index = 0
    length = len(source)

    def emit(piece: str) -> None:
        nonlocal position
        chunks.append(piece)
        position += utf16_len(piece)

    while index < length:
        char = source[index]
        if char == "&":
            decoded = _decode_entity(source, index)
            if decoded is None:
                emit("&")
                index += 1
            else:
                emit(decoded[0])
                index = decoded[1]
            continue
        if char != "<":
            next_special = min(
                (i for i in (source.find("<", index), source.find("&", index)) if i >= 0), default=length
            )
            emit(source[index:next_special])
            index = next_special
            continue
        tag_offset = _byte_offset(source, index)
        if source.startswith("</", index):
            close = source.find(">", index)
            if close < 0:
                raise EntityParseError(f"Unclosed end tag at byte offset {tag_offset}")
            name = source[index + 2 : close].strip().lower()
            if not stack:
                raise EntityParseError(f"Unexpected end tag at byte offset {tag_offset}")
            top = stack[-1]
            if name != top.name:
                raise EntityParseError(
                    f'Unmatched end tag at byte offset {tag_offset}, expected "</{top.name}>", found "</{name}>"'
                )
            stack.pop()
            if top.entity is not None and position > top.start:
                entities.append({**top.entity, "offset": top.start, "length": position - top.start})
            index = close + 1
            continue
        match = _TAG_NAME_CHARS.match(source, index + 1)
        assert match is not None
        tag = match.group().lower()
        if tag not in _SIMPLE_TAGS and tag not in _OTHER_TAGS:
            raise EntityParseError(f'Unsupported start tag "{tag}" at byte offset {tag_offset}')
        attributes, index = _read_attributes(source, match.end(), tag, tag_offset)
        entity = _entity_for(tag, attributes, stack, tag_offset)
        stack.append(_OpenTag(name=tag, byte_offset=tag_offset, start=position, entity=entity))

    if stack:
        raise EntityParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1].name}"')
    return _finish(chunks, entities)


def plain_text(source: str, entities: list[dict[str, Any]] | None = None) -> ParsedText:
    """Text sent without ``parse_mode``: only stripping applies; explicit ``entities`` are kept as given."""
    return _finish([source], list(entities or []))


def detect_bot_commands(text: str) -> list[dict[str, Any]]:
    """``bot_command`` entities Telegram adds to a user's message (``/start``, ``/buy@vpnd_bot``)."""
    found: list[dict[str, Any]] = []
    for match in _BOT_COMMAND.finditer(text):
        found.append(
            {
                "type": "bot_command",
                "offset": utf16_len(text[: match.start()]),
                "length": utf16_len(match.group()),
            }
        )
    return found


_MD_SPECIAL = "_*[]()~`>#+-=|{}.!"


def parse_markdown_v2(text: str) -> ParsedText:
    """A small MarkdownV2 subset: ``*bold* _italic_ __underline__ ~strike~ ||spoiler|| `code` [t](url)``
    and backslash escapes; an unescaped reserved character is an error, as on Telegram."""
    chunks: list[str] = []
    entities: list[dict[str, Any]] = []
    open_marks: list[tuple[str, int]] = []
    position = 0
    index = 0
    marks = {"*": "bold", "_": "italic", "__": "underline", "~": "strikethrough", "||": "spoiler"}

    def emit(piece: str) -> None:
        nonlocal position
        chunks.append(piece)
        position += utf16_len(piece)

    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            emit(text[index + 1])
            index += 2
            continue
        mark = text[index : index + 2] if text[index : index + 2] in ("__", "||") else char
        if mark in marks:
            if open_marks and open_marks[-1][0] == mark:
                _, start = open_marks.pop()
                if position > start:
                    entities.append({"type": marks[mark], "offset": start, "length": position - start})
            else:
                open_marks.append((mark, position))
            index += len(mark)
            continue
        if char == "`":
            end = text.find("`", index + 1)
            if end < 0:
                raise EntityParseError(f"Can't find end of Code entity at byte offset {len(text[:index].encode())}")
            start = position
            emit(text[index + 1 : end])
            entities.append({"type": "code", "offset": start, "length": position - start})
            index = end + 1
            continue
        if char == "[":
            match = re.match(r"\[((?:[^\]\\]|\\.)*)\]\(((?:[^)\\]|\\.)*)\)", text[index:])
            if match is None:
                raise EntityParseError("Character '[' is reserved and must be escaped with the preceding '\\'")
            start = position
            emit(re.sub(r"\\(.)", r"\1", match.group(1)))
            entities.append(
                {
                    "type": "text_link",
                    "offset": start,
                    "length": position - start,
                    "url": re.sub(r"\\(.)", r"\1", match.group(2)),
                }
            )
            index += match.end()
            continue
        if char in _MD_SPECIAL:
            raise EntityParseError(f"Character '{char}' is reserved and must be escaped with the preceding '\\'")
        emit(char)
        index += 1
    if open_marks:
        mark, _ = open_marks[-1]
        raise EntityParseError(f"Can't find end of {marks[mark].title()} entity")
    return plain_text("".join(chunks), entities)
