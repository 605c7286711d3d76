"""Rotating keys after a leak (issue 20): `vpnd admin reissue` for one user, `vpnd admin rotate-keys` and the
admin bot's "Rotate all keys" for everyone — a durable job the daemon runs batch by batch, against the whole
daemon, a real PostgreSQL, the fake Xray and the fake Bot API.

What must hold: every subscription gets a new UUID and subscription token exactly once (one `key_reissues`
row each), however the daemon is stopped (SIGKILL included) and restarted; Xray ends with exactly the new
UUIDs (each old one removed); with --notify each running subscriber is told once; cancel stops it."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.admin.harness import ADMIN, give_subscription, seed_users
from tests.harness import (
    Running,
    bot_config,
    button,
    cli_result,
    config_sections,
    has_button,
    press,
    say,
    scalar,
    sql,
    start_daemon,
    start_vpnd,
    text_has,
    vpnd_cli,
    wait_ready,
    write_config_file,
)
from tests.telegram.test_flows import forge_callback
from tests.test_notify import add_users, until, vpnd_admin
from tests.xray.test_xray_writer import PUBLIC_KEY, TAG, reality_template
from vpnd.compose import Services
from vpnd.config import ConfigError, load_config
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import FakeXray, start_fake_xray

FIRST, COUNT = 9000, 50
USERS = list(range(FIRST, FIRST + COUNT))
HOUR = 3600


def keys(dsn: str) -> dict[int, tuple[str, str]]:
    """user id → (uuid, sub_token)."""
    rows = sql(dsn, "SELECT user_id, uuid::text, sub_token FROM subscriptions WHERE user_id = ANY(%s)", USERS)
    return {user_id: (uuid, token) for user_id, uuid, token in rows}


def live_uuids(xray: FakeXray) -> dict[str, str]:
    return {email: user.uuid for email, user in xray.users(TAG).items()}


def rotation(dsn: str) -> dict[str, Any]:
    [row] = sql(
        dsn,
        "SELECT id, status, rotated, skipped, notified, total, after_user_id FROM key_rotations "
        "ORDER BY id DESC LIMIT 1",
    )
    return dict(zip(("id", "status", "rotated", "skipped", "notified", "total", "after"), row, strict=True))


def reissues(dsn: str) -> dict[int, int]:
    rows = sql(dsn, "SELECT user_id, count(*) FROM key_reissues WHERE user_id = ANY(%s) GROUP BY user_id", USERS)
    return {user_id: count for user_id, count in rows}


def seed(dsn: str, fake: FakeTelegram) -> dict[int, tuple[str, str]]:
    add_users(dsn, FIRST, COUNT, days=30)
    for user_id in USERS:
        fake.add_user(user_id, f"User {user_id}").started = True
    return keys(dsn)


def xray_sections(xray: FakeXray, tmp_path: Path, **rotate: Any) -> dict[str, Any]:
    template = tmp_path / "template.json"
    template.write_text(json.dumps(reality_template()))
    (tmp_path / "xray").mkdir(exist_ok=True)
    return {
        "enabled": True, "template_path": str(template), "config_path": str(tmp_path / "xray" / "config.json"),
        "inbound_tag": TAG, "api_address": xray.address, "public_key": PUBLIC_KEY,
        "short_id": "6ba85179e30d4fc2", "reconcile_interval": 600, **rotate,
    }  # fmt: skip


QUIET_WORKERS = {"expiry_interval": HOUR, "reminders_interval": HOUR, "trial_interval": HOUR, "renewal_interval": HOUR}


@asynccontextmanager
async def rotating_daemon(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
    **rotate: Any,
) -> AsyncIterator[tuple[Running, FakeXray]]:
    fake, base_url = fake_telegram
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as xray:
        config = bot_config(
            write_config, dsn, fake, base_url, workers=QUIET_WORKERS, xray=xray_sections(xray, tmp_path, **rotate)
        )
        vpnd = await start_vpnd(nursery, config)
        try:
            yield vpnd, xray
        finally:
            await vpnd.stop()


def check_rotated_once(dsn: str, before: dict[int, tuple[str, str]]) -> dict[int, tuple[str, str]]:
    after = keys(dsn)
    assert all(after[u][0] != before[u][0] and after[u][1] != before[u][1] for u in USERS), "a key was not replaced"
    assert reissues(dsn) == {u: 1 for u in USERS}, "someone was rotated twice (or never)"
    return after


async def test_rotating_50_users_in_batches_of_10_reaches_xray_and_tells_each_user_once(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    before = seed(db_dsn, fake)
    cli = write_config(name="cli.toml", database={"dsn": db_dsn})
    async with rotating_daemon(
        nursery, fake_telegram, db_dsn, write_config, tmp_path, rotate_interval_seconds=0.3
    ) as (_vpnd, xray):
        await until(lambda: live_uuids(xray) == {f"u{u}": before[u][0] for u in USERS}, 15)
        dry = await vpnd_admin(cli, "rotate-keys", "--batch", "10", "--notify")
        assert "would replace the keys of 50 subscriptions (50 running)" in dry
        assert scalar(db_dsn, "SELECT count(*) FROM key_rotations") == 0
        out = await vpnd_admin(cli, "rotate-keys", "--batch", "10", "--notify", "--yes")
        assert "key rotation #" in out and "running" in out
        await until(lambda: rotation(db_dsn)["status"] == "done", 30)
        after = check_rotated_once(db_dsn, before)
        await until(lambda: live_uuids(xray) == {f"u{u}": after[u][0] for u in USERS}, 10)
        with trio.fail_after(20):
            for user_id in USERS:
                await fake.wait_for_bot_message(user_id, lambda m, u=user_id: after[u][1] in (m.text or ""))
        await trio.sleep(0.5)
        status = await vpnd_admin(cli, "rotate-keys", "--status")
    assert "done: 50 of 50 subscriptions done (50 keys replaced, 0 reissued already), 50 users told" in status
    # Each user: told once, with their new subscription URL; each old UUID removed from Xray, then the new one added.
    for user_id in USERS:
        told = [m for m in fake.bot_messages(user_id) if "subscription link" in (m.text or "")]
        assert len(told) == 1 and f"/sub/{after[user_id][1]}" in (told[0].text or "")
        ops = [(op, uuid) for op, email, uuid in xray.operations() if email == f"u{user_id}"]
        assert ops == [("add", before[user_id][0]), ("remove", ""), ("add", after[user_id][0])]
    # Batch by batch: five transactions of ten users each (key_reissues.at is the transaction's time).
    per_batch = sql(db_dsn, "SELECT count(*) FROM key_reissues GROUP BY at ORDER BY min(user_id)")
    assert [count for (count,) in per_batch] == [10] * 5
    audit = sql(db_dsn, "SELECT action, result, details ->> 'batch_size', details ->> 'notify' FROM admin_audit")
    assert audit == [("rotate_keys", "ok", "10", "true")]
    print(f"rotated {COUNT} keys in batches of 10; xray ops {len(xray.operations())}")


#: The SIGKILL'd process: the Xray writer, the outbox sender and the rotation worker.
ROTATION_SERVICES = ("run", "--services", "listener,xray,outbox,key_rotation")


@pytest.mark.slow
async def test_sigkill_mid_rotation_then_restart_rotates_everyone_exactly_once(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, base_url = fake_telegram
    before = seed(db_dsn, fake)
    cli = vpnd_cli(write_config(name="cli.toml", database={"dsn": db_dsn}))
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as xray:
        port = free_port()
        sections = config_sections(
            db_dsn, (fake, base_url), port=port, workers=QUIET_WORKERS,
            xray=xray_sections(xray, tmp_path, rotate_interval_seconds=0.4),
        )  # fmt: skip
        path = write_config_file(write_config(name="daemon.toml"), sections)
        http_url = f"http://127.0.0.1:{port}"
        with trio.fail_after(120):
            first = await start_daemon(nursery, path, tmp_path, args=ROTATION_SERVICES)
            await wait_ready(first, http_url)
            await until(lambda: len(live_uuids(xray)) == COUNT, 15)
            assert cli("admin", "rotate-keys", "--batch", "10", "--notify", "--yes").returncode == 0
            await until(lambda: 10 <= rotation(db_dsn)["rotated"], 20)
            first.signal(signal.SIGKILL)
            assert await first.wait() == -signal.SIGKILL
            at_kill = rotation(db_dsn)
            assert at_kill["status"] == "running" and at_kill["rotated"] < COUNT, at_kill
            # What committed is whole: the cursor, the keys and the messages agree.
            rotated_ids = [u for u, count in reissues(db_dsn).items() if count]
            assert at_kill["rotated"] == len(rotated_ids) and max(rotated_ids) == at_kill["after"]
            assert scalar(db_dsn, "SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'key_rotation:%%'") == len(
                rotated_ids
            )

            second = await start_daemon(nursery, path, tmp_path, args=ROTATION_SERVICES)
            await wait_ready(second, http_url)
            await until(lambda: rotation(db_dsn)["status"] == "done", 30)
            after = check_rotated_once(db_dsn, before)
            await until(lambda: live_uuids(xray) == {f"u{u}": after[u][0] for u in USERS}, 15)
            await until(lambda: all(fake.bot_messages(u) for u in USERS), 20)
            second.signal(signal.SIGTERM)
            assert await second.wait() == 0
    done = rotation(db_dsn)
    assert (done["rotated"], done["skipped"], done["notified"]) == (COUNT, 0, COUNT)
    per_user = sql(
        db_dsn,
        "SELECT chat_id, count(*) FROM outbox WHERE dedupe_key LIKE 'key_rotation:%%' GROUP BY chat_id",
    )
    assert dict(per_user) == {u: 1 for u in USERS}  # one message each, across the kill
    print(f"killed after {at_kill['rotated']} of {COUNT}; resumed from user {at_kill['after']}")


async def test_pause_resume_and_cancel_stop_the_rotation(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    before = seed(db_dsn, fake)
    run = vpnd_cli(write_config(name="cli.toml", database={"dsn": db_dsn}))
    async with rotating_daemon(
        nursery, fake_telegram, db_dsn, write_config, tmp_path, rotate_interval_seconds=0.3
    ) as (_vpnd, xray):
        await until(lambda: len(live_uuids(xray)) == COUNT, 15)
        assert run("admin", "rotate-keys", "--batch", "5", "--yes").returncode == 0
        again = run("admin", "rotate-keys", "--batch", "5", "--yes")
        assert again.returncode == 1 and "is open already" in again.stderr
        await until(lambda: rotation(db_dsn)["rotated"] >= 5, 10)

        paused = cli_result(run("admin", "rotate-keys", "--pause", "--json"))
        assert paused["status"] == "paused"
        await trio.sleep(1.0)
        assert rotation(db_dsn)["rotated"] == paused["rotated"]  # nothing moves while paused
        assert run("admin", "rotate-keys", "--pause").returncode == 1  # paused already: refused
        assert run("admin", "rotate-keys", "--resume").returncode == 0
        await until(lambda: rotation(db_dsn)["rotated"] > paused["rotated"], 10)

        cancelled = cli_result(run("admin", "rotate-keys", "--cancel", "--json"))
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
        await trio.sleep(1.0)
        stopped = rotation(db_dsn)
        assert stopped["status"] == "cancelled" and stopped["rotated"] == cancelled["rotated"] < COUNT
        now = keys(db_dsn)
        kept = [u for u in USERS if u > stopped["after"]]
        assert kept and all(now[u] == before[u] for u in kept)  # past the cursor: untouched
        assert all(now[u][0] != before[u][0] for u in USERS if u <= stopped["after"])
        assert "cancelled" in run("admin", "rotate-keys", "--status").stdout
        nothing = run("admin", "rotate-keys", "--cancel")
        assert nothing.returncode == 1 and "no key rotation is open" in nothing.stderr
        await until(lambda: live_uuids(xray) == {f"u{u}": now[u][0] for u in USERS}, 10)
    assert not any("subscription link" in (m.text or "") for u in USERS for m in fake.bot_messages(u))  # silent
    actions = [a for (a,) in sql(db_dsn, "SELECT action || ':' || result FROM admin_audit ORDER BY id")]
    assert actions == [
        "rotate_keys:ok", "rotate_keys:open", "rotate_keys_pause:ok", "rotate_keys_pause:unchanged",
        "rotate_keys_resume:ok", "rotate_keys_cancel:ok", "rotate_keys_cancel:unchanged",
    ]  # fmt: skip


def test_cli_reissues_one_user_and_refuses_what_it_cannot(db_dsn: str, write_config: Callable[..., Path]) -> None:
    add_users(db_dsn, FIRST, 1, days=30)
    add_users(db_dsn, FIRST + 1, 1)  # no subscription
    before = keys(db_dsn)[FIRST]
    run = vpnd_cli(write_config(database={"dsn": db_dsn}, http={"public_base_url": "https://shop.example"}))
    done = run("admin", "reissue", str(FIRST), "--notify")
    assert done.returncode == 0, done.stderr
    assert f"new key for user {FIRST}" in done.stdout
    after = keys(db_dsn)[FIRST]
    assert after[0] != before[0] and after[1] != before[1]
    [(text,)] = sql(db_dsn, "SELECT payload ->> 'text' FROM outbox WHERE chat_id = %s", FIRST)
    assert f"https://shop.example/sub/{after[1]}" in text
    assert cli_result(run("admin", "reissue", str(FIRST), "--json"))["uuid"] not in (before[0], after[0])
    missing = run("admin", "reissue", "424242")
    assert missing.returncode == 1 and "no user 424242" in missing.stderr
    bare = run("admin", "reissue", str(FIRST + 1))
    assert bare.returncode == 1 and "has no subscription" in bare.stderr
    assert run("admin", "rotate-keys", "--batch", "0", "--yes").returncode == 2
    assert run("admin", "rotate-keys", "--status").stdout.strip() == "no key rotation yet"
    results = sql(db_dsn, "SELECT action, target, result FROM admin_audit ORDER BY id")
    assert results == [
        ("reissue", str(FIRST), "ok"), ("reissue", str(FIRST), "ok"),
        ("reissue", "424242", "not_found"), ("reissue", str(FIRST + 1), "no_subscription"),
    ]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("rotate_batch_size", 0), ("rotate_interval_seconds", -1)])
def test_bad_pace_names_the_key(write_config: Callable[..., Path], key: str, value: int) -> None:
    path = write_config(xray={key: value})
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert f"[xray].{key}" in str(error.value) or key in str(error.value)
    assert str(path) in str(error.value) or path.name in str(error.value)


async def test_admin_bot_rotates_all_keys_after_a_confirmation_that_works_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    fake.add_user(ADMIN, "Admin")
    seed_users(db_dsn, fake, FIRST, 12)
    give_subscription(db_dsn, USERS[:12], kind="paid")
    sql(db_dsn, "UPDATE subscriptions SET expires_at = now() - interval '1 day' WHERE user_id = %s", FIRST)
    pace = {"rotate_batch_size": 5, "rotate_interval_seconds": 0.2}
    config = bot_config(write_config, db_dsn, fake, base_url, xray=pace)
    vpnd = await start_vpnd(nursery, config, Services.only("listener", "poller", "http", "key_rotation"))
    with trio.fail_after(30):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:rot"))
        confirm = await press(fake, ADMIN, menu, "adm:rot", predicate=has_button("adm:rots:1:"))
        assert "all 12 subscriptions (11 running)" in (confirm.text or "")
        start = button(confirm, "adm:rots:1:")  # (the message is edited in place: keep the data)
        progress = await press(fake, ADMIN, confirm, "adm:rots:1:", predicate=text_has("Key rotation started"))
        stop = button(progress, "adm:rotv:")
        assert stop.endswith(":pause")
        stop = stop.replace(":pause", ":cancel")
        # The same confirmation pressed again (a replay) starts nothing more.
        forge_callback(fake, ADMIN, confirm, start)
        await fake.wait_for_bot_message(ADMIN, text_has("Already done"))
        await until(lambda: rotation(db_dsn)["status"] == "done", 15)
        refreshed = await press(fake, ADMIN, progress, "adm:rot", predicate=text_has(": done"))
        assert "12 of 12 subscriptions done" in (refreshed.text or "") and "11 users told" in (refreshed.text or "")
        # A stale "Stop" of a rotation that ended changes nothing.
        forge_callback(fake, ADMIN, progress, stop)
        await fake.wait_for_bot_message(ADMIN, text_has("Nothing changed"))
    await vpnd.stop()
    assert scalar(db_dsn, "SELECT count(*) FROM key_rotations") == 1
    told = sql(db_dsn, "SELECT chat_id FROM outbox WHERE dedupe_key LIKE 'key_rotation:%%' ORDER BY chat_id")
    assert [c for (c,) in told] == USERS[1:12]  # the expired one is rotated, not told
    [(finished,)] = sql(db_dsn, "SELECT payload ->> 'text' FROM outbox WHERE chat_id = %s", ADMIN)
    assert "12 keys replaced, 11 users told" in finished
    assert reissues(db_dsn) == {u: 1 for u in USERS[:12]}
    audit = sql(db_dsn, "SELECT action, result FROM admin_audit WHERE action LIKE 'rotate%%' ORDER BY id")
    assert audit == [("rotate_keys", "ok"), ("rotate_keys_cancel", "unchanged")]  # the replay: no row of its own
