"""The model spec (one entry of ``models.yaml``) and the file that holds a list of them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from hpc.specbase import Strict
from hpc.specserving import OnDemand, TokenLimits

# A name users type and the gateway routes by: no spaces, no slashes, no shell metacharacters,
# so it is safe in job names, file names and URLs.
ModelName = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
]


# Values that end up in #SBATCH lines: a newline there would start a new directive or
# a shell line, so the patterns admit only what Slurm names and lists are made of.
SlurmName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,-]+$", max_length=256)]
SlurmConstraint = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,&|\[\]*()!:-]+$", max_length=512)]
SbatchFlag = Annotated[
    str, Field(pattern=r"^--[a-z][a-z0-9-]*(=[^\x00-\x1f\x7f]+)?$", max_length=512)
]

# After TERM (scancel, preemption, `mt cancel`), how long requests in flight may finish: Slurm
# KILLs KillWait (30 s by default) after its TERM, and the engine needs up to the plan's
# stop_grace_s (10 s) to stop, so 30 - 10 - 5 s of margin.
DEFAULT_DRAIN_S = 15.0
DrainSeconds = Annotated[
    float,
    Field(
        ge=0,
        le=3600,
        description="after TERM (scancel, preemption, mt cancel), how long requests in flight "
        "may finish before the engine is stopped; keep it below the site's KillWait minus 15 s",
    ),
]


class Weights(Strict):
    """Where the weights come from: a Hugging Face repo id or a local path (GGUF or HF dir)."""

    source: str = Field(min_length=1, description="HF repo id (org/name) or a filesystem path")
    quant: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_]+$", description="GGUF quant filter, e.g. Q4_K_M"
    )
    revision: str | None = None
    stage: Literal["none", "node-local"] | None = Field(
        default=None, description="node-local: copied once per node (docs/slurm.md); None: site's"
    )


class Resources(Strict):
    """What to ask the scheduler for."""

    gpus: int = Field(default=0, ge=0, le=64)
    gpu_type: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    cpus: int = Field(default=1, gt=0, le=1024)
    mem_gb: float = Field(default=4, gt=0)
    time_limit_min: int = Field(default=240, gt=0)
    nodes: int = Field(default=1, gt=0, le=64)


class Runtime(Strict):
    """How the engine runs: bare (``none``) or inside an Apptainer image."""

    kind: Literal["none", "apptainer"] = "none"
    image: str | None = None
    gpu_flag: Literal["--nv", "--rocm"] | None = None
    binds: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _image_needed(self) -> Runtime:
        if self.kind == "apptainer" and not self.image:
            raise ValueError("runtime.kind 'apptainer' needs an image")
        return self


class SlurmOptions(Strict):
    """Per-model Slurm settings; anything unset falls back to site.yaml."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    constraint: SlurmConstraint | None = None
    requeue: bool = Field(default=False, description="let Slurm requeue the job on preemption")
    signal_grace_s: int = Field(
        default=120,
        ge=10,
        le=3600,
        description="USR1 this long before the time limit; requests in flight may finish "
        "until 15 s before it",
    )
    extra_directives: tuple[SbatchFlag, ...] = Field(
        default=(), description="more sbatch flags, e.g. --exclusive or --mail-type=END"
    )
    # continuity: handover (docs/slurm.md, "Wall-time handover"): when the successor is sent.
    handover_margin_s: int = Field(
        default=120,
        ge=10,
        le=86400,
        description="with continuity: handover, the successor is submitted this long plus "
        "the job's own observed time-to-ready before the time limit: the predecessor's "
        "streams finish within it",
    )
    handover_lead_s: int | None = Field(
        default=None,
        ge=10,
        le=86400,
        description="with continuity: handover, submit the successor exactly this long "
        "before the time limit (instead of time-to-ready + handover_margin_s)",
    )


