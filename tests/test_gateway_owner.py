"""The gateway serves only its owner by default: `mt gateway` without --keys requires the
owner key ($MT_HOME/gateway/owner.key, hpc.ownerkey), and always accepts it.

Requests are sent by a separate process (:func:`status_of`), the key on its stdin: the same
probe run through a prefix that switches to another user is the cross-user variant (the
prefix is the only difference; the owner key is not readable by that user, so it has no
key to send). The `mt tunnel` side (the key read over SSH and fed to the openai client) is
in tests/test_tunnel_owner.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from mtcli import mt, owner_key, running_gateway
from test_gateway_proxy import gateway
from test_gateway_reload import eventually

from hpc.ownerkey import ensure_owner_key, owner_key_path, read_owner_key, rotate_owner_key
from hpc.privatefile import make_private_dir

pytestmark = pytest.mark.timeout(120)

# GET {url}/v1/models with the key read from stdin (none if empty); prints the status.
_PROBE = """
import sys, urllib.error, urllib.request
key = sys.stdin.read().strip()
request = urllib.request.Request(sys.argv[1])
if key:
    request.add_header("Authorization", "Bearer " + key)
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        print(response.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


def status_of(url: str, key: str | None, *, prefix: Sequence[str] = ()) -> int:
    """The status a separate process gets for ``url``; ``prefix`` runs it (as another user).

    The key goes on the probe's stdin, never its argv (`ps` shows argv to every user).
    """
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _PROBE, url],
        input=key or "",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(done.stdout.strip())


def _home() -> Path:
    return Path(os.environ["MT_HOME"])


def test_the_owner_key_is_made_once_private_and_in_mt_keys_format() -> None:
    path, created = ensure_owner_key(_home())
    assert created and path == owner_key_path(_home())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(_home().stat().st_mode) == 0o700
    key = read_owner_key(path)
    assert key.startswith("mt-") and len(key) == 46
    assert ensure_owner_key(_home()) == (path, False)  # never replaced
    assert read_owner_key(path) == key
    assert mt("keys", "owner").stdout == key + "\n"
    env = mt("keys", "owner", "--env").stdout.splitlines()
    assert env == ["OPENAI_BASE_URL=http://127.0.0.1:8081/v1", f"OPENAI_API_KEY={key}"]


@pytest.mark.parametrize("content", ["", "hunter2\n", "mt-short\n"])
def test_a_file_that_holds_no_key_is_refused_without_showing_it(content: str) -> None:
    path = owner_key_path(_home())
    make_private_dir(path.parent)
    path.write_text(content)
    path.chmod(0o600)
    done = mt("keys", "owner", check=False)
    assert done.returncode == 1
    assert "does not hold a gateway key" in done.stderr and "hint:" in done.stderr
    if content.strip():
        assert content.strip() not in done.stdout + done.stderr


def test_the_name_owner_is_reserved_for_the_owner_key() -> None:
    done = mt("keys", "create", "owner", check=False)
    assert done.returncode == 1 and "mt keys owner" in done.stderr


def test_without_keys_the_gateway_serves_only_the_owner_key() -> None:
    with running_gateway() as url:
        key = owner_key()
        assert status_of(f"{url}/healthz", None) == 200  # stays open
        assert status_of(f"{url}/v1/models", None) == 401
        assert status_of(f"{url}/v1/models", "mt-" + "x" * 43) == 401
        assert status_of(f"{url}/v1/models", key) == 200


def test_with_keys_the_owner_key_is_accepted_too(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    alice = json.loads(mt("keys", "create", "alice", "--keys", str(keys), "--json").stdout)["key"]
    with running_gateway("--keys", str(keys)) as url:
        assert status_of(f"{url}/v1/models", alice) == 200
        assert status_of(f"{url}/v1/models", owner_key()) == 200
        assert status_of(f"{url}/v1/models", None) == 401


def test_the_gateway_says_where_the_key_is_and_never_logs_it(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", "gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    key = owner_key()
    assert str(owner_key_path(_home())) in err and "mt keys owner" in err
    assert key not in out + err


async def test_in_process_the_owner_key_alone_turns_auth_on_and_a_rotation_is_reloaded(
    tmp_path: Path,
) -> None:
    path, _ = ensure_owner_key(_home())
    old = read_owner_key(path)
    async with (
        gateway(tmp_path, owner_key_file=path, reload_interval_s=0.05) as url,
        aiohttp.ClientSession() as client,
    ):

        async def status(key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with client.get(url + "/v1/models", headers=headers) as resp:
                return resp.status

        assert await status(None) == 401
        assert await status(old) == 200
        new = read_owner_key(rotate_owner_key(_home()))

        async def old_refused() -> bool:
            return await status(old) == 401

        await eventually(old_refused)
        assert await status(new) == 200
