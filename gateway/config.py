"""The gateway's settings: where it listens, what it reads, how long it waits."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from hpc.ondemandstate import STATE_FILE, default_path
from hpc.site import GatewaySite

MIB = 1024 * 1024


class GatewayConfig(BaseModel):
    """Everything ``mt gateway`` needs; built by the CLI and passed to ``create_app``/``run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where to listen defaults to site.yaml's defaults (`gateway:`), the one place they live.
    host: str = Field(default=GatewaySite.model_fields["host"].default, min_length=1)
    port: int = Field(
        default=GatewaySite.model_fields["port"].default,
        ge=0,
        lt=65536,
        description="0 binds an ephemeral port",
    )
    registry_dir: Path = Field(description="the registry directory of job records")
    models_file: Path | None = Field(
        default=None, description="models.yaml: configured names and static backends"
    )
    keys_file: Path | None = Field(
        default=None,
        description="keys.yaml with hashed client keys (auth is off without it and owner_key_file)",
    )
    owner_key_file: Path | None = Field(
        default=None,
        description="the owner's key (hpc.ownerkey), accepted as the client 'owner' beside "
        "keys.yaml's; `mt gateway` always sets it, in-process apps may leave it None",
    )
    discover: str | None = Field(
        default=None,
        pattern=r"^kubernetes(:[a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
        description="also route the engines the Kubernetes API lists: kubernetes (the "
        "kubeconfig's or the pod's namespace) or kubernetes:NAMESPACE",
    )
    discover_interval_s: float = Field(
        default=10,
        gt=0,
        description="with --discover, how often the Kubernetes API is asked for engines (a "
        "list of Services, then EndpointSlices and a Secret per Service: keep it well above "
        "reload_interval_s on a big cluster)",
    )
    max_body_mb: float = Field(
        default=4,
        gt=0,
        description="larger request bodies get 413 (raise it for large base64 images)",
    )
    body_timeout_s: float = Field(
        default=60,
        gt=0,
        description="a request's body must arrive whole within this after its headers; a "
        "client that trickles it gets 408 and its connection is closed",
    )
    connect_timeout_s: float = Field(
        default=10, gt=0, description="to open a connection to an upstream (504 after it)"
    )
    first_token_timeout_s: float = Field(
        default=600,
        gt=0,
        description="from sending the request to the first byte of the upstream's body; a "
        "non-streaming answer arrives whole, so for it this bounds the whole generation",
    )
    unhealthy_first_token_timeout_s: float = Field(
        default=10,
        gt=0,
        description="when every replica of a model is failing its health probes, one is "
        "still tried, but gets this long (at most first_token_timeout_s) for its first "
        "byte; then 503 naming the model, instead of a wait of the full first-token timeout",
    )
    idle_timeout_s: float = Field(
        default=120,
        gt=0,
        description="longest silence between two upstream chunks after the first; there is "
        "no total timeout, so a long healthy stream is never cut",
    )
    max_in_flight: int | None = Field(
        default=None, gt=0, description="proxied requests at once, all models; beyond: 503"
    )
    max_in_flight_per_model: int | None = Field(
        default=None, gt=0, description="proxied requests at once for one model; beyond: 503"
    )
    max_connections: int | None = Field(
        default=None,
        gt=0,
        description="client connections open at once, idle keep-alive ones included; beyond: "
        "503 at once and closed (default: what the open-file limit allows, two files per "
        "connection for a proxied stream)",
    )
    max_connections_per_client: int | None = Field(
        default=None,
        ge=0,
        description="client connections open at once from one address, 0 for no cap "
        "(default: a quarter of max_connections, so no one address can take the gateway); "
        "loopback addresses (SSH tunnels and reverse proxies on this host) have only the "
        "total cap",
    )
    header_timeout_s: float = Field(
        default=30,
        gt=0,
        description="a connection's request line and headers must arrive within this, and an "
        "idle keep-alive connection is closed after it (a slow or silent client cannot hold "
        "a connection open)",
    )
    shutdown_grace_s: float = Field(
        default=30, ge=0, description="on SIGTERM, how long in-flight requests may finish"
    )
    reload_interval_s: float = Field(
        default=1.0, gt=0, description="how often the registry and config files are stat()ed"
    )
    retry_after_s: int = Field(
        default=5, gt=0, description="Retry-After sent with a 503 when no upstream can answer"
    )
    health_interval_s: float = Field(
        default=5, gt=0, description="how often every job replica's health and load are probed"
    )
    health_timeout_s: float = Field(
        default=2, gt=0, description="one probe's limit; a slower answer is a failed probe"
    )
    health_failures_to_eject: int = Field(
        default=3,
        ge=1,
        description="failed probes in a row before a replica gets no requests; one good probe "
        "brings it back",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis that holds the rate limits and in-flight caps of every gateway "
        "replica (gateway.redislimits); it may carry a password, so `mt gateway` reads it from "
        "--redis-url-file or $MT_REDIS_URL, never from its command line (None: this process "
        "alone)",
    )
    redis_prefix: str = Field(
        default="mt",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="the start of every Redis key the gateway writes: replicas with the same "
        "one share their limits, so each deployment on one Redis needs its own",
    )
    max_on_demand_jobs: int | None = Field(
        default=None,
        gt=0,
        description="on-demand jobs the gateway runs at once, all models; a start beyond: 503",
    )
    on_demand_keepalive_s: float = Field(
        default=5,
        gt=0,
        description="while a streaming request waits for a cold start, an SSE comment this often",
    )
    on_demand_failure_backoff_s: float = Field(
        default=60,
        gt=0,
        description="after a failed on-demand start, report the failure (no new submit) this long",
    )
    on_demand_poll_s: float = Field(
        default=0.5, gt=0, description="how often the records of on-demand jobs are read"
    )
    on_demand_state_file: Path | None = Field(
        default=None,
        description="where the on-demand state is published (default: "
        "<registry_dir>/../" + STATE_FILE + ")",
    )

    @property
    def max_body_bytes(self) -> int:
        """``max_body_mb`` in bytes (aiohttp's ``client_max_size``)."""
        return int(self.max_body_mb * MIB)

    def state_file(self) -> Path:
        """The on-demand state file `mt pool status` reads."""
        return self.on_demand_state_file or default_path(self.registry_dir)
