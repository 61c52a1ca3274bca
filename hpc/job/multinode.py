"""Multi-node serving: what each node of a ``resources.nodes > 1`` job runs, and what is refused.

vLLM spans nodes with Ray (vLLM's documented multi-node recipe): a Ray head on the job's
first node (where the batch script and the job wrapper run), one Ray worker on each other
node (one ``srun`` step, ``--relative=1``: the allocation's nodes after the first), and
``vllm serve … --tensor-parallel-size <GPUs per node> --pipeline-parallel-size <nodes>
--distributed-executor-backend ray`` on the head once every node has joined.

``resources.gpus`` is the job's total; each node gets ``gpus / nodes`` (``--gres`` is per
node in Slurm). Ray runs with token authentication (``RAY_AUTH_MODE=token``, Ray ≥ 2.52): a
per-job token made by the wrapper, passed in the environment only (``RAY_AUTH_TOKEN``;
``srun`` hands its environment to the worker step), never in argv. The head binds the
node's address (not ``0.0.0.0``) on a port the OS picked; its dashboard is off.

llama.cpp serves from one node: its RPC backend is not something ModelTainer runs, so a
llama.cpp spec with ``nodes > 1`` is refused at submit (:func:`check_nodes`).

Pure functions: the Slurm renderer shows these commands in ``--dry-run``, and the wrapper
(hpc.job.raycluster) runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc.errors import EngineError
from hpc.spec import ModelSpec, PoolSpec, Runtime

# Flags ModelTainer sets from resources for a multi-node vLLM: the spec must not set them too.
_LAYOUT_FLAGS = (
    "--tensor-parallel-size",
    "-tp",
    "--pipeline-parallel-size",
    "-pp",
    "--distributed-executor-backend",
)
# How the dry-run names what only the running job knows.
HEAD_ADDRESS = "<head address>"
HEAD_PORT = "<free port>"


def _sets(args: tuple[str, ...], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def check_nodes(spec: ModelSpec) -> None:
    """Refuse a ``nodes > 1`` spec that cannot start on every node, saying why (EngineError)."""
    res = spec.resources
    nodes = res.nodes
    if nodes == 1:
        return
    where = f"{spec.name}: resources.nodes={nodes}"
    if spec.engine != "vllm":
        raise EngineError(
            f"{where}: llama.cpp serves from one node (its RPC backend across nodes is not "
            "supported by ModelTainer); only the first node would run the engine",
            hint="set resources.nodes: 1 (a model that fits one node), or use engine: vllm",
        )
    if res.gpus == 0:
        raise EngineError(
            f"{where} with no GPUs: vLLM spreads a model over nodes by its GPUs (Ray)",
            hint=f"set resources.gpus to the GPUs of all {nodes} nodes together, or nodes: 1",
        )
    if res.gpus % nodes:
        per = max(1, res.gpus // nodes)
        raise EngineError(
            f"{where}: resources.gpus={res.gpus} (the total) does not split evenly over "
            f"{nodes} nodes",
            hint=f"set resources.gpus to a multiple of {nodes}, e.g. {per * nodes} "
            f"({per} per node)",
        )
    given = [flag for flag in _LAYOUT_FLAGS if _sets(spec.engine_args, flag)]
    if given:
        raise EngineError(
            f"{where}: engine_args set {', '.join(given)}, which ModelTainer sets from "
            f"resources (tensor parallel = GPUs per node, pipeline parallel = nodes, Ray)",
            hint="remove them from engine_args; change resources.gpus or resources.nodes instead",
        )
    if spec.engine_network == "isolated":
        raise EngineError(
            f"{where}: engine_network: isolated, but Ray joins the nodes over the job's network",
            hint="set engine_network: auto (or shared) for a multi-node model",
        )


def check_pool_nodes(pool: PoolSpec) -> None:
    """Refuse a swap pool over several nodes: its engines load on the pool's one node."""
    if pool.resources.nodes > 1:
        raise EngineError(
            f"{pool.name}: resources.nodes={pool.resources.nodes}: a swap pool loads its "
            "models on one node; the other nodes would idle for the whole allocation",
            hint="set the pool's resources.nodes: 1 (a multi-node model is a model entry "
            "of its own, engine: vllm)",
        )


def in_runtime(runtime: Runtime, argv: list[str]) -> list[str]:
    """``argv`` inside the spec's runtime: bare, or ``apptainer exec`` of its image."""
    if runtime.kind == "none" or runtime.image is None:
        return argv
    wrapped = ["apptainer", "exec"]
    if runtime.gpu_flag:
        wrapped.append(runtime.gpu_flag)
    for bind in runtime.binds:
        wrapped += ["--bind", bind]
    return [*wrapped, runtime.image, *argv]


