"""node.toml: rendering, loading and validation (hansa.node.config)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hansa.crypto import SigningKey
from hansa.node.config import (
    DEFAULT_PORT,
    NodeConfig,
    NodeLimits,
    add_trusted_key,
    config_path,
    load_config,
    parse_config,
    render_config,
)
from hansa.protocol.errors import ConfigError, ErrorCode

KEY_HEX = SigningKey(bytes(range(32))).public_key.raw.hex()


def test_rendered_config_round_trips_with_defaults(tmp_path: Path) -> None:
    text = render_config(city="melbourne")
    config = parse_config(text, tmp_path)
    assert config.city == "melbourne"
    assert config.host == "127.0.0.1"
    assert config.port == DEFAULT_PORT
    assert config.key_file == tmp_path.resolve() / "node.key"
    assert config.key_passphrase_env is None
    assert config.limits == NodeLimits()
    assert config.limits.max_request_bytes == 256 * 1024
    assert config.trusted == ()


def test_rendered_config_documents_every_field() -> None:
    text = render_config(city="melbourne")
    doc = tomllib.loads(text)
    documented = {f.name for f in dataclasses.fields(NodeLimits)}
    assert set(doc["limits"]) == documented
    lines = text.splitlines()
    for section in ("node", "limits"):
        for name in doc[section]:
            (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{name} = ")]
            # Every field is preceded by a comment line explaining it.
            assert lines[index - 1].startswith("#"), name


def test_rendered_limits_are_written_back_exactly(tmp_path: Path) -> None:
    limits = NodeLimits(max_request_bytes=65536, query_timeout_s=2.5, memory_limit="512MB")
    config = parse_config(
        render_config(city="cape-town", port=0, limits=limits, key_passphrase_env="HANSA_PW"),
        tmp_path,
    )
    assert config.limits == limits
    assert config.port == 0
    assert config.key_passphrase_env == "HANSA_PW"


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (('city = "melbourne"', 'city = "Melbourne"'), "city"),
        (('city = "melbourne"', "city = 7"), "city must be a str"),
        (("port = 8470", "port = 70000"), "port"),
        (("port = 8470", "port = true"), "port must be a int, got a boolean"),
        (("max_request_bytes = 262144", "max_request_bytes = 10"), "max_request_bytes"),
        (("query_timeout_s = 10.0", "query_timeout_s = -1"), "query_timeout_s"),
        (("query_timeout_s = 10.0", 'query_timeout_s = "10"'), "query_timeout_s"),
        (('memory_limit = "1GB"', 'memory_limit = "lots"'), "memory_limit"),
        (("max_concurrent_queries = 2", "max_concurrent_queries = 0"), "max_concurrent"),
        (("replay_capacity = 100000", "replay_capacity = 0"), "replay_capacity"),
        (("max_skew_ms = 30000", "max_skew_ms = 1.5"), "max_skew_ms"),
        (("access_log = false", "access_log = 1"), "access_log"),
        (("[limits]", "[limits]\nmax_reqest_bytes = 1"), "unknown key 'max_reqest_bytes'"),
        (("[node]", "[nodes]\nx = 1\n[node]"), "unknown key 'nodes'"),
        (('key_file = "node.key"', 'key_file = ""'), "key_file"),
        (('key_passphrase_env = ""', 'key_passphrase_env = "1 2"'), "key_passphrase_env"),
        (("[limits]", "[limits\n"), "not valid TOML"),
    ],
)
def test_invalid_config_is_one_line_config_error(
    tmp_path: Path, edit: tuple[str, str], needle: str
) -> None:
    text = render_config(city="melbourne")
    assert edit[0] in text
    with pytest.raises(ConfigError) as info:
        parse_config(text.replace(edit[0], edit[1], 1), tmp_path, source="node.toml")
    assert info.value.code is ErrorCode.CONFIG
    assert "\n" not in info.value.message
    assert info.value.message.startswith("node.toml: ")
    assert needle in info.value.message


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ('principal = "ana@melbourne"', "needs both"),
        (f'principal = "Ana"\nkey = "{KEY_HEX}"', "principal"),
        ('principal = "ana@melbourne"\nkey = "abcd"', "64 hex digits"),
        # 32 bytes that are not a canonical prime-order point (the identity, small order).
        ('principal = "ana@melbourne"\nkey = "01' + "00" * 31 + '"', "public key"),
        (f'principal = "ana@melbourne"\nkey = "{KEY_HEX}"\nrole = "x"', "unknown key 'role'"),
    ],
)
def test_invalid_trusted_entries_are_refused(tmp_path: Path, entry: str, needle: str) -> None:
    text = render_config(city="melbourne") + f"\n[[trusted]]\n{entry}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, tmp_path)
    assert needle in info.value.message
    assert "\n" not in info.value.message


def test_one_key_cannot_speak_for_two_principals(tmp_path: Path) -> None:
    text = render_config(city="melbourne")
    for who in ("ana@melbourne", "bob@melbourne"):
        text += f'\n[[trusted]]\nprincipal = "{who}"\nkey = "{KEY_HEX}"\n'
    with pytest.raises(ConfigError, match="both"):
        parse_config(text, tmp_path)


def test_missing_config_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(config_path(tmp_path)) in info.value.message
    assert "hansa node init" in info.value.message


def test_add_trusted_key_appends_and_keeps_comments(tmp_path: Path) -> None:
    config_path(tmp_path).write_text(render_config(city="melbourne"), encoding="utf-8")
    other = SigningKey(bytes([7]) * 32).public_key
    add_trusted_key(tmp_path, "ana@melbourne", KEY_HEX)
    config = add_trusted_key(tmp_path, "bob@melbourne", other.raw.hex())
    assert [t.principal for t in config.trusted] == ["ana@melbourne", "bob@melbourne"]
    assert config.trusted[1].public_key == other
    assert config.principals()[other.key_id] == "bob@melbourne"
    assert set(config.key_lookup()) == {t.public_key.key_id for t in config.trusted}
    text = config_path(tmp_path).read_text(encoding="utf-8")
    assert "# Largest POST /v1/query body accepted" in text
    with pytest.raises(ConfigError, match="already trusted"):
        add_trusted_key(tmp_path, "carol@melbourne", KEY_HEX)
    with pytest.raises(ConfigError):
        add_trusted_key(tmp_path, "Not A Principal", SigningKey.generate().public_key.raw.hex())
    # A refused change leaves the file as it was.
    assert config_path(tmp_path).read_text(encoding="utf-8") == text


def test_passphrase_comes_from_the_named_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = NodeConfig(data_dir=tmp_path, city="melbourne", key_passphrase_env="HANSA_TEST_PW")
    monkeypatch.delenv("HANSA_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="HANSA_TEST_PW"):
        config.passphrase()
    monkeypatch.setenv("HANSA_TEST_PW", "correct horse")
    assert config.passphrase() == b"correct horse"
    assert NodeConfig(data_dir=tmp_path, city="melbourne").passphrase() is None


def test_freshness_limits_follow_node_limits() -> None:
    limits = NodeLimits(max_skew_ms=1000, max_validity_ms=5000, replay_capacity=10)
    fresh = limits.freshness()
    assert (fresh.max_skew_ms, fresh.max_validity_ms, fresh.capacity) == (1000, 5000, 10)


@given(st.text(max_size=40))
def test_any_city_text_either_loads_or_is_a_config_error(city: str) -> None:
    text = render_config(city="melbourne").replace('city = "melbourne"', f"city = {city!r}")
    try:
        config = parse_config(text, Path("/tmp/hansa-test-node"))
    except ConfigError as exc:
        assert "\n" not in exc.message
    else:
        assert config.city == city
        assert re.fullmatch(r"[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?", city)


@given(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from(
        ["max_request_bytes", "engine_threads", "max_queued_queries", "replay_capacity"]
    ),
)
def test_integer_limits_are_range_checked(value: int, name: str) -> None:
    try:
        overrides: dict[str, Any] = {name: value}
        limits = NodeLimits(**overrides)
    except ConfigError as exc:
        assert name in exc.message
    else:
        assert getattr(limits, name) == value
        assert value >= 0


def test_ids_with_a_trailing_newline_are_refused(tmp_path: Path) -> None:
    # ``$`` matches before a final newline; ids must match whole (spec §5.3).
    text = render_config(city="melbourne")
    with pytest.raises(ConfigError, match="city"):
        parse_config(text.replace('city = "melbourne"', 'city = "melbourne\\n"', 1), tmp_path)
    entry = f'\n[[trusted]]\nprincipal = "ana@melbourne\\n"\nkey = "{KEY_HEX}"\n'
    with pytest.raises(ConfigError, match="principal"):
        parse_config(text + entry, tmp_path)
