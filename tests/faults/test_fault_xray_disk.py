"""Xray's config directory becomes read-only, or its disk fills up, while the daemon runs.

Expected (vpnd/nurseries/xray.py "Failures"): a clear error naming the file and the OS reason, in the
log and in `/readyz` (503, check "xray"); the old file stays in place, whole and parseable, and no
temp file is left behind; everything else goes on — users still activate and are applied live
through Xray's API, the bot answers, the database and Telegram checks pass. Once the directory is
writable again, the file catches up on its own and `/readyz` is 200.

Read-only is made with `chattr +i` on the directory (root ignores permission bits; an immutable
directory refuses even root), disk full with a 120 MiB tmpfs mounted on it (above the health check's
100 MiB free-space threshold, so the daemon starts healthy) and then filled. Both need root
(CAP_LINUX_IMMUTABLE, CAP_SYS_ADMIN); elsewhere the tests skip and say so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.faults.support import (
    TAG,
    Supervisor,
    daemon_sections,
    desired_xray_set,
    file_clients,
    get_json,
    until,
    write_xray_template,
)
from tests.harness import config_text, text_has
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram
from vpnd_sandbox.xray_fake import start_fake_xray

FIRST = [44_001, 44_002]
WHILE_BROKEN = [44_101, 44_102, 44_103]
BYSTANDER = 44_900


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def immutable(directory: Path) -> Iterator[Callable[[bool], None]]:
    """`set(True)` makes `directory` immutable (chattr +i), `set(False)` undoes it; undone on exit."""

    def set_immutable(on: bool) -> None:
        result = _run("chattr", "+i" if on else "-i", str(directory))
        if result.returncode != 0:
            raise RuntimeError(f"chattr failed: {result.stderr.strip()}")

    try:
        yield set_immutable
    finally:
        _run("chattr", "-i", str(directory))


def require_immutable_support(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    result = _run("chattr", "+i", str(probe))
    if result.returncode != 0:
        pytest.skip(f"cannot make a directory immutable here (chattr +i: {result.stderr.strip() or 'failed'})")
    try:
        (probe / "x").write_text("x")
        pytest.skip("chattr +i does not stop writes here")
    except PermissionError:
        pass
    finally:
        _run("chattr", "-i", str(probe))


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str = "120m") -> Iterator[None]:
    result = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield
    finally:
        _run("umount", "-l", str(directory))


def fill_up(directory: Path) -> Path:
    """Write a filler file until the filesystem says ENOSPC."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


async def scenario(
    telegram: FakeTelegram,
    telegram_url: str,
    db_dsn: str,
    tmp_path: Path,
    xray_dir: Path,
    break_it: Callable[[], None],
    fix_it: Callable[[], None],
    reason: str,
) -> dict[str, float]:
    for uid in [*FIRST, *WHILE_BROKEN, BYSTANDER]:
        telegram.add_user(uid, f"User {uid}")
    port = free_port()
    template = write_xray_template(tmp_path / "xray-template.json")
    xray_file = xray_dir / "config.json"
    figures: dict[str, float] = {}
    with start_fake_xray("xray.", inbound_tags=(TAG,)) as xray:

        def live() -> dict[str, str]:
            return {email: user.uuid for email, user in xray.users(TAG).items()}

        config_path = tmp_path / "config.toml"
        config_path.write_text(
            config_text(
                daemon_sections(
                    token=telegram.token,
                    telegram_url=telegram_url,
                    dsn=db_dsn,
                    port=port,
                    xray={
                        "enabled": True,
                        "template_path": str(template),
                        "config_path": str(xray_file),
                        "api_address": xray.address,
                        "reconcile_interval": 4.0,
                    },
                )
            )
        )
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, config_path, tmp_path, port)
            await supervisor.start()
            with trio.fail_after(240):
                for uid in FIRST:
                    telegram.user_sends(uid, "/trial")
                    await telegram.wait_for_bot_message(uid, text_has("free trial is active"))
                await until(lambda: desired_xray_set(db_dsn) == live() == file_clients(xray_file), timeout=30)
                assert len(live()) == len(FIRST)
                before = xray_file.read_bytes()

                break_it()
                for uid in WHILE_BROKEN:
                    telegram.user_sends(uid, "/trial")
                    await telegram.wait_for_bot_message(uid, text_has("free trial is active"))
                # Live apply does not need the file.
                await until(lambda: desired_xray_set(db_dsn) == live(), timeout=30)
                assert len(live()) == len(FIRST) + len(WHILE_BROKEN)

                async def xray_not_ready() -> tuple[int, dict[str, object]]:
                    while True:
                        status, body = await get_json(f"{supervisor.url}/readyz")
                        if not body["checks"]["xray"]["ok"]:
                            return status, body
                        await trio.sleep(0.2)

                with trio.fail_after(30):
                    status, body = await xray_not_ready()
                assert status == 503
                checks = body["checks"]
                assert isinstance(checks, dict)
                detail = checks["xray"]["detail"]
                assert f"cannot write {xray_file}: {reason}" in detail, detail
                assert checks["database"]["ok"] and checks["telegram"]["ok"], checks
                # Nothing else stops: the bot answers, health answers, the daemon lives.
                telegram.user_sends(BYSTANDER, "/help")
                await telegram.wait_for_bot_message(BYSTANDER, timeout=30)
                assert (await get_json(f"{supervisor.url}/healthz"))[0] == 200
                # The old file is untouched and whole; no temp file left behind.
                assert xray_file.read_bytes() == before
                assert sorted(p.name for p in xray_dir.iterdir() if p.name != "filler.bin") == ["config.json"]
                log = supervisor.current.log()
                assert "event=xray_problem component=file" in log and reason in log, log[-3000:]
                assert supervisor.alive()

                fixed_at = trio.current_time()
                fix_it()
                await until(lambda: desired_xray_set(db_dsn) == live() == file_clients(xray_file), timeout=30)
                figures["file caught up after the fix (s)"] = trio.current_time() - fixed_at
                with trio.fail_after(30):
                    while (await get_json(f"{supervisor.url}/readyz"))[0] != 200:
                        await trio.sleep(0.2)
                figures["ready again after the fix (s)"] = trio.current_time() - fixed_at
                assert "event=xray_recovered component=file" in supervisor.current.log()
                assert await supervisor.stop() == 0, supervisor.tail()
            nursery.cancel_scope.cancel()
    return figures


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_read_only_xray_directory_is_reported_and_nothing_else_stops(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    require_immutable_support(tmp_path)
    telegram, telegram_url = fake_telegram
    xray_dir = tmp_path / "xray"
    xray_dir.mkdir()
    with immutable(xray_dir) as set_immutable:
        figures = await scenario(
            telegram,
            telegram_url,
            db_dsn,
            tmp_path,
            xray_dir,
            lambda: set_immutable(True),
            lambda: set_immutable(False),
            os.strerror(errno.EPERM),
        )
    print(f"\nread-only Xray directory: {figures}")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_full_disk_under_xray_config_is_reported_and_nothing_else_stops(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, tmp_path: Path
) -> None:
    telegram, telegram_url = fake_telegram
    xray_dir = tmp_path / "xray"
    xray_dir.mkdir()
    with small_tmpfs(xray_dir):
        filler: list[Path] = []
        figures = await scenario(
            telegram,
            telegram_url,
            db_dsn,
            tmp_path,
            xray_dir,
            lambda: filler.append(fill_up(xray_dir)),
            lambda: filler[0].unlink(),
            os.strerror(errno.ENOSPC),
        )
    print(f"\nfull disk under the Xray config: {figures}")
