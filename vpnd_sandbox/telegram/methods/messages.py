"""Bot API methods that send, edit and delete messages, answer button presses and hand out files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpnd_sandbox.telegram.files import MediaKind, input_file
from vpnd_sandbox.telegram.formatting import utf16_len
from vpnd_sandbox.telegram.limits import MAX_TEXT, take_send_slot
from vpnd_sandbox.telegram.methods.checks import caption_of, chat_of, parse_text, reply_markup, reply_target
from vpnd_sandbox.telegram.records import ChatMessage, FakeUser, Notice
from vpnd_sandbox.telegram.wire import JSONDict, Params, bad_request

if TYPE_CHECKING:
    from vpnd_sandbox.telegram.state import FakeTelegram

QUERY_TOO_OLD = "query is too old and response timeout expired or query ID is invalid"
NOT_MODIFIED = (
    "message is not modified: specified new message content and reply markup are exactly the same as a "
    "current content and reply markup of the message"
)


def send_message(fake: FakeTelegram, params: Params) -> JSONDict:
    user = chat_of(fake, params)
    text = params.get_str("text")
    if not text:
        raise bad_request("message text is empty")
    parsed = parse_text(text, params.get_str("parse_mode"), params.get_json("entities"))
    if not parsed.text:
        raise bad_request("message text is empty")
    if utf16_len(parsed.text) > MAX_TEXT:
        raise bad_request("message is too long")
    markup = reply_markup(params)
    reply_to = reply_target(fake, user, params)
    take_send_slot(fake, user.id, paid=params.get_bool("allow_paid_broadcast"))
    message = fake._add_message(
        user,
        from_bot=True,
        text=parsed.text,
        entities=list(parsed.entities),
        reply_markup=fake._apply_chat_keyboard(user, markup),
        reply_to=reply_to,
    )
    return message.to_api()


def message_to_edit(fake: FakeTelegram, params: Params) -> tuple[FakeUser, ChatMessage]:
    if params.has("inline_message_id"):
        raise bad_request("MESSAGE_ID_INVALID")
    user = chat_of(fake, params)
    message = fake._find_message(user.id, params.get_int("message_id"))
    if message is None:
        raise bad_request("message to edit not found")
    if not message.from_bot:
        raise bad_request("message can't be edited")
    return user, message


def edited(fake: FakeTelegram, message: ChatMessage) -> JSONDict:
    return fake._edited(message)


def edit_message_text(fake: FakeTelegram, params: Params) -> JSONDict:
    user, message = message_to_edit(fake, params)
    text = params.get_str("text")
    if not text:
        raise bad_request("message text is empty")
    parsed = parse_text(text, params.get_str("parse_mode"), params.get_json("entities"))
    if not parsed.text:
        raise bad_request("message text is empty")
    if utf16_len(parsed.text) > MAX_TEXT:
        raise bad_request("MESSAGE_TOO_LONG")
    if message.text is None:
        raise bad_request("there is no text in the message to edit")
    # Without reply_markup, editMessageText removes the inline keyboard (Telegram does the same).
    markup = reply_markup(params)
    if markup is not None and "inline_keyboard" not in markup:
        raise bad_request("inline keyboard expected")
    if message.text == parsed.text and message.entities == list(parsed.entities) and message.reply_markup == markup:
        raise bad_request(NOT_MODIFIED)
    take_send_slot(fake, user.id)
    message.text = parsed.text
    message.entities = list(parsed.entities)
    message.reply_markup = markup
    return edited(fake, message)


def edit_message_caption(fake: FakeTelegram, params: Params) -> JSONDict:
    _, message = message_to_edit(fake, params)
    if message.photo is None and message.document is None and message.video is None and message.animation is None:
        raise bad_request("there is no caption in the message to edit")
    parsed = caption_of(params)
    markup = reply_markup(params)
    caption = parsed.text if parsed else None
    entities = list(parsed.entities) if parsed else []
    if message.caption == caption and message.caption_entities == entities and message.reply_markup == markup:
        raise bad_request(NOT_MODIFIED)
    message.caption, message.caption_entities, message.reply_markup = caption, entities, markup
    return edited(fake, message)


def edit_message_reply_markup(fake: FakeTelegram, params: Params) -> JSONDict:
    _, message = message_to_edit(fake, params)
    markup = reply_markup(params)
    if markup is not None and "inline_keyboard" not in markup:
        raise bad_request("inline keyboard expected")
    if message.reply_markup == markup:
        raise bad_request(NOT_MODIFIED)
    message.reply_markup = markup
    return edited(fake, message)


def delete_message(fake: FakeTelegram, params: Params) -> bool:
    user = chat_of(fake, params)
    message = fake._find_message(user.id, params.get_int("message_id"))
    if message is None:
        raise bad_request("message to delete not found")
    message.deleted = True
    message.revision = fake._changed()
    return True


def answer_callback_query(fake: FakeTelegram, params: Params) -> bool:
    query = fake.callback_queries.get(params.get_str("callback_query_id") or "")
    if query is None or query.answered:
        raise bad_request(QUERY_TOO_OLD)
    text = params.get_str("text")
    if text is not None and len(text) > 200:
        raise bad_request("MESSAGE_TOO_LONG")
    query.answered = True
    query.answer_text = text or None
    query.show_alert = params.get_bool("show_alert")
    query.answer_url = params.get_str("url")
    if text:
        fake.notices.append(
            Notice(
                seq=fake.change_seq + 1,
                chat_id=query.user_id,
                kind="callback_answer",
                text=text,
                show_alert=query.show_alert,
            )
        )
    fake._changed()
    return True


def send_media(fake: FakeTelegram, params: Params, field: MediaKind) -> JSONDict:
    user = chat_of(fake, params)
    stored = input_file(fake, params, field, field)
    caption = caption_of(params)
    markup = reply_markup(params)
    reply_to = reply_target(fake, user, params)
    take_send_slot(fake, user.id, paid=params.get_bool("allow_paid_broadcast"))
    message = fake._add_message(
        user,
        from_bot=True,
        photo=stored if field == "photo" else None,
        document=stored if field == "document" else None,
        video=stored if field == "video" else None,
        animation=stored if field == "animation" else None,
        caption=caption.text if caption else None,
        caption_entities=list(caption.entities) if caption else [],
        reply_markup=fake._apply_chat_keyboard(user, markup),
        reply_to=reply_to,
    )
    return message.to_api()


def send_photo(fake: FakeTelegram, params: Params) -> JSONDict:
    return send_media(fake, params, "photo")


def send_document(fake: FakeTelegram, params: Params) -> JSONDict:
    return send_media(fake, params, "document")


def send_video(fake: FakeTelegram, params: Params) -> JSONDict:
    return send_media(fake, params, "video")


def send_animation(fake: FakeTelegram, params: Params) -> JSONDict:
    return send_media(fake, params, "animation")


def get_file(fake: FakeTelegram, params: Params) -> JSONDict:
    stored = fake.files.get(params.get_str("file_id") or "")
    if stored is None:
        raise bad_request("wrong file_id or the file is temporarily unavailable")
    return {
        "file_id": stored.file_id,
        "file_unique_id": stored.file_unique_id,
        "file_size": stored.size,
        "file_path": f"{stored.kind}s/{stored.file_id}",
    }
