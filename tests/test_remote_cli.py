"""`mt --host LOGIN VERB`: every verb acts on the login node's registry and scheduler.

The login node is the real loopback sshd in front of the real private Slurm cluster, as in
tests/test_slurm_remote.py: sshd's sessions get ``SLURM_CONF``, ``MT_HOME`` (the login
node's state directory, ``login-home``) and ``PYTHONPATH`` (this checkout) from
``slurm.ssh_env``. The laptop's site.yaml lives outside the laptop's ``MT_HOME``
(``MT_SITE``), so that the laptop's ``MT_HOME`` staying absent proves no verb read or wrote
a registry here; a record only the login node has, listed from the laptop, proves the
other half.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from slurmcluster import SlurmCluster
from sshd import SSHServer

from hpc.registry import Registry

REPO = Path(__file__).resolve().parent.parent
FAILING = "no-weights"  # its job fails on the node at once: the weights are not there
WEIGHTS = "/nonexistent/mt-anyhost/tiny-Q4_K_M.gguf"
HELD = "held"  # its job waits in the queue for an hour: there to be cancelled
REMOTE_ONLY = "only-on-login"  # in the login node's models.yaml, not the laptop's


def mt(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a laptop runs it (the test's environment: MT_HOME, MT_SITE…)."""
    return subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def laptop_home() -> Path:
    return Path(os.environ["MT_HOME"])


def write_laptop_site(monkeypatch: pytest.MonkeyPatch, path: Path, **slurm: object) -> Path:
    """The laptop's site.yaml, outside its MT_HOME; ``MT_SITE`` names it."""
    path.write_text(json.dumps({"slurm": {"python": sys.executable, **slurm}}))  # JSON is YAML
    monkeypatch.setenv("MT_SITE", str(path))
    return path