@dataclass(frozen=True)
class RayLayout:
    """One multi-node vLLM job: its nodes, GPUs per node, runtime; the commands of each node."""

    nodes: int
    gpus_per_node: int
    runtime: Runtime

    @classmethod
    def of(cls, spec: ModelSpec) -> RayLayout | None:
        """The layout of ``spec``, or None for a single-node job (checked: :func:`check_nodes`)."""
        if spec.resources.nodes == 1:
            return None
        check_nodes(spec)
        return cls(spec.resources.nodes, spec.resources.gpus // spec.resources.nodes, spec.runtime)

    def head_argv(self, address: str, port: int | str) -> list[str]:
        """The Ray head on the first node, in the foreground until stopped."""
        argv = ["ray", "start", "--head", "--block", f"--node-ip-address={address}"]
        argv += [f"--port={port}", f"--num-gpus={self.gpus_per_node}"]
        argv += ["--include-dashboard=false", "--disable-usage-stats"]
        return in_runtime(self.runtime, argv)

    def worker_argv(self, address: str, port: int | str) -> list[str]:
        """One Ray worker (run on each other node), in the foreground until stopped."""
        argv = ["ray", "start", "--block", f"--address={address}:{port}"]
        argv += [f"--num-gpus={self.gpus_per_node}", "--disable-usage-stats"]
        return in_runtime(self.runtime, argv)

    def workers_step_argv(self, address: str, port: int | str) -> list[str]:
        """The job step that runs a worker on every node but the first."""
        others = self.nodes - 1
        argv = ["srun", f"--nodes={others}", f"--ntasks={others}", "--ntasks-per-node=1"]
        # --relative=1: the allocation's nodes after the first (the head's, where we run);
        # --kill-on-bad-exit: one worker failing ends the step, which the wrapper notices.
        argv += ["--relative=1", "--kill-on-bad-exit=1", "--job-name=mt-ray-workers"]
        if self.gpus_per_node:
            argv.append(f"--gres=gpu:{self.gpus_per_node}")
        return [*argv, *self.worker_argv(address, port)]

    def status_argv(self, address: str, port: int | str) -> list[str]:
        """``ray status`` against the head: its "Active:" section lists the nodes joined."""
        return in_runtime(self.runtime, ["ray", "status", f"--address={address}:{port}"])

    def vllm_args(self) -> list[str]:
        """``vllm serve``'s flags that spread the model over the Ray cluster."""
        return [
            "--tensor-parallel-size",
            str(self.gpus_per_node),
            "--pipeline-parallel-size",
            str(self.nodes),
            "--distributed-executor-backend",
            "ray",
        ]

    @staticmethod
    def env(address: str, port: int | str, token: str) -> dict[str, str]:
        """What every Ray process and vLLM need in their environment (the token: only here)."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_ADDRESS": f"{address}:{port}",
            "RAY_USAGE_STATS_ENABLED": "0",
        }


def active_nodes(status_text: str) -> int:
    """How many nodes ``ray status`` lists as active (lines ``<n> node_<id>`` under "Active:")."""
    count = 0
    active = False
    for line in status_text.splitlines():
        stripped = line.strip()
        if stripped == "Active:":
            active = True
            continue
        if active and stripped.endswith(":"):
            break  # "Pending:", "Recent failures:"
        if active:
            number, _, name = stripped.partition(" ")
            if number.isdigit() and name.startswith("node_"):
                count += int(number)
    return count


def dry_run_note(spec: ModelSpec) -> str:
    """Comment lines for the sbatch script showing each node's command (``--dry-run``): "" for
    a single-node job, else a newline first (the template puts it after a line of its own)."""
    layout = RayLayout.of(spec)
    if layout is None:
        return ""
    head = " ".join(layout.head_argv(HEAD_ADDRESS, HEAD_PORT))
    workers = " ".join(layout.workers_step_argv(HEAD_ADDRESS, HEAD_PORT))
    per = layout.gpus_per_node
    return "\n" + "\n".join(
        [
            "#",
            f"# Multi-node: {layout.nodes} nodes x {per} GPU(s), vLLM with Ray. The wrapper runs",
            "# on the first node (the Ray head, bound to this node's address):",
            f"#   {head}",
            f"# on the other {layout.nodes - 1} node(s), as one job step (one Ray worker each):",
            f"#   {workers}",
            f"# waits until `ray status` lists all {layout.nodes} nodes, then starts on the head:",
            "#   vllm serve … " + " ".join(layout.vllm_args()),
            "# Ray runs with a per-job token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) in the",
            "# environment only; stopping the job stops vLLM, the workers' step and the head.",
        ]
    )
