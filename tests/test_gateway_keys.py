"""Client keys: hashed storage, constant-time checks, atomic 0600 writes."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from gateway.keys import create_key, hash_key, load_keys
from hpc.errors import ConfigError, MTError
from hpc.ownerkey import KEY_PREFIX


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_hash_key_is_hex_sha256() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_create_key_writes_only_the_hash_0600_in_a_0700_dir(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.yaml"
    key = create_key(path, "alice")
    assert key.startswith(KEY_PREFIX)
    assert len(key) > 40
    text = path.read_text()
    assert key not in text
    assert key[len(KEY_PREFIX) :] not in text
    assert hash_key(key) in text
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["keys.yaml"]  # no tmp file left
    store = load_keys(path)
    assert store.check(key) == "alice"
    assert store.check(key + "x") is None
    assert store.check("") is None


def test_create_key_appends_and_keeps_earlier_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    alice = create_key(path, "alice")
    bob = create_key(path, "bob")
    assert alice != bob
    store = load_keys(path)
    assert len(store) == 2
    assert store.check(alice) == "alice"
    assert store.check(bob) == "bob"
    assert _mode(path) == 0o600


def test_create_key_refuses_a_duplicate_name_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = create_key(path, "alice")
    before = path.read_bytes()
    with pytest.raises(MTError, match="already has a key named 'alice'"):
        create_key(path, "alice")
    assert path.read_bytes() == before
    assert load_keys(path).check(key) == "alice"


@pytest.mark.parametrize("name", ["", "has space", "a/b", "-leading-dash", "x" * 65])
def test_create_key_refuses_a_bad_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / "keys.yaml"
    with pytest.raises(MTError, match="bad key name"):
        create_key(path, name)
    assert not path.exists()


def test_create_key_refuses_to_rewrite_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - name: alice\n    sha256: nothex\n")
    with pytest.raises(ConfigError):
        create_key(path, "bob")
    assert "nothex" in path.read_text()


def test_load_keys_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        f"  - name: alice\n    sha256: {hash_key('k1')}\n"
        "  - name: bob\n    sha256: NOT-A-HASH\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_keys(path)
    assert [str(issue).split(": ")[0:2] for issue in caught.value.issues] == [
        ["keys.yaml:5", "keys[1].sha256"]
    ]


def test_load_keys_rejects_duplicate_names_and_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    digest = hash_key("k")
    path.write_text(
        f"keys:\n  - name: a\n    sha256: {digest}\n  - name: a\n    sha256: {digest}\n"
    )
    with pytest.raises(ConfigError, match=r"keys.yaml:4: keys\[1\].name: duplicate name"):
        load_keys(path)
    path.write_text(f"keys:\n  - name: a\n    sha256: {digest}\n    key: plaintext\n")
    with pytest.raises(ConfigError, match=r"keys.yaml:4: keys\[0\].key: unknown field"):
        load_keys(path)


def test_load_keys_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_keys(tmp_path / "nope.yaml")


def test_an_empty_key_list_lets_nobody_in(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys: []\n")
    store = load_keys(path)
    assert len(store) == 0
    assert store.check("anything") is None
