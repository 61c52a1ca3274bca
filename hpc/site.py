"""Site defaults (``site.yaml``): where state lives and what the cluster wants by default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hpc.configfile import load_model
from hpc.hosts import is_wildcard
from hpc.k8s.settings import KubernetesSite
from hpc.llamacppserver import LlamaCppSite
from hpc.ondemandstate import default_path as ondemand_state_path
from hpc.ownerkey import owner_key_path
from hpc.permissions import records_in
from hpc.spec import SlurmName
from hpc.stagingsite import StagingSite
from hpc.transport import LocalTransport, Transport

HOME_ENV = "MT_HOME"


def mt_home(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory: ``$MT_HOME`` or ``~/.mt``."""
    env = os.environ if environ is None else environ
    return Path(env.get(HOME_ENV) or Path.home() / ".mt").expanduser()


ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+/@-]+$", max_length=256)]
# An ssh destination, `[user@]host` or an ~/.ssh/config alias: never a shell word, but no
# spaces or control characters either.
SSHHost = Annotated[str, Field(pattern=r"^[^\s\x00-\x1f\x7f]+$", max_length=255)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlurmSite(_Strict):
    """The cluster's Slurm defaults; a model's own ``slurm:`` block overrides them."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    modules: tuple[ModuleName, ...] = Field(
        default=(), description="`module load` these in every job"
    )
    image_dir: Path | None = None
    apptainer_cachedir: Path | None = Field(
        default=None,
        description="APPTAINER_CACHEDIR for `mt image build` (put it on scratch: images are large)",
    )
    apptainer_tmpdir: Path | None = Field(
        default=None, description="APPTAINER_TMPDIR for `mt image build` (scratch, not /tmp)"
    )
    python: str | None = Field(
        default=None,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="the Python with ModelTainer installed, as compute nodes see it "
        "(default: the one running mt)",
    )
    command_timeout_s: float = Field(default=60, gt=0, description="for each Slurm command")
    submit_lookup_s: float | None = Field(
        default=None,
        gt=0,
        description="after an sbatch whose outcome is unknown (a timeout, or a lost "
        "controller), how long to look for the job by its nonce before saying nothing was "
        "submitted (default: twice the controller's MessageTimeout, at least 30 s)",
    )
    use_pyslurm: bool = Field(
        default=False,
        description="talk to Slurm through pyslurm when it is built for this cluster's Slurm "
        "(else, and over SSH, the command-line tools)",
    )
    ssh_host: SSHHost | None = Field(
        default=None,
        description="run Slurm commands on this login node over SSH (`[user@]host` or an "
        "~/.ssh/config alias); `mt --host` overrides it",
    )
    ssh_user: str | None = Field(default=None, pattern=r"^[^\s\x00-\x1f\x7f@]+$", max_length=64)
    ssh_port: int | None = Field(default=None, gt=0, lt=65536)
    ssh_identity: Path | None = Field(
        default=None,
        description="private key file (default: the agent, ~/.ssh/config, ~/.ssh/id_*)",
    )
    ssh_config: Path | None = Field(default=None, description="default ~/.ssh/config")
    ssh_known_hosts: Path | None = Field(
        default=None,
        description="default: the ssh config's UserKnownHostsFile, else ~/.ssh/known_hosts",
    )
    ssh_connect_timeout_s: float = Field(default=15, gt=0)
    ssh_env: dict[EnvName, str] = Field(
        default_factory=dict,
        description="environment of remote Slurm commands (e.g. SLURM_CONF, PATH), "
        "sent as an `env NAME=value` prefix",
    )


class GatewaySite(_Strict):
    """Where ``mt gateway`` listens by default."""

    host: str = "127.0.0.1"
    port: int = Field(default=8081, gt=0, lt=65536)

    def url(self, *, wildcard_as: str) -> str:
        """The gateway's OpenAI root (``http://host:port/v1``) as a client reaches it.

        A wildcard bind has no address to connect to: ``wildcard_as`` names the host to use
        instead (this machine's name for another tool's config, loopback for a client here).
        """
        host = wildcard_as if is_wildcard(self.host) else self.host
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{self.port}/v1"


class SiteConfig(_Strict):
    """Everything a site sets once for all its users' models."""

    registry_dir: Path | None = Field(default=None, description="default: $MT_HOME/registry")
    log_dir: Path | None = Field(default=None, description="default: $MT_HOME/logs")
    default_backend: str = "local"
    engine_host: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9.:_-]+$",
        description="address engines bind to; default 127.0.0.1 for local jobs and 0.0.0.0 "
        "for cluster jobs, which the login node's gateway must reach (the per-job key guards them)",
    )
    slurm: SlurmSite = Field(default_factory=SlurmSite)
    gateway: GatewaySite = Field(default_factory=GatewaySite)
    kubernetes: KubernetesSite = Field(default_factory=KubernetesSite)
    staging: StagingSite = Field(default_factory=StagingSite)
    llamacpp: LlamaCppSite = Field(default_factory=LlamaCppSite)


