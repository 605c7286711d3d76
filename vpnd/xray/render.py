"""Xray's config file: the operator's template with one VLESS inbound's clients filled in from the DB.

The template is validated once at startup (:func:`load_template`); rendering (:func:`render_config`)
streams clients from an iterator of DB batches into the output without ever holding them as JSON
objects, and is deterministic so the writer can skip unchanged writes (:func:`write_atomically`).
All functions are synchronous: the daemon calls them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from vpnd.xray import links


class TemplateError(Exception):
    """The Xray config template is unusable; the message names the file and what is wrong."""


def _validate_email(_instance: object, _attribute: object, value: str) -> None:
    # Xray keys users by lowercased email and rejects duplicates at startup, so only lowercase
    # ASCII is allowed: two distinct emails here are then two distinct users there.
    if not value or not value.isascii() or not value.isprintable() or " " in value or value != value.lower():
        raise ValueError(f"Xray client email must be lowercase ASCII without spaces, got {value!r}")


def _validate_uuid(_instance: object, _attribute: object, value: str) -> None:
    links.validate_uuid(value)


def _validate_flow(_instance: object, _attribute: object, value: str) -> None:
    links.validate_flow(value)


@attrs.frozen
class Client:
    """One VLESS user as Xray sees it.  ``email`` is Xray's key for the user (stats, removal)."""

    uuid: str = attrs.field(validator=_validate_uuid)
    email: str = attrs.field(validator=_validate_email)
    flow: str = attrs.field(default="xtls-rprx-vision", validator=_validate_flow)


@attrs.frozen
class RealitySettings:
    """What the template's REALITY block tells link building (the public key is not in it)."""

    server_names: tuple[str, ...]
    short_ids: tuple[str, ...]


@attrs.frozen
class Template:
    """A validated template, pre-split around the clients list so rendering only streams clients."""

    path: str
    inbound_tag: str
    port: int | None
    reality: RealitySettings | None
    head: bytes
    tail: bytes
    client_indent: str


def _fail(path: Path, message: str) -> TemplateError:
    return TemplateError(f"Xray config template {path}: {message}")


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _check_reality(path: Path, where: str, stream: dict[str, Any]) -> RealitySettings | None:
    reality = stream.get("realitySettings")
    if reality is None:
        if stream.get("security") == "reality":
            raise _fail(path, f"{where}.streamSettings.security is 'reality' but realitySettings is missing")
        return None
    where = f"{where}.streamSettings.realitySettings"
    if not isinstance(reality, dict):
        raise _fail(path, f"{where} must be an object, got {_type_name(reality)}")
    if stream.get("security") != "reality":
        raise _fail(path, f"{where} is present but streamSettings.security is {stream.get('security')!r}")
    private_key = reality.get("privateKey")
    if not isinstance(private_key, str):
        raise _fail(path, f"{where}.privateKey must be a string (from `xray x25519`)")
    try:
        links.validate_reality_private_key(private_key)
    except ValueError as exc:
        raise _fail(path, f"{where}.privateKey: {exc}") from None
    target = reality.get("target", reality.get("dest"))
    if not isinstance(target, str | int) or isinstance(target, bool) or target == "":
        raise _fail(path, f"{where}.target (or dest) must be the camouflage site, like 'example.com:443'")
    names = reality.get("serverNames")
    if not isinstance(names, list) or not names:
        raise _fail(path, f"{where}.serverNames must be a non-empty array of host names")
    for index, name in enumerate(names):
        try:
            links.validate_hostname(name)
        except ValueError as exc:
            raise _fail(path, f"{where}.serverNames[{index}]: {exc}") from None
    short_ids = reality.get("shortIds")
    if not isinstance(short_ids, list) or not short_ids:
        raise _fail(path, f"{where}.shortIds must be a non-empty array of hex strings")
    for index, short_id in enumerate(short_ids):
        try:
            links.validate_short_id(short_id)
        except ValueError as exc:
            raise _fail(path, f"{where}.shortIds[{index}]: {exc}") from None
    return RealitySettings(server_names=tuple(names), short_ids=tuple(short_ids))


