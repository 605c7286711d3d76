"""Bot API request decoding and response shapes (sans-IO).

api.telegram.org accepts parameters four ways and so does the fake: URL query string, JSON body
(``application/json``), form body (``application/x-www-form-urlencoded``) and ``multipart/form-data``.
python-telegram-bot 22 sends *form* bodies for ordinary calls (every value a string; objects and lists as
JSON text, ``true``/``false`` for booleans) and *multipart* when a file is uploaded, either as the
parameter's own part (``photo=<bytes>``) or as ``attach://<name>``. Hand-written clients usually send
JSON with native types. :class:`Params` hides the difference: every accessor accepts both the native JSON
value and its string form.

Errors are :class:`ApiError`; :func:`error_body` renders the exact Bot API error shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import attrs

__all__ = [
    "ApiError",
    "BotReply",
    "Params",
    "UploadedFile",
    "bad_request",
    "error_body",
    "error_reply",
    "ok_body",
    "parse_multipart",
    "parse_request",
]

JSONDict = dict[str, Any]

_HTTP_PHRASES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
}


class ApiError(Exception):
    """A Bot API error answer: HTTP status = ``error_code``, plus the ``description`` text.

    ``description`` is the full text Telegram sends (e.g. ``"Bad Request: chat not found"``).
    ``parameters`` becomes the ``ResponseParameters`` object (``retry_after``, ``migrate_to_chat_id``).
    """

    def __init__(self, error_code: int, description: str, parameters: JSONDict | None = None) -> None:
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters


def bad_request(detail: str) -> ApiError:
    """``400 Bad Request: <detail>`` — the most common Bot API error."""
    return ApiError(400, f"Bad Request: {detail}")


def ok_body(result: Any) -> JSONDict:
    return {"ok": True, "result": result}


def error_body(error: ApiError) -> JSONDict:
    body: JSONDict = {"ok": False, "error_code": error.error_code, "description": error.description}
    if error.parameters:
        body["parameters"] = error.parameters
    return body


def http_phrase(status: int) -> str:
    return _HTTP_PHRASES.get(status, "Error")


@attrs.frozen
class UploadedFile:
    """One file part of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


def _is_int_text(value: str) -> bool:
    return re.fullmatch(r"\s*-?\d+\s*", value) is not None


@attrs.frozen
class Params:
    """Decoded method parameters plus uploaded files, with Telegram's lenient typing."""

    values: Mapping[str, Any]
    files: Mapping[str, UploadedFile] = attrs.field(factory=dict)

    def has(self, name: str) -> bool:
        return self.values.get(name) not in (None, "")

    def raw(self, name: str) -> Any:
        return self.values.get(name)

    def get_str(self, name: str, *, default: str | None = None) -> str | None:
        value = self.values.get(name)
        if value is None:
            return default
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        return json.dumps(value)

    def get_int(self, name: str, *, default: int | None = None) -> int | None:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _is_int_text(value):
            return int(value)
        raise bad_request(f"invalid {name} specified")

    def get_float(self, name: str, *, default: float | None = None) -> float | None:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad_request(f"invalid {name} specified")

    def get_bool(self, name: str, *, default: bool = False) -> bool:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value != 0
        if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
            return value.lower() in ("true", "1")
        raise bad_request(f"invalid {name} specified")

    def get_json(self, name: str, *, error: str | None = None) -> Any:
        """A JSON-typed parameter (object/list), given natively or as JSON text; None when absent."""
        value = self.values.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise bad_request(error or f"can't parse {name} JSON object") from None
        return value


def _parse_content_type(header: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = header.partition(";")
    options: dict[str, str] = {}
    for item in rest.split(";"):
        key, sep, value = item.strip().partition("=")
        if sep:
            options[key.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), options


def _disposition_params(header: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for match in re.finditer(r';\s*([A-Za-z0-9_*-]+)=(?:"((?:[^"\\]|\\.)*)"|([^;]*))', header):
        value = match.group(2) if match.group(2) is not None else match.group(3).strip()
        params[match.group(1).lower()] = value.replace('\\"', '"').replace("%22", '"')
    return params


def parse_multipart(body: bytes, boundary: str) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    """Split a ``multipart/form-data`` body into text fields and file parts (RFC 7578).

    A part with a ``filename`` is a file; any other part is a text field decoded as UTF-8.
    """
    if not boundary:
        raise bad_request("multipart boundary is missing")
    delimiter = b"--" + boundary.encode("latin-1")
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    sections = body.split(delimiter)
    if len(sections) < 3:
        raise bad_request("can't parse multipart/form-data body")
    for section in sections[1:]:
        if section.startswith(b"--"):
            break  # closing delimiter
        section = section.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, sep, content = section.partition(b"\r\n\r\n")
        if not sep:
            raise bad_request("can't parse multipart/form-data body")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        disposition = _disposition_params(headers.get("content-disposition", ""))
        name = disposition.get("name")
        if not name:
            continue
        if "filename" in disposition:
            files[name] = UploadedFile(
                field=name,
                filename=disposition["filename"] or name,
                content_type=headers.get("content-type", "application/octet-stream"),
                data=content,
            )
        else:
            fields[name] = content.decode("utf-8", "replace")
    return fields, files


def parse_request(content_type: str, body: bytes, query_string: bytes) -> Params:
    """Decode one Bot API call's parameters from the query string and the body.

    Body values override query values with the same name, like Telegram's server does.
    """
    values: dict[str, Any] = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    files: dict[str, UploadedFile] = {}
    kind, options = _parse_content_type(content_type)
    if body:
        if kind == "application/json":
            try:
                decoded = json.loads(body)
            except ValueError:
                raise bad_request("can't parse JSON object") from None
            if not isinstance(decoded, dict):
                raise bad_request("JSON object expected")
            values.update(decoded)
        elif kind == "multipart/form-data":
            fields, files = parse_multipart(body, options.get("boundary", ""))
            values.update(fields)
        elif kind in ("application/x-www-form-urlencoded", ""):
            values.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        else:
            raise bad_request(f"unsupported Content-Type {kind!r}")
    return Params(values=values, files=files)


@attrs.frozen
class BotReply:
    """What the HTTP layer sends for one Bot API call. ``body=None`` means: break the connection."""

    status: int
    body: JSONDict | None


def error_reply(error: ApiError) -> BotReply:
    return BotReply(error.error_code, error_body(error))
