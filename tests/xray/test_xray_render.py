import base64
import json
import random
import resource
import uuid

import pytest

from vpnd.xray.render import Client, TemplateError, load_template, render_config

PRIVATE_KEY = base64.urlsafe_b64encode(bytes(range(1, 33))).rstrip(b"=").decode()


def reality_template():
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {"tag": "api", "listen": "127.0.0.1", "port": 10085, "protocol": "dokodemo-door"},
            {
                "tag": "vless-in",
                "port": 443,
                "protocol": "vless",
                "settings": {"clients": [{"id": "example"}], "decryption": "none"},
                "streamSettings": {
                    "network": "tcp",
                    "security": "reality",
                    "realitySettings": {
                        "target": "www.microsoft.com:443",
                        "serverNames": ["www.microsoft.com"],
                        "privateKey": PRIVATE_KEY,
                        "shortIds": ["", "6ba85179e30d4fc2"],
                    },
                },
            },
        ],
        "outbounds": [{"protocol": "freedom"}],
    }


def write(tmp_path, document, name="template.json"):
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def clients(n, seed=0):
    rng = random.Random(seed)
    return [
        Client(uuid=str(uuid.UUID(int=rng.getrandbits(128))), email=f"u{i:07d}", flow="xtls-rprx-vision")
        for i in range(n)
    ]


def test_render_replaces_clients_and_keeps_the_rest(tmp_path):
    template = load_template(write(tmp_path, reality_template()), inbound_tag="vless-in")
    assert template.port == 443
    assert template.reality.server_names == ("www.microsoft.com",)
    assert template.reality.short_ids == ("", "6ba85179e30d4fc2")
    people = clients(3)
    rendered = json.loads(render_config(template, people))
    expected = reality_template()
    expected["inbounds"][1]["settings"]["clients"] = [{"id": c.uuid, "email": c.email, "flow": c.flow} for c in people]
    assert rendered == expected


def test_render_empty_and_deterministic(tmp_path):
    template = load_template(write(tmp_path, reality_template()), inbound_tag="vless-in")
    assert json.loads(render_config(template, []))["inbounds"][1]["settings"]["clients"] == []
    people = clients(50)
    batches = iter([people[:7], people[7:30], people[30:]])
    streamed = render_config(template, (c for batch in batches for c in batch))
    assert streamed == render_config(template, people)
    assert render_config(template, people[:-1]) != streamed
    # a fresh load of the same template file renders the same bytes (placeholder is not leaked)
    again = load_template(write(tmp_path, reality_template(), "copy.json"), inbound_tag="vless-in")
    assert render_config(again, people) == streamed


def test_render_requires_sorted_unique_emails(tmp_path):
    template = load_template(write(tmp_path, reality_template()), inbound_tag="vless-in")
    a, b = clients(2)
    with pytest.raises(ValueError, match="out of order"):
        render_config(template, [b, a])
    with pytest.raises(ValueError, match="duplicate"):
        render_config(template, [a, a])


def test_client_validation():
    with pytest.raises(ValueError):
        Client(uuid="nope", email="a")
    with pytest.raises(ValueError, match="lowercase"):
        Client(uuid=str(uuid.uuid4()), email="Alice")
    with pytest.raises(ValueError, match="flow"):
        Client(uuid=str(uuid.uuid4()), email="a", flow="xtls-rprx-direct")


def test_render_100k_clients_streams(tmp_path):
    """100,000 clients arrive as a generator of DB-sized batches; the render never holds them as dicts."""
    template = load_template(write(tmp_path, reality_template()), inbound_tag="vless-in")
    n = 100_000

    def from_db():
        rng = random.Random(1)
        for start in range(0, n, 1000):  # keyset batches of 1000
            yield from (
                Client(uuid=str(uuid.UUID(int=rng.getrandbits(128))), email=f"u{i:07d}")
                for i in range(start, start + 1000)
            )

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = render_config(template, from_db())
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert data == render_config(template, from_db())
    parsed = json.loads(data)["inbounds"][1]["settings"]["clients"]
    assert len(parsed) == n and parsed[-1]["email"] == f"u{n - 1:07d}"
    # output is ~9 MB; a list of 100k dicts plus json.dumps would need several times that
    assert rss_growth_mb < 60, rss_growth_mb


@pytest.mark.parametrize(
    "document, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "top level must be a JSON object, got array"),
        ({"inbounds": {}}, "'inbounds' must be an array, got object"),
        ({}, "'inbounds' must be an array, got missing"),
        ({"inbounds": [{"tag": "other"}]}, "no inbound with tag 'vless-in' \\(tags present: \\['other'\\]\\)"),
        (
            {"inbounds": [{"tag": "vless-in", "protocol": "vless", "settings": {"clients": []}}] * 2},
            "2 inbounds have tag",
        ),
        ({"inbounds": [{"tag": "vless-in", "protocol": "vmess"}]}, "protocol is 'vmess', expected 'vless'"),
        ({"inbounds": [{"tag": "vless-in", "protocol": "vless"}]}, "inbounds\\[0\\] \\(tag 'vless-in'\\).settings"),
        (
            {"inbounds": [{"tag": "vless-in", "protocol": "vless", "settings": {}}]},
            "settings.clients must be an array, got missing",
        ),
        (
            {"inbounds": [{"tag": "vless-in", "protocol": "vless", "settings": {"clients": {}}}]},
            "settings.clients must be an array, got object",
        ),
    ],
)
def test_template_errors(tmp_path, document, message):
    path = write(tmp_path, document)
    with pytest.raises(TemplateError, match=message) as info:
        load_template(path, inbound_tag="vless-in")
    assert str(path) in str(info.value)


def test_template_missing_file(tmp_path):
    with pytest.raises(TemplateError, match="cannot read"):
        load_template(tmp_path / "absent.json", inbound_tag="vless-in")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("privateKey"), "privateKey must be a string"),
        (lambda r: r.update(privateKey="short"), "privateKey: REALITY private key must be 43"),
        (lambda r: r.pop("target"), "target \\(or dest\\)"),
        (lambda r: r.update(serverNames=[]), "serverNames must be a non-empty array"),
        (lambda r: r.update(serverNames=["ok.com", "bad name"]), "serverNames\\[1\\]"),
        (lambda r: r.update(shortIds=["xyz"]), "shortIds\\[0\\]: REALITY short id must be hex"),
    ],
)
def test_reality_errors(tmp_path, change, message):
    document = reality_template()
    change(document["inbounds"][1]["streamSettings"]["realitySettings"])
    with pytest.raises(TemplateError, match=message):
        load_template(write(tmp_path, document), inbound_tag="vless-in")


def test_reality_security_without_settings(tmp_path):
    document = reality_template()
    del document["inbounds"][1]["streamSettings"]["realitySettings"]
    with pytest.raises(TemplateError, match="realitySettings is missing"):
        load_template(write(tmp_path, document), inbound_tag="vless-in")


def test_dest_is_accepted_as_old_name_of_target(tmp_path):
    document = reality_template()
    reality = document["inbounds"][1]["streamSettings"]["realitySettings"]
    reality["dest"] = reality.pop("target")
    assert load_template(write(tmp_path, document), inbound_tag="vless-in").reality is not None
