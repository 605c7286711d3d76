"""Files the bot sends: resolving a file parameter (upload, ``attach://``, file_id, URL) and the
image facts Telegram checks."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Literal

from vpnd_sandbox.telegram.limits import MAX_DOCUMENT_BYTES, MAX_PHOTO_BYTES
from vpnd_sandbox.telegram.records import StoredFile
from vpnd_sandbox.telegram.wire import ApiError, Params, UploadedFile, bad_request

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a PNG, JPEG, GIF or WebP image; None when the bytes are not one of those."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return 512, 512  # dimensions do not matter to anyone here
    if data.startswith(b"\xff\xd8"):
        index = 2
        while index + 9 < len(data):
            if data[index] != 0xFF:
                index += 1
                continue
            marker = data[index + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                index += 1 if marker == 0xFF else 2
                continue
            (segment_length,) = struct.unpack(">H", data[index + 2 : index + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[index + 5 : index + 9])
                return int(width), int(height)
            index += 2 + segment_length
    return None


def content_type(stored: StoredFile) -> str:
    """The Content-Type a download of `stored` is served with (photos by their magic bytes)."""
    if stored.kind != "photo" or stored.data is None:
        return stored.mime_type or "application/octet-stream"
    data = stored.data
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"GIF8"):
        return "image/gif"
    return "image/webp" if data[8:12] == b"WEBP" else "image/jpeg"


MediaKind = Literal["photo", "document", "video", "animation"]
_FILE_ID_PREFIX = {
    "photo": "AgACAgUAAxkBAA",
    "document": "BQACAgUAAxkBAA",
    "video": "BAACAgUAAxkBAA",
    "animation": "CgACAgUAAxkBAA",
}


def input_file(fake: FakeTelegram, params: Params, field: str, kind: MediaKind) -> StoredFile:
    """Resolve a file parameter: an uploaded part, ``attach://name``, a known file_id or an HTTP URL."""
    upload: UploadedFile | None = params.files.get(field)
    if upload is None:
        value = params.get_str(field)
        if not value:
            raise bad_request(f"there is no {field} in the request")
        if value.startswith("attach://"):
            upload = params.files.get(value.removeprefix("attach://"))
            if upload is None:
                raise bad_request(f"failed to get HTTP URL content of {field}")
        elif value.startswith(("http://", "https://")):
            stored = StoredFile(
                file_id=fake._new_id("AgACAgUAAxkBAA"),
                file_unique_id=fake._new_id("AQAD"),
                kind=kind,
                url=value,
                width=640,
                height=640,
                file_name=value.rsplit("/", 1)[-1] or None,
            )
            fake.files[stored.file_id] = stored
            return stored
        else:
            known = fake.files.get(value)
            if known is None:
                raise bad_request("wrong file identifier/HTTP URL specified")
            if known.kind != kind:
                raise bad_request(f"can't use file of type {known.kind.title()} as {kind.title()}")
            return known
    if not upload.data:
        raise bad_request("file must be non-empty")
    width = height = 0
    if kind == "photo":
        if len(upload.data) > MAX_PHOTO_BYTES:
            raise bad_request("PHOTO_INVALID_DIMENSIONS")
        size = image_size(upload.data)
        if size is None:
            raise bad_request("IMAGE_PROCESS_FAILED")
        width, height = size
    elif len(upload.data) > MAX_DOCUMENT_BYTES:
        raise ApiError(413, "Request Entity Too Large")
    stored = StoredFile(
        file_id=fake._new_id(_FILE_ID_PREFIX[kind]),
        file_unique_id=fake._new_id("AQAD"),
        kind=kind,
        data=upload.data,
        file_name=upload.filename if kind != "photo" else None,
        mime_type=upload.content_type if kind != "photo" else "image/jpeg",
        width=width,
        height=height,
    )
    fake.files[stored.file_id] = stored
    return stored