class Site:
    """The site config with every path resolved against the state directory.

    Config only: a Site opens nothing. Where Slurm commands run is handed in by whoever
    builds the site for a command (hpc.cli.context, with hpc.ssh.exec.ssh_transport), and
    that caller closes it; without one, commands run here.
    """

    def __init__(
        self,
        config: SiteConfig,
        home: Path,
        *,
        transport: Transport | None = None,
        source: Path | None = None,
    ) -> None:
        self.config = config
        self.home = home
        # The site.yaml it came from (None: defaults); errors about a setting name it.
        self.source = source
        # A relative path in site.yaml means under the state directory, not under whatever
        # directory the command (or the job) happens to run in.
        self.registry_dir = home / (config.registry_dir or Path("registry")).expanduser()
        self.log_dir = home / (config.log_dir or Path("logs")).expanduser()
        self.jobs_dir = home / "jobs"
        self.keys_file = home / "keys.yaml"  # `mt keys` and `mt gateway --keys` default to it
        self._transport = transport

    def private_paths(self) -> list[Path]:
        """What must stay private (hpc.permissions): the state directory, the registry and
        its records, keys.yaml, the gateway's owner key and its directory, and the on-demand
        state file the gateway writes."""
        registry = self.registry_dir
        owner_key = owner_key_path(self.home)
        return [
            self.home,
            registry,
            *records_in(registry),
            self.keys_file,
            owner_key.parent,
            owner_key,
            ondemand_state_path(registry),
        ]

    def slurm_transport(self) -> Transport:
        """Where Slurm commands run: the transport handed in, else this machine.

        A site whose ``slurm.ssh_host`` is set but that was given no transport refuses, rather
        than run the cluster's commands on the wrong machine.
        """
        if self._transport is not None:
            return self._transport
        if self.config.slurm.ssh_host:
            # A programming error, not a user's: the CLI always hands one in.
            raise ValueError(
                "slurm.ssh_host is set but the site was built without a transport "
                "(pass transport=hpc.ssh.exec.ssh_transport(config.slurm))"
            )
        return LocalTransport()

    @property
    def file(self) -> Path:
        """The site.yaml to name in an error: the one loaded, else where it would be."""
        return self.source or self.home / "site.yaml"

    def paths_elsewhere(self) -> list[tuple[str, str]]:
        """Settings whose path would be this machine's, not the login node's: ``(setting,
        why)`` for each, when Slurm commands run elsewhere (``slurm.ssh_host``).

        A job script holds the registry and log directories; unset, or relative, or under
        ``~``, they resolve against this machine's ``$MT_HOME`` or home, which the cluster's
        nodes do not see. Empty when Slurm runs here.
        """
        if not self.config.slurm.ssh_host:
            return []
        found = []
        for setting, raw, resolved in (
            ("registry_dir", self.config.registry_dir, self.registry_dir),
            ("log_dir", self.config.log_dir, self.log_dir),
        ):
            if raw is None:
                found.append((setting, f"is not set, so jobs would use this machine's {resolved}"))
            elif not raw.is_absolute():
                found.append((setting, f"{raw} is this machine's {resolved}"))
        return found


def load_site(path: Path | None, environ: Mapping[str, str] | None = None) -> Site:
    """The site: ``path``, else ``$MT_SITE``, else ``$MT_HOME/site.yaml``, else defaults."""
    env = os.environ if environ is None else environ
    home = mt_home(env)
    chosen = path or (Path(env["MT_SITE"]) if env.get("MT_SITE") else None)
    if chosen is None and (home / "site.yaml").is_file():
        chosen = home / "site.yaml"
    config = load_model(chosen, SiteConfig) if chosen is not None else SiteConfig()
    return Site(config, home, source=chosen)
