"""Slurm over SSH, the laptop case: the real private cluster behind the real loopback sshd.

The test process has no ``SLURM_CONF`` (tests/conftest.py clears ``SLURM_*``), so no Slurm
command here can reach the private cluster except through sshd, whose sessions get
``SLURM_CONF`` from the transport's ``env`` prefix (``slurm.ssh_env`` in site.yaml). sshd's
log counts the logins and commands. The login node's state directory is ``login-home``
beside the test's ``MT_HOME`` (the laptop's): sshd's sessions get it as ``MT_HOME`` from
``slurm.ssh_env``, and ``registry_dir``/``log_dir`` in the laptop's site.yaml name it, as
they would name a path on a real cluster's shared filesystem (tests/test_remote_cli.py
has every verb with ``--host``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurmcluster import SlurmCluster
from sshd import SSHServer

from hpc.backends.slurm import SlurmBackend
from hpc.configfile import load_models
from hpc.jobs import JobService
from hpc.registry import Record, Registry, record_key
from hpc.site import Site, load_site
from hpc.slurm.client import PENDING_STATES, RUNNING_STATES, SlurmClient
from hpc.ssh.exec import SSHTransport, ssh_transport

pytestmark = [pytest.mark.slurm, pytest.mark.ssh, pytest.mark.timeout(240)]

MODEL = "no-weights"
WEIGHTS = "/nonexistent/mt-remote/tiny-Q4_K_M.gguf"


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster; every job cancelled afterwards."""
    assert "SLURM_CONF" not in os.environ  # only sshd's sessions know where the cluster is
    yield slurm_cluster
    slurm_cluster.cancel_all()


@pytest.fixture
def ssh_config(sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ~/.ssh/config-style file naming the loopback sshd ``login``."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    path = tmp_path / "ssh_config"
    path.write_text(
        "Host login\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
    )
    return path


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model whose job fails fast on the node: its weights do not exist there."""
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - name: {MODEL}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {WEIGHTS}}}\n"
        "    resources: {cpus: 1, mem_gb: 1, time_limit_min: 5}\n"
    )
    monkeypatch.setenv("MT_MODELS", str(path))
    return path


REPO = Path(__file__).resolve().parent.parent


def login_home() -> Path:
    """The login node's MT_HOME (its registry and logs): beside the laptop's."""
    return Path(os.environ["MT_HOME"]).with_name("login-home")


def write_site(cluster: SlurmCluster, ssh_config: Path, **slurm: str) -> None:
    """$MT_HOME/site.yaml for a laptop: where the ssh config is, SLURM_CONF, MT_HOME and this
    checkout on the far side, and the cluster's registry and log directories for jobs."""
    home = Path(os.environ["MT_HOME"])
    home.mkdir(mode=0o700, exist_ok=True)
    login_home().mkdir(mode=0o700, exist_ok=True)
    settings = {
        "ssh_config": str(ssh_config),
        "ssh_env": {
            "SLURM_CONF": str(cluster.conf_path),
            "MT_HOME": str(login_home()),
            "PYTHONPATH": str(REPO),
        },
        "python": sys.executable,  # the cluster's Python: the same machine here
        **slurm,
    }
    site = {
        "registry_dir": str(login_home() / "registry"),
        "log_dir": str(login_home() / "logs"),
        "slurm": settings,
    }
    (home / "site.yaml").write_text(json.dumps(site))  # JSON is YAML


def registry() -> Registry:
    return Registry(login_home() / "registry")


def wait_record(key: str, states: tuple[str, ...], timeout_s: float = 90) -> Record:
    deadline = time.monotonic() + timeout_s
    while True:
        record = registry().read(key)
        if record is not None and record.state in states:
            return record
        assert time.monotonic() < deadline, f"{key} still {record.state if record else None}"
        time.sleep(0.3)


def mt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_sbatch_squeue_scancel_over_ssh(
    cluster: SlurmCluster, sshd: SSHServer, ssh_config: Path, tmp_path: Path
) -> None:
    logins, commands = sshd.logins(), sshd.commands()
    transport = SSHTransport(
        "login", ssh_config=ssh_config, remote_env={"SLURM_CONF": str(cluster.conf_path)}
    )
    with transport:
        client = SlurmClient(transport, timeout_s=60)
        script = (
            "#!/bin/bash\n"
            "#SBATCH --job-name=mt-remote-probe\n"
            "#SBATCH --comment=mt:remote-probe\n"
            f"#SBATCH --chdir={tmp_path}\n"
            f"#SBATCH --output={tmp_path}/slurm-%j.out\n"
            "sleep 300\n"
        )
        job_id = client.sbatch(script)
        job = client.jobs([job_id])[job_id]
        assert job.name == "mt-remote-probe"
        assert job.state in PENDING_STATES | RUNNING_STATES
        # The real cluster has it (earlier tests' ended jobs may still be listed).
        assert job_id in [str(j["job_id"]) for j in cluster.jobs()]
        found = client.find_by_comment("mt:remote-probe")
        assert found is not None and found.job_id == job_id

        client.scancel(job_id)
        deadline = time.monotonic() + 30
        while (gone := client.jobs([job_id]).get(job_id)) and gone.state != "CANCELLED":
            assert time.monotonic() < deadline, gone
            time.sleep(0.3)
        assert transport.connections == 1
    assert sshd.logins() == logins + 1
    assert sshd.commands() >= commands + 4  # sbatch, squeue (twice or more), scancel: all via sshd


def test_backend_submit_over_ssh_records_the_failure(
    cluster: SlurmCluster, sshd: SSHServer, ssh_config: Path, models: Path
) -> None:
    """SlurmBackend built from site.yaml's ssh_host runs sbatch on the login node; the job
    really runs on the cluster: its wrapper records that the weights are missing."""
    write_site(cluster, ssh_config, ssh_host="login")
    loaded = load_site(None)
    transport = ssh_transport(loaded.config.slurm)  # what `mt` builds once per command
    site = Site(loaded.config, loaded.home, transport=transport)
    logins = sshd.logins()
    try:
        backend = JobService(site, SlurmBackend(site))
        spec = load_models(models).models[0]
        handle = backend.submit(spec)
        record = wait_record(record_key("slurm", handle.job_id), ("failed",))
        assert record.reason is not None and WEIGHTS in record.reason
        assert "not found on this node" in record.reason
        assert record.node in cluster.nodes
        status = SlurmBackend(site).status([handle])[handle.job_id]  # same site: same connection
        assert status.state in ("failed", "done", "missing"), status
    finally:
        transport.close()
    assert sshd.logins() == logins + 1


def test_cli_with_host_submits_waits_and_lists_over_ssh(
    cluster: SlurmCluster, sshd: SSHServer, ssh_config: Path, models: Path
) -> None:
    """`mt --host login …`: one SSH login per command, however many Slurm commands it runs."""
    write_site(cluster, ssh_config)  # no ssh_host in site.yaml: --host alone picks the node
    logins = sshd.logins()
    done = mt(
        "--host", "login", "submit", MODEL, "--backend", "slurm", "--wait", "--timeout", "120"
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"weights {WEIGHTS!r} not found on this node" in done.stderr
    assert sshd.logins() == logins + 1  # sbatch and every squeue while waiting: one connection

    listed = mt("--host", "login", "status", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["backend"] == "slurm" and row["model"] == MODEL
    assert row["state"] == "failed" and WEIGHTS in row["reason"]
    assert row["scheduler"]["state"] in ("failed", "done", "missing"), row
    assert row["scheduler"]["state"] != "unknown"  # squeue answered, over SSH
    assert sshd.logins() == logins + 2
