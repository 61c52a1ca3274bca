"""One exception tree for ModelTainer; every error carries its context and a hint.

    MTError                       message + hint; the CLI prints both and exits 1
    ├── ConfigError               a config file is bad: one ConfigIssue per bad field
    ├── RegistryError             the registry directory or a record cannot be used
    ├── InsecurePermissionsError  (hpc.permissions) a private path others can reach: mode, fix
    ├── JobNotFoundError          no record and no job with that id
    ├── WaitFailed                (hpc.waiting) a job waited for ended before it was ready
    ├── UnknownBackendError       a backend name that is not registered
    ├── BackendError              a scheduler or process call failed (argv, stderr)
    │   ├── SlurmError            a Slurm command failed: argv, return code, stderr, hint
    │   ├── KubernetesError       (hpc.k8s.apierrors) the API refused a call: HTTP status
    │   └── SSHError              the SSH connection to the login node failed: host, port
    │       ├── UnknownHostKeyError   its host key is not in known_hosts: the fingerprint
    │       ├── ChangedHostKeyError   known_hosts holds another key: the file and line
    │       └── SSHAuthError          no key was accepted: the user and host
    ├── EngineError               an engine cannot be started (not installed, bad args)
    │   └── PoolLoadError         a swap pool could not load a model: the reason, the log tail
    ├── StagingError              (hpc.job.staging) the node-local weight cache is not this user's
    ├── ImageError                a recipe or image is unusable, or `apptainer build` failed
    ├── ExportError               (hpc.export) an export cannot be written (bad URL, no model)
    ├── PinMismatch               (hpc.tlspin) a job's port presented another TLS certificate
    └── TunnelError               (tunnels.errors) a tunnel cannot be opened or kept: local port
        ├── LocalPortInUseError   127.0.0.1:PORT is taken: names the process if visible
        ├── TunnelDownError       the tunnel dropped and cannot come back (auth, host key)
        └── OwnerKeyError         the gateway owner's key cannot be read on the login node

The classes marked with a module live beside the one code that raises them and subclass
this tree, so ``except MTError`` and the CLI's ``error:``/``hint:`` cover them too. The
gateway answers HTTP errors in OpenAI's shape (gateway/errors.py) rather than raising;
``hpc.transport.CommandTimeout`` is not an error to report but a signal the backends turn
into "unknown" (a timeout is not a failure).

Foreign exceptions (OSError from the filesystem, yaml, pydantic, paramiko) are translated at
the one place that calls them, with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class MTError(Exception):
    """Base of every error ModelTainer raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class ConfigIssue:
    """One bad field: where it is and what is wrong with it."""

    path: Path
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path.name}:{self.line}" if self.line is not None else self.path.name
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class ConfigError(MTError):
    """A config file failed to load; ``issues`` holds one entry per bad field."""

    def __init__(self, path: Path, issues: list[ConfigIssue], *, hint: str | None = None) -> None:
        lines = "\n".join(str(issue) for issue in issues)
        super().__init__(lines, hint=hint or f"fix {path} and run the command again")
        self.path = path
        self.issues = issues


class RegistryError(MTError):
    """The registry directory or one of its records cannot be used."""

    def __init__(self, message: str, *, path: Path, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class JobNotFoundError(MTError):
    """A job id that matches no registry record."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"no job {job_id!r} in the registry", hint="`mt status` lists the jobs it knows"
        )
        self.job_id = job_id


class UnknownBackendError(MTError):
    """A backend name that is not registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown backend {name!r}", hint=f"known backends: {', '.join(sorted(known))}"
        )
        self.name = name


class BackendError(MTError):
    """A scheduler or process call failed."""

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr


class EngineError(MTError):
    """An engine cannot be started as configured."""


class PoolLoadError(EngineError):
    """A swap pool could not load a model into a slot; ``log_tail`` is the engine's last lines."""

    def __init__(self, model: str, reason: str, log_tail: list[str] | None = None) -> None:
        super().__init__(
            f"cannot load {model}: {reason}",
            hint="the pool's job log has the engine's output (mt logs <pool job>)",
        )
        self.model = model
        self.log_tail = log_tail or []


class SlurmError(BackendError):
    """A Slurm command exited non-zero (or could not run); carries argv, code, stderr, hint."""


class SSHError(BackendError):
    """The SSH connection to the login node could not be made or used; names host and port."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        port: int | None = None,
        hint: str | None = None,
        argv: list[str] | None = None,
    ) -> None:
        super().__init__(message, argv=argv, hint=hint)
        self.host = host
        self.port = port


class UnknownHostKeyError(SSHError):
    """The server's host key is not in known_hosts: refused, and never added."""

    def __init__(
        self, message: str, *, host: str, port: int, fingerprint: str, known_hosts: Path, hint: str
    ) -> None:
        super().__init__(message, host=host, port=port, hint=hint)
        self.fingerprint = fingerprint
        self.known_hosts = known_hosts


class ChangedHostKeyError(SSHError):
    """known_hosts holds another key for this host: a hard failure, never overridden."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        port: int,
        fingerprint: str,
        known_hosts: Path,
        line: int | None,
        hint: str,
    ) -> None:
        super().__init__(message, host=host, port=port, hint=hint)
        self.fingerprint = fingerprint
        self.known_hosts = known_hosts
        self.line = line


class SSHAuthError(SSHError):
    """The server accepted none of our keys (agent, identity files)."""

    def __init__(self, message: str, *, host: str, port: int, user: str, hint: str) -> None:
        super().__init__(message, host=host, port=port, hint=hint)
        self.user = user


class ImageError(MTError):
    """A recipe or an image cannot be used, or ``apptainer build`` failed or cannot run."""
