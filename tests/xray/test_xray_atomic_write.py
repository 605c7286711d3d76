import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vpnd.xray.render import write_atomically


def test_unchanged_content_is_not_written(tmp_path):
    path = tmp_path / "config.json"
    assert write_atomically(path, b"one") is True
    before = os.stat(path)
    time.sleep(0.01)
    assert write_atomically(path, b"one") is False
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert write_atomically(path, b"two") is True
    assert path.read_bytes() == b"two"
    assert os.stat(path).st_ino != before.st_ino  # replaced, not rewritten in place


def test_file_is_0640_whatever_mode_it_had(tmp_path):
    """The file holds every user's UUID: a world-readable old file is not a mode to keep."""
    path = tmp_path / "config.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    assert write_atomically(path, b"new")
    assert os.stat(path).st_mode & 0o7777 == 0o640
    os.chmod(path, 0o666)
    assert write_atomically(path, b"new") is False  # same content: not rewritten, but the mode is fixed
    assert os.stat(path).st_mode & 0o7777 == 0o640
    fresh = tmp_path / "fresh.json"
    write_atomically(fresh, b"x")
    assert os.stat(fresh).st_mode & 0o7777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "fresh.json"]  # no temp left


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_of_existing_file_is_kept(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"old")
    os.chown(path, 4321, 4322)
    assert write_atomically(path, b"new")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (4321, 4322)


def test_directory_target_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        write_atomically(tmp_path, b"x")


WRITER = textwrap.dedent(
    """
    import sys
    from vpnd.xray.render import write_atomically
    path, size = sys.argv[1], int(sys.argv[2])
    contents = [b"A" * size, b"B" * size]
    write_atomically(path, contents[0])
    print("ready", flush=True)
    i = 1
    while True:
        write_atomically(path, contents[i % 2])
        i += 1
    """
)


@pytest.mark.slow
def test_kill_9_mid_write_leaves_old_or_new_file_never_partial(tmp_path):
    path = tmp_path / "config.json"
    size = 4 * 1024 * 1024
    whole = {b"A" * size, b"B" * size}
    deadline = time.monotonic() + 60
    killed_mid_write = 0
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(size)],
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        try:
            assert proc.stdout.readline() == b"ready\n"
            # readers racing the writer only ever see a whole file
            stop = time.monotonic() + 0.05 + 0.07 * round_
            reads = 0
            while True:  # at least one read, however late this process gets the CPU
                assert path.read_bytes() in whole
                reads += 1
                if time.monotonic() >= stop:
                    break
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()
        assert reads > 0
        assert path.read_bytes() in whole
        killed_mid_write += len(list(tmp_path.iterdir())) > 1
        assert time.monotonic() < deadline
    print(f"rounds killed with a temp file present: {killed_mid_write}/6")
    # a writer killed mid-write may leave its temp file; the next write clears it
    write_atomically(path, b"final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert path.read_bytes() == b"final"