# Kubernetes object names and label values (DNS-1123 label; label values up to 63 chars).
K8sName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
K8sLabelValue = Annotated[
    str, Field(pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$", max_length=63)
]
K8sLabelKey = Annotated[
    str, Field(pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", max_length=253)
]


class KubernetesOptions(Strict):
    """Per-model Kubernetes settings (used by the Kubernetes backend and `mt render`)."""

    namespace: K8sName | None = Field(default=None, description="default: the kubeconfig's")
    node_selector: dict[K8sLabelKey, K8sLabelValue] = Field(default_factory=dict)
    gpu_resource: Literal["nvidia.com/gpu", "amd.com/gpu"] = "nvidia.com/gpu"
    pvc: K8sName | None = Field(
        default=None, description="an existing PVC for the weights (default: one per model)"
    )
    role: K8sLabelValue | None = Field(
        default=None, description="required node affinity: only nodes with role_label=role"
    )
    role_label: K8sLabelKey = "ai.llm.role"
    image: str | None = Field(
        default=None,
        pattern=r"^[^\s]+$",
        description="engine container image (default: the engine's official server image)",
    )
    fetch_image: str = Field(
        default="docker.io/library/python:3.12.8-slim-bookworm",
        pattern=r"^[^\s]+$",
        description="init container that downloads the weights into the PVC (any Python 3)",
    )
    port: int = Field(default=8000, gt=0, lt=65536)
    storage_gb: int = Field(default=100, gt=0, description="size of the weights PVC")
    storage_class: K8sName | None = None
    run_as_user: int | None = Field(
        default=1000, ge=1, description="null on OpenShift, whose SCC assigns the UID"
    )
    route: bool = Field(
        default=False,
        description="refused: a Route to the engine bypasses the gateway, whose Route/Ingress "
        "(site.yaml kubernetes.gateway) is the way in",
    )
    route_host: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


ExposedRoute = Annotated[str, Field(pattern=r"^/[A-Za-z0-9_./*-]*$", max_length=200)]


class ModelSpec(Strict):
    """One model as users name it, and everything needed to serve it."""

    name: ModelName
    engine: Literal["vllm", "llamacpp"]
    weights: Weights
    engine_args: tuple[str, ...] = Field(
        default=(), description="extra engine flags, passed as separate argv entries"
    )
    resources: Resources = Field(default_factory=Resources)
    runtime: Runtime = Field(default_factory=Runtime)
    startup_timeout_s: float = Field(default=900, gt=0, description="from RUNNING to healthy")
    drain_s: DrainSeconds = DEFAULT_DRAIN_S
    expose_routes: tuple[ExposedRoute, ...] = Field(
        default=(),
        description="engine routes the job's front passes besides the OpenAI ones, e.g. "
        "/invocations or /v2/* (every route still needs the job's key)",
    )
    engine_network: Literal["auto", "isolated", "shared"] = Field(
        default="auto",
        description="the engine in a network namespace of its own, so the ports it opens for "
        "its own processes (vLLM's torch.distributed and gloo ports, NCCL's bootstrap) reach "
        "no other user of the node: isolated (refuse to start without it), auto (isolated "
        "when the weights are a local path and the kernel allows it; else said in the log), "
        "shared (the node's network: an engine that downloads its weights)",
    )
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    kubernetes: KubernetesOptions = Field(default_factory=KubernetesOptions)
    on_demand: OnDemand | None = Field(
        default=None, description="start on the first request, stop when idle (the gateway)"
    )
    aliases: tuple[ModelName, ...] = Field(
        default=(), description="more names the gateway routes to this model"
    )
    fallbacks: tuple[ModelName, ...] = Field(
        default=(),
        description="names the gateway serves instead, in order, when this one has no "
        "replica that answers",
    )
    limits: TokenLimits = Field(
        default_factory=TokenLimits,
        description="the gateway's max_tokens default and cap for requests to this model",
    )
    continuity: Literal["none", "handover"] = Field(
        default="none",
        description="handover (Slurm): before the time limit the job submits its successor, "
        "which takes the new requests once ready while this one drains (docs/slurm.md)",
    )

    @model_validator(mode="after")
    def _handover_fits(self) -> ModelSpec:
        if self.continuity != "handover":
            return self
        if self.on_demand is not None:
            raise ValueError(
                "continuity: handover keeps a model served without end; on_demand stops it "
                "when idle: choose one"
            )
        limit_s = self.resources.time_limit_min * 60
        # The lead is at least the margin plus the engine's stop allowance (15 s).
        lead_s = self.slurm.handover_lead_s or self.slurm.handover_margin_s + 15
        if 2 * lead_s >= limit_s:
            raise ValueError(
                f"continuity: handover needs resources.time_limit_min ({limit_s}s) above twice "
                f"the handover lead ({lead_s}s: slurm.handover_lead_s, or handover_margin_s "
                "+ 15 s), so that a job's predecessor has ended before it hands over in turn"
            )
        return self


class StaticBackend(Strict):
    """An endpoint ModelTainer did not start but the gateway should route to."""

    name: ModelName
    base_url: str = Field(pattern=r"^https?://[^\s]+$", description="ends with /v1")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="env var with its key"
    )
    aliases: tuple[ModelName, ...] = Field(
        default=(), description="more names the gateway routes to this backend"
    )
    fallbacks: tuple[ModelName, ...] = Field(
        default=(),
        description="names the gateway serves instead, in order, when this one does not answer",
    )
    limits: TokenLimits = Field(
        default_factory=TokenLimits,
        description="the gateway's max_tokens default and cap for requests to this backend",
    )


class PoolSpec(Strict):
    """A swap pool: one long allocation that loads a catalogue of models on request.

    The allocation's GPUs are split evenly between ``slots``; each slot holds one model at a
    time, and the least recently used idle one is swapped out when another model is asked
    for. ``models`` names ModelSpecs of the same file: their engine, weights and engine args
    say how each is started; their own resources and Slurm options are not used.
    """

    name: ModelName
    models: tuple[ModelName, ...] = Field(min_length=1, description="the catalogue")
    slots: int = Field(default=1, ge=1, le=64, description="models loaded at once")
    resources: Resources = Field(default_factory=Resources)
    runtime: Runtime | None = Field(
        default=None, description="run every engine in this runtime (default: each model's own)"
    )
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    kubernetes: KubernetesOptions = Field(
        default_factory=KubernetesOptions,
        description="the pool's Deployment (image: one with modeltainer and the engines)",
    )
    drain_s: DrainSeconds = DEFAULT_DRAIN_S
    idle_unload_s: float | None = Field(
        default=None, gt=0, description="unload a model nobody asked for in this long"
    )
    keepalive_s: float = Field(
        default=5,
        gt=0,
        description="while a model loads, send a streaming request an SSE comment this often",
    )

    @model_validator(mode="after")
    def _gpus_split_evenly(self) -> PoolSpec:
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a name is listed twice")
        gpus = self.resources.gpus
        if gpus and gpus % self.slots:
            raise ValueError(
                f"resources.gpus={gpus} cannot be split evenly between slots={self.slots}"
            )
        return self


class ModelsFile(Strict):
    """The whole ``models.yaml``: models to submit, swap pools, static backends to route to."""

    models: tuple[ModelSpec, ...] = ()
    pools: tuple[PoolSpec, ...] = ()
    static: tuple[StaticBackend, ...] = ()

    @model_validator(mode="after")
    def _names_resolve(self) -> ModelsFile:
        problems = _name_problems(self)
        if problems:
            # A ValidationError keeps each problem's location (``models[1].aliases[0]``), so
            # hpc.configfile can name the file's line; a ValueError would point at the root.
            raise ValidationError.from_exception_data(
                "ModelsFile",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("model_names", message),
                        loc=loc,
                        input=value,
                    )
                    for loc, value, message in problems
                ],
            )
        return self

    def get(self, name: str) -> ModelSpec | None:
        """The spec called ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)

    def pool(self, name: str) -> PoolSpec | None:
        """The swap pool called ``name``, or None."""
        return next((p for p in self.pools if p.name == name), None)

    def catalogue(self, pool: PoolSpec) -> tuple[ModelSpec, ...]:
        """The specs a pool serves, in its order (names this file lacks are left out)."""
        return tuple(spec for name in pool.models if (spec := self.get(name)) is not None)

    def names(self) -> list[str]:
        """Every name this file serves, models first, then static backends."""
        return [m.name for m in self.models] + [s.name for s in self.static]


def _name_problems(models: ModelsFile) -> list[tuple[tuple[str | int, ...], str, str]]:
    """Aliases that clash with a name or another alias, and fallbacks that name nothing:
    (location, value, message) for each."""
    entries: list[tuple[str, int, ModelSpec | StaticBackend]] = [
        ("models", i, m) for i, m in enumerate(models.models)
    ]
    entries += [("static", i, s) for i, s in enumerate(models.static)]
    # Names first, so an alias clashing with a name listed later is still caught.
    owner = {
        entry.name: f"{section}[{index}] ({entry.name!r})" for section, index, entry in entries
    }
    problems: list[tuple[tuple[str | int, ...], str, str]] = []
    for section, index, entry in entries:
        here = f"{section}[{index}] ({entry.name!r})"
        for at, alias in enumerate(entry.aliases):
            if alias in owner:
                what = "the name" if owner[alias].endswith(f"({alias!r})") else "an alias"
                problems.append(
                    (
                        (section, index, "aliases", at),
                        alias,
                        f"alias {alias!r} of {here} is already {what} of {owner[alias]}",
                    )
                )
            else:
                owner[alias] = here
    for section, index, entry in entries:
        for at, fallback in enumerate(entry.fallbacks):
            if fallback not in owner:
                problems.append(
                    (
                        (section, index, "fallbacks", at),
                        fallback,
                        f"fallback {fallback!r} is no model name or alias in this file",
                    )
                )
            elif fallback == entry.name or fallback in entry.aliases:
                problems.append(
                    (
                        (section, index, "fallbacks", at),
                        fallback,
                        f"fallback {fallback!r} is this entry itself",
                    )
                )
    return problems