def write_laptop_models(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """A models.yaml with one model ``m``; ``MT_MODELS`` names it."""
    path.write_text(
        "models:\n  - name: m\n    engine: llamacpp\n    weights: {source: /x/m.gguf}\n"
    )
    monkeypatch.setenv("MT_MODELS", str(path))


@pytest.fixture
def login(
    slurm_cluster: SlurmCluster,
    sshd: SSHServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """The login node's MT_HOME (with its own models.yaml); the laptop's site.yaml and
    models.yaml. Every job is cancelled afterwards."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    home = tmp_path / "login-home"
    home.mkdir(mode=0o700)
    models = (
        "models:\n"
        f"  - name: {REMOTE_ONLY}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {WEIGHTS}}}\n"
    )
    (home / "models.yaml").write_text(models)
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host login\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
    )
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    write_laptop_site(
        monkeypatch,
        laptop / "site.yaml",
        ssh_config=str(ssh_config),
        ssh_env={
            "SLURM_CONF": str(slurm_cluster.conf_path),
            "MT_HOME": str(home),
            "PYTHONPATH": str(REPO),
        },
    )
    resources = "{cpus: 1, mem_gb: 1, time_limit_min: 5}"
    (laptop / "models.yaml").write_text(
        "models:\n"
        f"  - name: {FAILING}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {WEIGHTS}}}\n"
        f"    resources: {resources}\n"
        f"  - name: {HELD}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {WEIGHTS}}}\n"
        f"    resources: {resources}\n"
        "    slurm: {extra_directives: ['--begin=now+3600']}\n"
    )
    monkeypatch.setenv("MT_MODELS", str(laptop / "models.yaml"))
    assert "SLURM_CONF" not in os.environ  # only sshd's sessions know where the cluster is
    yield home
    slurm_cluster.cancel_all()


@pytest.mark.slurm
@pytest.mark.ssh
@pytest.mark.timeout(420)
def test_every_verb_acts_on_the_login_nodes_registry(
    login: Path, slurm_cluster: SlurmCluster, sshd: SSHServer
) -> None:
    remote = Registry(login / "registry")
    logins = sshd.logins()

    # models: the login node's models.yaml, not the laptop's.
    served = mt("--host", "login", "models", "--json")
    assert served.returncode == 0, served.stderr
    names = {row["name"] for row in json.loads(served.stdout)}
    assert REMOTE_ONLY in names and FAILING not in names

    # submit --dry-run: the script the login node would submit names its registry, not ours.
    script = mt("--host", "login", "submit", FAILING, "--backend", "slurm", "--dry-run")
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("#!/bin/bash")
    assert json.dumps(str(login / "registry")) in script.stdout
    assert str(laptop_home()) not in script.stdout

    # submit --wait: the laptop's model, submitted and waited for there; it fails on the node.
    waited = mt(
        "--host", "login", "submit", FAILING, "--backend", "slurm", "--wait", "--timeout", "120"
    )
    assert waited.returncode == 1, waited.stderr
    assert f"weights {WEIGHTS!r} not found on this node" in waited.stderr
    assert "Traceback" not in waited.stderr
    [failed] = remote.records()  # the record is the login node's

    # status: the record only the login node has, with its scheduler's word (squeue there).
    listed = mt("--host", "login", "status", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["key"] == failed.key and row["state"] == "failed"
    assert row["scheduler"]["state"] in ("failed", "done", "missing"), row

    # logs, and logs -f (which returns: the job has ended): the log file on the login node.
    for follow in ((), ("-f",)):
        log = mt("--host", "login", "logs", *follow, failed.key)
        assert log.returncode == 0, log.stderr
        assert WEIGHTS in log.stdout

    # submit without waiting, then cancel: the job held in the queue for an hour.
    submitted = mt("--host", "login", "submit", HELD, "--backend", "slurm", "--json")
    assert submitted.returncode == 0, submitted.stderr
    held = json.loads(submitted.stdout)
    assert remote.read(held["key"]) is not None
    pending = {r["key"]: r for r in json.loads(mt("--host", "login", "status", "--json").stdout)}
    assert pending[held["key"]]["scheduler"]["state"] == "pending"
    cancelled = mt("--host", "login", "cancel", held["key"], "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["state"] in ("gone", "failed")
    record = remote.read(held["key"])
    assert record is not None and record.state in ("gone", "failed")
    states = {str(j["job_id"]): j["job_state"] for j in slurm_cluster.jobs()}
    assert states.get(held["job_id"]) in ("CANCELLED", ["CANCELLED"]), states

    # pool status and doctor: the login node's registry (its path is in doctor's report).
    pools = mt("--host", "login", "pool", "status", "--json")
    assert pools.returncode == 0, pools.stderr
    assert json.loads(pools.stdout)["pools"] == []
    doctor = mt("--host", "login", "doctor", "--no-probe", "--json")
    assert doctor.returncode in (0, 1), doctor.stderr  # 1: a check failed there (no apptainer)
    assert "Traceback" not in doctor.stderr
    assert str(login / "registry") in doctor.stdout
    assert str(laptop_home()) not in doctor.stdout

    # One SSH login per command; and nothing of any of it on the laptop.
    assert sshd.logins() == logins + 11
    assert not laptop_home().exists(), sorted(laptop_home().rglob("*"))


def _processes_running(*words: str) -> list[psutil.Process]:
    """This machine's processes whose argv holds every word in ``words``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if all(word in cmdline for word in words):
            found.append(proc)
    return found


@pytest.mark.slurm
@pytest.mark.ssh
@pytest.mark.timeout(240)
def test_ctrl_c_here_stops_the_login_nodes_mt(login: Path) -> None:
    """`mt --host login logs -f` of a job still queued prints nothing for minutes; Ctrl-C on
    the laptop must not leave its mt running on the login node until then."""
    submitted = mt("--host", "login", "submit", HELD, "--backend", "slurm", "--json")
    assert submitted.returncode == 0, submitted.stderr
    key = json.loads(submitted.stdout)["key"]
    follow = subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", "--host", "login", "logs", "-f", key],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (there := _processes_running("--here", "logs", "--follow", key)):
            assert follow.poll() is None, follow.communicate()
            assert time.monotonic() < deadline, "the login node's mt never started"
            time.sleep(0.2)
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=60)
        assert follow.returncode == 130, (out, err)
        _gone, alive = psutil.wait_procs(there, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


@pytest.mark.slurm
@pytest.mark.ssh
@pytest.mark.timeout(120)
def test_a_login_node_without_modeltainer_is_an_error(login: Path, tmp_path: Path) -> None:
    """slurm.python names no file there, or a Python without ModelTainer: error and hint."""
    site = Path(os.environ["MT_SITE"])
    settings = json.loads(site.read_text())
    bare = tmp_path / "bare-python"  # a Python that cannot import hpc (no PYTHONPATH either)
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    bare.chmod(0o755)
    for python, said in (
        (str(tmp_path / "no-such-python"), "(slurm.python) is not on login"),
        (str(bare), "error: ModelTainer is not installed for "),
    ):
        settings["slurm"]["python"] = python
        site.write_text(json.dumps(settings))
        done = mt("--host", "login", "status")
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert said in done.stderr
        assert "\nhint: " in done.stderr
    assert not laptop_home().exists()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "verb",
    [
        ["status"],
        ["status", "--all", "--json"],
        ["submit", "m", "--backend", "slurm"],
        ["logs", "-f", "slurm-1"],
        ["cancel", "slurm-1"],
        ["models"],
        ["pool", "status"],
        ["doctor", "--no-probe"],
    ],
    ids="-".join,
)
def test_a_host_that_cannot_be_reached_is_an_error(
    verb: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "no jobs" and exit 0: the command says it could not reach the host, and how to fix it."""
    write_laptop_site(monkeypatch, tmp_path / "site.yaml")
    write_laptop_models(monkeypatch, tmp_path / "models.yaml")
    port = _closed_port()
    done = mt("--host", f"127.0.0.1:{port}", *verb, timeout_s=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"error: cannot connect to 127.0.0.1:{port}: connection refused" in done.stderr
    assert "\nhint: " in done.stderr
    assert done.stdout == ""
    assert not laptop_home().exists()


def test_an_unknown_host_name_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_laptop_site(monkeypatch, tmp_path / "site.yaml")
    done = mt("--host", "nosuch.invalid", "status", timeout_s=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "error: cannot connect to nosuch.invalid:22" in done.stderr
    assert "hint: " in done.stderr


def test_without_slurm_python_mt_cannot_run_on_the_login_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site.yaml").write_text("slurm: {ssh_host: login}\n")
    monkeypatch.setenv("MT_SITE", str(tmp_path / "site.yaml"))
    done = mt("status", timeout_s=60)  # site.yaml's ssh_host, no --host
    assert done.returncode == 1
    assert "error: slurm.python is not set, so mt cannot run on" in done.stderr
    assert "hint: set slurm.python in site.yaml" in done.stderr


def test_here_and_host_contradict_each_other() -> None:
    done = mt("--here", "--host", "login", "status", timeout_s=60)
    assert done.returncode == 2
    assert "--here and --host contradict each other" in done.stderr


# -- a site setting that would put this machine's path into a job script --------------------


def test_the_laptops_registry_path_is_refused_before_a_job_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mt --host login render` writes the job script here, from this machine's site.yaml:
    without registry_dir and log_dir it would name this machine's $MT_HOME."""
    site = write_laptop_site(monkeypatch, tmp_path / "site.yaml")
    write_laptop_models(monkeypatch, tmp_path / "models.yaml")
    script = tmp_path / "m.sbatch"
    done = mt("--host", "login", "render", "m", "-o", str(script), timeout_s=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    home = laptop_home()
    assert (
        f"error: site.yaml: registry_dir: is not set, so jobs would use this machine's "
        f"{home / 'registry'}, which the cluster does not see" in lines
    )
    assert any(line.startswith("error: site.yaml: log_dir: is not set") for line in lines)
    assert lines[-1].startswith("hint: let the login node write the job: `mt --host login")
    assert f"set registry_dir and log_dir in {site} to absolute paths" in lines[-1]
    assert not script.exists()

    # Relative (or ~) paths resolve here too: still refused, the setting named.
    site.write_text(
        json.dumps(
            {
                "registry_dir": "reg",
                "log_dir": "~/logs",
                "slurm": {"python": sys.executable, "ssh_host": "login"},
            }
        )
    )
    done = mt("render", "m", "-o", str(script), timeout_s=60)
    assert done.returncode == 1
    assert f"error: site.yaml: registry_dir: reg is this machine's {home / 'reg'}" in done.stderr
    assert "error: site.yaml: log_dir: ~/logs is this machine's " in done.stderr

    # The cluster's own absolute paths are what the script names.
    cluster = tmp_path / "cluster fs; echo"  # a hostile path, quoted in the script
    site.write_text(
        json.dumps(
            {
                "registry_dir": str(cluster / "registry"),
                "log_dir": str(cluster / "logs"),
                "slurm": {"python": sys.executable, "ssh_host": "login"},
            }
        )
    )
    done = mt("render", "m", "-o", str(script), timeout_s=60)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert json.dumps(str(cluster / "registry")) in text
    assert str(home) not in text


# -- mt status when squeue fails -------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_status_marks_what_squeue_could_not_say_and_shows_the_rest(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real squeue, against a copy of the cluster's slurm.conf whose controller port
    nobody listens on (a controller that is down): the Slurm record is listed, marked
    ``unknown: squeue failed: …``, and the local job beside it is listed as ever."""
    from hpc.registry import new_nonce, pending_record

    conf = tmp_path / "etc" / "slurm.conf"
    conf.parent.mkdir()
    lines = slurm_cluster.conf_path.read_text().splitlines()
    port = _closed_port()
    conf.write_text(
        "\n".join(f"SlurmctldPort={port}" if x.startswith("SlurmctldPort=") else x for x in lines)
        + "\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    squeue = subprocess.run(
        ["squeue", "--json"], check=False, capture_output=True, text=True, timeout=120
    )
    # The real squeue cannot reach it. Slurm 22.05's `squeue --json` still exits 0, with no
    # jobs and the failure under "errors": read naively, every job would look ended.
    said = json.loads(squeue.stdout) if squeue.returncode == 0 else {}
    assert squeue.returncode != 0 or said.get("errors"), (squeue.stdout, squeue.stderr)
    registry = Registry(laptop_home() / "registry")
    registry.ensure()
    for backend, job_id in (("slurm", "4242"), ("local", "99999999")):
        registry.create(
            pending_record(
                backend, job_id, new_nonce(), model=f"{backend}-model", engine="vllm", log_path=None
            )
        )

    done = mt("status", "--all", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["backend"]: row for row in json.loads(done.stdout)}
    assert set(rows) == {"slurm", "local"}
    assert rows["slurm"]["scheduler"]["state"] == "unknown"
    assert rows["slurm"]["scheduler"]["reason"].startswith("squeue failed: "), rows["slurm"]
    assert rows["slurm"]["state"] == "pending"  # unknown is not failed: the record stays
    assert rows["local"]["scheduler"]["state"] != "unknown"

    monkeypatch.setenv("COLUMNS", "250")  # one line per job
    table = mt("status", "--all")
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if "slurm-4242" in line]
    assert "pending (unknown: squeue failed: slurm_load_jobs: " in row, row
    assert "local-model" in table.stdout
