"""What every command shares: the site and models files, and the login node, named on the
command line; and the one check that the private files it will use are private."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpc.configfile import load_models
from hpc.errors import ConfigError, ConfigIssue
from hpc.permissions import enforce, warning_line
from hpc.site import Site, SiteConfig, load_site, mt_home
from hpc.spec import ModelsFile, ModelSpec

if TYPE_CHECKING:
    from hpc.ssh.exec import SSHTransport


STDIN_MODELS = "-"  # `mt --models -`: models.yaml on standard input (from `mt --host`)


def models_path(explicit: Path | None) -> Path:
    """``--models``, else ``$MT_MODELS``, else ./models.yaml, else ``$MT_HOME/models.yaml``."""
    if explicit is not None:
        return explicit
    if os.environ.get("MT_MODELS"):
        return Path(os.environ["MT_MODELS"])
    for candidate in (Path("models.yaml"), mt_home() / "models.yaml"):
        if candidate.is_file():
            return candidate
    return mt_home() / "models.yaml"


def _models_from_stdin() -> ModelsFile:
    """models.yaml sent on standard input, parsed from a private copy (the loader reads
    files, and names them in its errors: ``models.yaml`` here)."""
    text = sys.stdin.buffer.read()
    with tempfile.TemporaryDirectory(prefix="mt-models-") as tmp:  # 0700
        path = Path(tmp) / "models.yaml"
        path.write_bytes(text)
        return load_models(path)


@dataclass
class CliContext:
    """Loaded lazily, so `mt status` works without a models.yaml."""

    site_file: Path | None = None
    models_file: Path | None = None
    host: str | None = None  # `mt --host`: Slurm commands run there over SSH
    identity: Path | None = None  # `mt --identity`: the SSH key for it
    here: bool = False  # `mt --here` (what `mt --host` runs there): no slurm.ssh_host
    _site: Site | None = field(default=None, init=False)
    _ssh: SSHTransport | None = field(default=None, init=False)
    _models: ModelsFile | None = field(default=None, init=False)
    _checked: bool = field(default=False, init=False)  # the private files, once per command
    _warned: set[Path] = field(default_factory=set, init=False)  # what the bypass let through

    def site(self, *, check_permissions: bool = True) -> Site:
        """The site config (defaults if there is no site.yaml).

        Every command that loads the site (so every one that uses the registry, keys or
        state) first checks that ``$MT_HOME``, the registry, its records, keys.yaml and the
        on-demand state file are private (hpc.permissions); only `mt doctor`, which reports
        the problem instead, passes ``check_permissions=False``.
        """
        if self._site is None:
            site = load_site(self.site_file)
            config = site.config
            if self.host is not None or self.identity is not None:
                config = self._ssh_override(config)
            if self.here:
                slurm = config.slurm.model_copy(update={"ssh_host": None})
                config = config.model_copy(update={"slurm": slurm})
            if config.slurm.ssh_host:
                # Imported here: paramiko loads only for commands that reach a login node.
                from hpc.ssh.exec import ssh_transport

                # One transport per command: one SSH login however many Slurm commands run.
                self._ssh = ssh_transport(config.slurm)
            self._site = Site(config, site.home, transport=self._ssh, source=site.source)
        if check_permissions and not self._checked:
            self.check_private(*self._site.private_paths())
            self._checked = True
        return self._site

    def default_keys_file(self) -> Path:
        """``$MT_HOME/keys.yaml``: `mt keys` and `mt gateway --keys` default to it."""
        return self.site().keys_file

    def check_private(self, *paths: Path) -> None:
        """Refuse paths other users can reach; with the bypass, warn on stderr, every run."""
        for exposure in enforce(paths):
            if exposure.path not in self._warned:
                self._warned.add(exposure.path)
                sys.stderr.write(warning_line(exposure) + "\n")
        sys.stderr.flush()

    def _ssh_override(self, config: SiteConfig) -> SiteConfig:
        """site.yaml's ``slurm:`` with ``ssh_host``/``ssh_identity`` from the command line."""
        given = {"ssh_host": self.host, "ssh_identity": self.identity}
        slurm = config.slurm.model_copy(update={k: v for k, v in given.items() if v is not None})
        return config.model_copy(update={"slurm": slurm})

    def close(self) -> None:
        """Close what the command opened (the SSH connection to the login node)."""
        if self._ssh is not None:
            self._ssh.close()

    def login_node(self) -> SSHTransport | None:
        """The connection to the login node this command acts on (`mt --host`, or
        ``slurm.ssh_host``), not yet opened; None when it acts on this machine."""
        self.site(check_permissions=False)  # this machine's registry is not used then
        return self._ssh

    def models_path(self) -> Path:
        """The models.yaml this command reads."""
        return models_path(self.models_file)

    def has_models(self) -> bool:
        """Whether there is a models.yaml to read (a file, or standard input)."""
        return self._from_stdin() or self.models_path().is_file()

    def _from_stdin(self) -> bool:
        return self.models_file == Path(STDIN_MODELS)

    def models(self) -> ModelsFile:
        """The parsed models.yaml."""
        if self._models is None:
            if self._from_stdin():
                self._models = _models_from_stdin()
            else:
                self._models = load_models(self.models_path())
        return self._models

    def spec(self, name: str) -> ModelSpec:
        """The spec called ``name``; a ConfigError listing the known names if there is none."""
        models = self.models()
        spec = models.get(name)
        if spec is None:
            path = self.models_path()
            known = ", ".join(m.name for m in models.models) or "none"
            pools = "; pools: " + ", ".join(p.name for p in models.pools) if models.pools else ""
            raise ConfigError(
                path,
                [ConfigIssue(path, None, "models", f"no model named {name!r}")],
                hint=f"models in {path}: {known}{pools}",
            )
        return spec