def _placeholder(text: str) -> str:
    while True:
        token = f"vpnd-clients-{secrets.token_hex(16)}"
        if token not in text:
            return token


def load_template(path: str | os.PathLike[str], *, inbound_tag: str) -> Template:
    """Read and validate the operator's config template.

    It must be a JSON object with an ``inbounds`` array holding exactly one inbound tagged
    ``inbound_tag``, whose protocol is ``vless`` and whose ``settings.clients`` is an array (its
    contents are replaced on render).  A REALITY block, if present, must be complete.  Raises
    :class:`TemplateError` naming the file and the offending JSON path.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(file, f"cannot read: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(file, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(document, dict):
        raise _fail(file, f"top level must be a JSON object, got {_type_name(document)}")
    inbounds = document.get("inbounds")
    if not isinstance(inbounds, list):
        got = "missing" if inbounds is None else _type_name(inbounds)
        raise _fail(file, f"'inbounds' must be an array, got {got}")
    matches = [
        i for i, inbound in enumerate(inbounds) if isinstance(inbound, dict) and inbound.get("tag") == inbound_tag
    ]
    if not matches:
        tags = [inbound.get("tag") for inbound in inbounds if isinstance(inbound, dict)]
        raise _fail(file, f"no inbound with tag {inbound_tag!r} (tags present: {tags})")
    if len(matches) > 1:
        raise _fail(
            file,
            f"{len(matches)} inbounds have tag {inbound_tag!r} (at indexes {matches}); tags must be unique",
        )
    index = matches[0]
    where = f"inbounds[{index}] (tag {inbound_tag!r})"
    inbound = inbounds[index]
    if inbound.get("protocol") != "vless":
        raise _fail(file, f"{where}: protocol is {inbound.get('protocol')!r}, expected 'vless'")
    settings = inbound.get("settings")
    if not isinstance(settings, dict):
        raise _fail(file, f"{where}.settings must be an object")
    if not isinstance(settings.get("clients"), list):
        got = "missing" if "clients" not in settings else _type_name(settings["clients"])
        raise _fail(file, f"{where}.settings.clients must be an array, got {got}")
    port = inbound.get("port")
    if not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
        port = None  # a port range or env reference is Xray's business; links then need a configured port
    stream = inbound.get("streamSettings", {})
    if not isinstance(stream, dict):
        raise _fail(file, f"{where}.streamSettings must be an object")
    reality = _check_reality(file, where, stream)

    skeleton = copy.deepcopy(document)
    token = _placeholder(text)
    skeleton["inbounds"][index]["settings"]["clients"] = token
    rendered = json.dumps(skeleton, indent=2, ensure_ascii=False)
    quoted = json.dumps(token)
    head, found, tail = rendered.partition(quoted)
    if not found or quoted in tail:
        raise AssertionError("placeholder must occur exactly once")
    line_start = head.rfind("\n") + 1
    indent = head[line_start:]
    indent = indent[: len(indent) - len(indent.lstrip(" "))]
    return Template(
        path=str(file),
        inbound_tag=inbound_tag,
        port=port,
        reality=reality,
        head=head.encode("utf-8"),
        tail=(tail + "\n").encode("utf-8"),
        client_indent=indent + "  ",
    )


@attrs.define(eq=False)
class ConfigRenderer:
    """Push-style rendering for callers that get clients in batches (the writer, from the DB).

    ``begin()``, then ``clients(batch)`` for each batch, then ``end()``: the concatenated bytes are the
    config file.  Clients must come in strictly ascending ``email`` order across all batches (see
    :func:`iter_config_chunks`); the renderer keeps only the last email to check that.
    """

    template: Template
    count: int = attrs.field(default=0, init=False)
    _previous: str | None = attrs.field(default=None, init=False)

    def begin(self) -> bytes:
        return self.template.head + b"["

    def clients(self, clients: Iterable[Client]) -> bytes:
        """The JSON text of these clients (one bytes object for the whole batch)."""
        indent = self.template.client_indent
        pieces = []
        for client in clients:
            previous = self._previous
            if previous is not None and client.email <= previous:
                problem = "duplicate" if client.email == previous else "out of order"
                raise ValueError(
                    f"Xray clients must be sorted by email without duplicates: {client.email!r} is {problem} "
                    f"after {previous!r}"
                )
            self._previous = client.email
            entry = json.dumps({"id": client.uuid, "email": client.email, "flow": client.flow}, ensure_ascii=False)
            pieces.append(f"{',' if self.count else ''}\n{indent}{entry}")
            self.count += 1
        return "".join(pieces).encode()

    def end(self) -> bytes:
        closing = f"\n{self.template.client_indent[:-2]}]" if self.count else "]"
        return closing.encode() + self.template.tail


def iter_config_chunks(template: Template, clients: Iterable[Client]) -> Iterator[bytes]:
    """The rendered config as a stream of byte chunks (one per client plus the surrounding JSON).

    ``clients`` must come in strictly ascending ``email`` order (Python string order, which is what
    PostgreSQL gives with ``ORDER BY email COLLATE "C"``): this makes the output a function of the
    set alone and proves there are no duplicate emails, which Xray would refuse.  Raises ValueError
    on the first client out of order.
    """
    renderer = ConfigRenderer(template)
    yield renderer.begin()
    for client in clients:
        yield renderer.clients((client,))
    yield renderer.end()


def render_config(template: Template, clients: Iterable[Client]) -> bytes:
    """The whole config file for this set of clients (see :func:`iter_config_chunks` for the order
    contract).  Same set → same bytes."""
    out = io.BytesIO()
    for chunk in iter_config_chunks(template, clients):
        out.write(chunk)
    return out.getvalue()


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.vpnd-"


def _remove_stale_temps(target: Path) -> None:
    """Temp files left by a writer killed mid-write (there is one writer, so none is live now)."""
    prefix = _temp_prefix(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(target.parent / name)
            except FileNotFoundError:
                pass


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The config file holds every user's UUID (their credential): owner and group only, never world-readable.
CONFIG_FILE_MODE = 0o640


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = CONFIG_FILE_MODE) -> bool:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never a part.

    Returns False, touching nothing but the mode, when the file already holds exactly ``data``.
    Otherwise writes a temp file in the same directory, gives it ``mode`` (whatever mode the old
    file had: the file is a secret, so a mode loosened by hand is tightened again) and the existing
    file's owner, fsyncs it, renames it over the target and fsyncs the directory, so the new content
    survives a power cut once this returns.  Meant for one writer per path.
    """
    target = Path(path)
    try:
        current = target.stat()
    except FileNotFoundError:
        current = None
    if current is not None:
        if not stat.S_ISREG(current.st_mode):
            raise IsADirectoryError(f"{target} exists and is not a regular file")
        if current.st_size == len(data):
            with open(target, "rb") as existing:
                if existing.read() == data:
                    if stat.S_IMODE(current.st_mode) != mode:
                        os.chmod(target, mode)
                    return False
    _remove_stale_temps(target)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target), suffix=".tmp")
    temp = Path(temp_name)
    renamed = False
    try:
        with open(fd, "wb", closefd=True) as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            if current is not None:
                mine = os.fstat(out.fileno())
                if (mine.st_uid, mine.st_gid) != (current.st_uid, current.st_gid):
                    try:
                        os.fchown(out.fileno(), current.st_uid, current.st_gid)
                    except PermissionError:
                        raise PermissionError(
                            f"cannot keep owner {current.st_uid}:{current.st_gid} of {target} "
                            f"(running as uid {os.getuid()}); give the file to this user or run as its owner"
                        ) from None
            os.fsync(out.fileno())
        os.replace(temp, target)
        renamed = True
    finally:
        if not renamed:
            temp.unlink(missing_ok=True)
    _fsync_directory(target.parent)
    return True
