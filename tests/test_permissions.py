"""Private files (issue 15, item 4): `mt` and the gateway refuse what others can read.

Real files with real modes, the real `mt` as a subprocess: each of ``$MT_HOME``, the
registry directory, a record and keys.yaml made group/world-readable makes every verb that
uses them (and `mt gateway`) exit 1 naming the path, its mode and the ``chmod`` that fixes
it; ``MT_ALLOW_INSECURE_PERMISSIONS=1`` lets them run, with a ``warning:`` line each time;
`mt doctor` still runs and reports it; the job wrapper does not publish into such a registry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mtcli import mt

from gateway.keys import create_key
from hpc.job.plan import JobPlan, write_plan
from hpc.ownerkey import ensure_owner_key
from hpc.privatefile import make_private_dir
from hpc.registry import Registry, pending_record
from hpc.spec import ModelSpec, Weights

pytestmark = pytest.mark.timeout(120)

MODELS = """\
models:
  - name: tiny
    engine: llamacpp
    weights: {source: /nonexistent/tiny.gguf}
"""

# Verbs that use the registry, keys or state; the gateway is run apart (it keeps running).
VERBS = [
    ("status",),
    ("models",),
    ("keys", "list"),
    ("submit", "tiny"),
    ("cancel", "local-1"),
    ("pool", "status"),
]


class Tree:
    """A private MT_HOME as `mt` makes it: 0700 directories, 0600 files, one record."""

    def __init__(self, root: Path) -> None:
        self.home = root / "mt home 'quoted'"  # a hostile path survives the fix's quoting
        self.registry = self.home / "registry"
        Registry(self.registry).write(
            pending_record("local", "1", "n0nce", model="tiny", engine="llamacpp", log_path=None)
        )
        self.record = self.registry / "local-1.json"
        self.keys = self.home / "keys.yaml"
        create_key(self.keys, "alice")
        self.owner_key, _ = ensure_owner_key(self.home)  # the gateway's, as its first start

    def path(self, which: str) -> Path:
        paths = {"home": self.home, "registry": self.registry, "record": self.record}
        return {**paths, "owner_key": self.owner_key}.get(which, self.keys)


LOOSE = {"home": 0o755, "registry": 0o755, "record": 0o644, "keys": 0o644, "owner_key": 0o644}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tree:
    made = Tree(tmp_path)
    monkeypatch.setenv("MT_HOME", str(made.home))
    models = tmp_path / "models.yaml"
    models.write_text(MODELS, encoding="utf-8")
    monkeypatch.setenv("MT_MODELS", str(models))
    return made


def loosen(tree: Tree, which: str) -> tuple[Path, str, str]:
    """Make one path loose; returns it, its mode as printed, and the fix `mt` must name."""
    path, mode = tree.path(which), LOOSE[which]
    os.chmod(path, mode)
    want = "0700" if path.is_dir() else "0600"
    kind = "directory" if path.is_dir() else "file"
    return (
        path,
        f"{path} ({kind}, mode {mode:04o}; want {want})",
        f"{700 if path.is_dir() else 600}",
    )


def assert_refused(done: subprocess.CompletedProcess[str], path: Path, described: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "error: refusing to use files other users can read or change:", lines
    assert f"error:   {described}" in lines, lines
    quoted = "'" + str(path).replace("'", "'\"'\"'") + "'"
    hint = next(line for line in lines if line.startswith("hint: "))
    assert f"chmod {'700' if path.is_dir() else '600'} {quoted}" in hint, hint
    assert "Traceback" not in done.stderr


def gateway(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", "gateway", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_the_private_tree_passes(tree: Tree) -> None:
    for verb in (("status",), ("models",), ("keys", "list")):
        done = mt(*verb)
        assert "warning:" not in done.stderr and "error:" not in done.stderr, done.stderr


@pytest.mark.parametrize("which", list(LOOSE))
def test_every_verb_refuses_a_loose_path_naming_it_its_mode_and_the_fix(
    tree: Tree, which: str
) -> None:
    path, described, _ = loosen(tree, which)
    for verb in VERBS:
        assert_refused(mt(*verb, check=False), path, described)
    os.chmod(path, 0o700 if path.is_dir() else 0o600)
    # Refused before anything was done: no job submitted, the record not cancelled.
    assert [r.state for r in Registry(tree.registry).records()] == ["pending"]


@pytest.mark.parametrize("which", list(LOOSE))
def test_the_gateway_refuses_to_start(tree: Tree, which: str) -> None:
    path, described, _ = loosen(tree, which)
    proc = gateway("--keys", str(tree.keys))
    out, err = proc.communicate(timeout=60)
    assert "listening" not in out
    assert_refused(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err), path, described
    )


def test_a_loose_home_is_fixed_by_one_recursive_chmod(tree: Tree) -> None:
    for which in LOOSE:
        loosen(tree, which)
    done = mt("status", check=False)
    assert done.returncode == 1
    quoted = "'" + str(tree.home).replace("'", "'\"'\"'") + "'"
    assert f"hint: chmod -R go-rwx {quoted}" in done.stderr.splitlines()
    subprocess.run(["chmod", "-R", "go-rwx", str(tree.home)], check=True)
    mt("status")


@pytest.mark.parametrize("which", list(LOOSE))
def test_the_bypass_runs_and_warns_every_time(
    tree: Tree, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, described, _ = loosen(tree, which)
    monkeypatch.setenv("MT_ALLOW_INSECURE_PERMISSIONS", "1")
    warning = f"warning: MT_ALLOW_INSECURE_PERMISSIONS=1: using {described}"
    # Verbs that only read: `mt status` would end the record and write it back 0600.
    for verb in (("models",), ("keys", "list"), ("models",)):
        done = mt(*verb)
        assert warning in done.stderr.splitlines()[0], done.stderr
    proc = gateway("--keys", str(tree.keys))
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert err.splitlines()[0].startswith(warning), err


def test_only_one_exactly_means_yes(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    path, described, _ = loosen(tree, "record")
    monkeypatch.setenv("MT_ALLOW_INSECURE_PERMISSIONS", "true")
    assert_refused(mt("status", check=False), path, described)


def test_doctor_reports_instead_of_refusing(tree: Tree) -> None:
    path, described, fix = loosen(tree, "registry")
    done = mt("doctor", "--no-probe", "--json", check=False)
    assert "refusing" not in done.stderr
    [check] = [c for c in json.loads(done.stdout)["checks"] if c["name"] == "private files"]
    assert check["ok"] is False
    assert described in check["detail"]
    quoted = "'" + str(path).replace("'", "'\"'\"'") + "'"
    assert check["hint"].startswith(f"chmod {fix} {quoted}")


def test_a_symlinked_home_is_judged_by_its_target(tree: Tree, tmp_path: Path) -> None:
    link = tmp_path / "link-home"
    link.symlink_to(tree.home)
    os.chmod(tree.home, 0o755)  # noqa: S103 - the loose mode under test
    env = {**os.environ, "MT_HOME": str(link)}
    done = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert f"{link} -> {tree.home} (directory, mode 0755" in done.stderr
    quoted = "'" + str(tree.home).replace("'", "'\"'\"'") + "'"
    assert f"chmod 700 {quoted}" in done.stderr  # the target: chmod -R would not follow a link


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_another_users_record_is_refused(tree: Tree) -> None:
    os.chown(tree.record, 65534, 65534)
    done = mt("status", check=False)
    assert done.returncode == 1
    assert f"{tree.record} (file, owned by uid 65534" in done.stderr
    assert "not by you" in done.stderr and "hint: mv " in done.stderr


def test_the_job_wrapper_does_not_publish_into_a_loose_registry(tree: Tree) -> None:
    os.chmod(tree.registry, 0o755)  # noqa: S103 - the loose mode under test
    plan = JobPlan(
        spec=ModelSpec(name="tiny", engine="llamacpp", weights=Weights(source="/x/tiny.gguf")),
        backend="local",
        job_id="7",
        nonce="n0nce",
        registry_dir=tree.registry,
    )
    plan_path = tree.home / "plan.json"
    write_plan(plan, plan_path)
    done = subprocess.run(
        [sys.executable, "-m", "hpc.job.wrapper", "--plan", str(plan_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not publishing into the registry" in done.stdout
    assert "mode 0755" in done.stdout and "chmod 700" in done.stdout
    assert not (tree.registry / "local-7.json").exists()


def test_a_fresh_home_is_made_private_with_its_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Path.mkdir(parents=True) would make "new" and "home" 0755 (umask 022): refused next run.
    home = tmp_path / "new" / "home"
    monkeypatch.setenv("MT_HOME", str(home))
    make_private_dir(home / "tunnels")
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "new", home)} == {"0o700"}
    mt("keys", "create", "bob")
    done = mt("status")
    assert "warning:" not in done.stderr
