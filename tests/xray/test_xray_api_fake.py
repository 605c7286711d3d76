"""XrayApi against the fake Xray gRPC server on loopback (both protobuf prefixes)."""

import uuid

import grpc
import pytest
import trio

from vpnd.xray.api import Traffic, XrayApi, XrayApiError, XrayUnavailable
from vpnd_sandbox.xray_fake import start_fake_xray

TAG = "vless-in"


@pytest.fixture(params=["xray.", "v2ray.core."])
def fake(request):
    with start_fake_xray(request.param, inbound_tags=(TAG,)) as server:
        yield server


@pytest.fixture
def api(fake):
    with XrayApi(fake.address, prefix=fake.prefix, timeout=2.0) as client:
        yield client


async def test_add_and_remove_like_xray(fake, api):
    user_id = str(uuid.uuid4())
    with trio.fail_after(10):
        assert await api.add_vless_user(TAG, "u1", user_id, "xtls-rprx-vision") is True
        live = fake.users(TAG)
        assert set(live) == {"u1"}
        assert (live["u1"].uuid, live["u1"].flow) == (user_id, "xtls-rprx-vision")
        # already there → success without change; Xray compares emails case-insensitively
        assert await api.add_vless_user(TAG, "u1", str(uuid.uuid4()), "") is False
        assert await api.add_vless_user(TAG, "U1", str(uuid.uuid4()), "") is False
        assert fake.users(TAG)["u1"].uuid == user_id
        assert await api.remove_user(TAG, "u1") is True
        assert fake.users(TAG) == {}
        assert await api.remove_user(TAG, "u1") is False


async def test_unknown_inbound_tag_is_an_error_not_success(api):
    with trio.fail_after(10):
        with pytest.raises(XrayApiError, match="failed to get handler: nope") as info:
            await api.remove_user("nope", "u1")
        assert info.value.code == "UNKNOWN"
        with pytest.raises(XrayApiError, match="handler not found"):
            await api.add_vless_user("nope", "u1", str(uuid.uuid4()), "")


async def test_bad_uuid_is_an_error(api):
    with trio.fail_after(10), pytest.raises(XrayApiError, match="failed to parse user"):
        await api.add_vless_user(TAG, "u1", "not-a-uuid", "")


async def test_wrong_prefix_is_an_error(fake):
    other = "xray." if fake.prefix == "v2ray.core." else "v2ray.core."
    with XrayApi(fake.address, prefix=other, timeout=2.0) as api, trio.fail_after(10):
        with pytest.raises(XrayApiError) as info:
            await api.ping()
        assert info.value.code == "UNIMPLEMENTED"


async def test_user_traffic_and_reset(fake, api):
    with trio.fail_after(10):
        assert await api.query_user_traffic() == {}
        fake.bump_traffic("u1", uplink=100, downlink=2000)
        fake.bump_traffic("u2", downlink=5)
        fake.bump_traffic("u1", uplink=1)
        assert await api.query_user_traffic() == {"u1": Traffic(101, 2000), "u2": (0, 5)}
        assert await api.query_user_traffic(reset=True) == {"u1": (101, 2000), "u2": (0, 5)}
        assert await api.query_user_traffic() == {"u1": (0, 0), "u2": (0, 0)}
        fake.bump_traffic("weird>>>name", uplink=2**40)
        assert (await api.query_user_traffic())["weird>>>name"] == (2**40, 0)


async def test_down_then_back(fake, api):
    with trio.fail_after(20):
        await api.ping()
        fake.stop()
        with pytest.raises(XrayUnavailable):  # refused at once, not a hang (the fail_after bounds it)
            await api.add_vless_user(TAG, "u1", str(uuid.uuid4()), "")
        fake.start()
        # the channel reconnects by itself (backoff capped at 3 s)
        while True:
            try:
                assert await api.add_vless_user(TAG, "u1", str(uuid.uuid4()), "") is True
                break
            except XrayUnavailable:
                await trio.sleep(0.1)
        assert set(fake.users(TAG)) == {"u1"}
        # a restarted Xray forgets live users
        fake.stop()
        fake.start(reset=True)
        while True:
            try:
                assert await api.remove_user(TAG, "u1") is False
                break
            except XrayUnavailable:
                await trio.sleep(0.1)


async def test_slow_server_times_out(fake):
    fake.set_delay(60)  # far beyond the fail_after: only the client's own deadline can end the call in time
    with XrayApi(fake.address, prefix=fake.prefix, timeout=0.3) as api, trio.fail_after(10):
        with pytest.raises(XrayUnavailable, match="DEADLINE_EXCEEDED"):
            await api.ping()
    fake.set_delay(0)


async def test_cancelling_the_task_cancels_the_call(fake):
    fake.set_delay(60)  # far beyond the fail_after: only cancelling the call itself ends it in time
    with XrayApi(fake.address, prefix=fake.prefix, timeout=30) as api, trio.fail_after(10):
        with trio.move_on_after(0.3) as scope:
            await api.add_vless_user(TAG, "u1", str(uuid.uuid4()), "")
        assert scope.cancelled_caught
    fake.set_delay(0)


async def test_injected_errors(fake, api):
    with trio.fail_after(10):
        fake.fail_next(2)
        for _ in range(2):
            with pytest.raises(XrayUnavailable, match="injected fault"):
                await api.add_vless_user(TAG, "u1", str(uuid.uuid4()), "")
        assert await api.add_vless_user(TAG, "u1", str(uuid.uuid4()), "") is True
        fake.fail_next(1, grpc.StatusCode.INTERNAL, "boom")
        with pytest.raises(XrayApiError, match="boom") as info:
            await api.remove_user(TAG, "u1")
        assert info.value.code == "INTERNAL"
        assert await api.remove_user(TAG, "u1") is True
        assert fake.calls() == ["AlterInbound"] * 5


async def test_concurrent_adds(fake, api):
    with trio.fail_after(20):
        results = {}

        async def add(i):
            results[i] = await api.add_vless_user(TAG, f"u{i % 50}", str(uuid.uuid4()), "")

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(add, i)
        assert sum(results.values()) == 50
        assert len(fake.users(TAG)) == 50
