"""Wall-time handover (``continuity: handover``) on the real private Slurm cluster.

Real parts only: the cluster's slurmctld and two slurmd, the job wrapper in each job, llama.cpp's
own ``llama-server`` (MT_LLAMA_SERVER, first on the PATH) with the Gemma GGUF, `mt gateway`,
and the real ``openai`` client streaming through it without pause. Jobs have a 2-minute time
limit and a 30 s handover margin: each hands over about 50 s before its limit (its ~5 s
time-to-ready, the margin, 15 s to stop), so the run sees two handovers in about 3 minutes.

What must hold: every stream finishes (0 failed requests), squeue never shows more than
two jobs of the model (sampled twice a second), each predecessor ends itself, handed over,
before its limit, `mt status` shows the chain, and `mt cancel` leaves no job and no process.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from mtcli import llama_server_binary, mt, owner_key, running_gateway
from slurmcluster import SlurmCluster

from hpc.registry import Record, Registry

# Read at import, before tests/conftest.py's autouse fixture clears MT_*.
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")
MODEL = "gemma-handover"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}

pytestmark = [pytest.mark.slurm, pytest.mark.llamacpp, pytest.mark.timeout(480)]


@pytest.fixture
def handover_models(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    binary = llama_server_binary(LLAMA_SERVER)
    monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")  # jobs inherit it
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - name: {MODEL}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gemma_gguf))}}}\n"
        '    engine_args: ["--ctx-size", "1024"]\n'
        "    startup_timeout_s: 60\n"
        "    continuity: handover\n"
        "    resources: {cpus: 1, mem_gb: 1, time_limit_min: 2}\n"
        "    slurm: {handover_margin_s: 30, signal_grace_s: 15}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MT_MODELS", str(path))
    yield path


def _registry() -> Registry:
    return Registry(Path(os.environ["MT_HOME"]) / "registry")


def _chain() -> list[Record]:
    records = [r for r in _registry().records() if r.model == MODEL]
    return sorted(records, key=lambda r: int(r.job_id))


@dataclass
class Soak:
    """A client streaming without pause, and squeue sampled, until stopped."""

    url: str
    cluster: SlurmCluster
    ok: int = 0
    finished_at: list[float] = field(default_factory=list)  # wall clock, each stream's end
    failures: list[str] = field(default_factory=list)
    most_jobs: int = 0
    samples: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def stream(self) -> None:
        import openai

        client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=owner_key(), max_retries=0, timeout=60
        )
        with client:
            self._stream(client)

    def _stream(self, client: Any) -> None:
        import openai

        while not self.stop.is_set():
            try:
                finish = None
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "Count to ten."}],
                    max_tokens=8,
                    stream=True,
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                if finish is None:
                    self.failures.append(f"{time.strftime('%T')}: stream ended unfinished")
                else:
                    self.ok += 1
                    self.finished_at.append(time.time())
            except openai.OpenAIError as exc:
                self.failures.append(f"{time.strftime('%T')}: {exc!r}")
                time.sleep(0.2)

    def sample(self) -> None:
        while not self.stop.is_set():
            jobs = [
                j
                for j in self.cluster.jobs()
                if j["name"].startswith(f"mt-{MODEL}-") and j["job_state"] in ACTIVE
            ]
            self.samples += 1
            self.most_jobs = max(self.most_jobs, len(jobs))
            time.sleep(0.5)


def _engines_left() -> list[int]:
    """Engines of this model still running (``--alias`` names the model), however started."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if MODEL in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            left.append(proc.info["pid"])
    return left


def _in_flight(url: str) -> str:
    """The gateway's own count of requests in flight (its /metrics)."""
    import urllib.request

    from mtcli import owner_headers

    request = urllib.request.Request(url + "/metrics", headers=owner_headers())  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
        text = answer.read().decode()
    return next(line for line in text.splitlines() if line.startswith("mt_gateway_in_flight "))


def _wait_for(what: str, done: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: {[(r.job_id, r.state) for r in _chain()]}"
        time.sleep(0.5)


def test_two_handovers_under_streaming_drop_nothing(
    cluster: SlurmCluster, handover_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # `mt status` on one line per job
    started = time.monotonic()
    first = json.loads(
        mt("submit", MODEL, "--backend", "slurm", "--wait", "--json", "--timeout", "90").stdout
    )
    assert first["state"] == "ready", first
    with running_gateway(stderr_path=handover_models.parent / "gateway.log") as url:
        soak = Soak(url, cluster)
        threads = [threading.Thread(target=soak.stream), threading.Thread(target=soak.sample)]
        for thread in threads:
            thread.start()
        try:

            def two_handovers() -> bool:
                chain = _chain()
                return (
                    len(chain) >= 3
                    and chain[2].state == "ready"
                    and all(r.state == "gone" for r in chain[:2])
                )

            _wait_for("two handovers", two_handovers, 330)
            time.sleep(3)  # the third job serves alone for a while
        finally:
            soak.stop.set()
            for thread in threads:
                thread.join(90)
            assert not [t for t in threads if t.is_alive()], "a stream or squeue hangs"
            in_flight = _in_flight(url)
    status = mt("status", "--all").stdout
    chain = _chain()
    engines = [psutil.Process(r.engine_pid) for r in chain if r.engine_pid is not None]
    cancelled = json.loads(mt("cancel", chain[0].key, "--json").stdout)  # the chain's head
    ends = {r.job_id: cluster.wait_job(int(r.job_id), timeout=30) for r in _chain()}
    print(
        f"\nhandover soak: {soak.ok} streams, {len(soak.failures)} failed, "
        f"{len(chain)} jobs, at most {soak.most_jobs} at once in {soak.samples} squeue "
        f"samples, {time.monotonic() - started:.0f}s"
    )

    assert soak.failures == [], soak.failures
    # Nothing left hanging in the gateway: the one in flight is that /metrics request.
    assert in_flight == "mt_gateway_in_flight 1", in_flight
    # It streamed throughout: streams finished after each boundary, too.
    boundaries = [r.handover_at for r in chain[:2]]
    assert all(any(t > b for t in soak.finished_at) for b in boundaries if b), boundaries
    assert soak.most_jobs <= 2 and soak.samples > 100
    for before, after in itertools.pairwise(chain):
        assert before.successor == after.job_id and after.predecessor == before.job_id
    # The first two handovers are over (a third may have begun since: 2-minute jobs).
    for before, after in itertools.pairwise(chain[:3]):
        assert before.state == "gone" and before.reason == f"handed over to job {after.job_id}"
    for job in chain[:2]:  # each ended itself before its limit, not by Slurm's kill
        assert ends[job.job_id] in (None, "COMPLETED"), ends
    assert f"handover → job {chain[1].job_id}" in status
    assert f"took over from job {chain[0].job_id}" in status
    # mt cancel named the (ended) head: the rest of the chain, pending or running, ends too.
    assert cancelled["state"] == "gone"
    assert all(r.state in ("gone", "failed") for r in _chain())
    assert all(state not in ACTIVE for state in ends.values()), ends
    for engine in engines:
        assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    assert _engines_left() == []


def test_doctor_says_the_site_supports_handover(cluster: SlurmCluster) -> None:
    from hpc.doctor.handover import handover_check
    from hpc.slurm.client import SlurmClient
    from hpc.transport import LocalTransport

    check = handover_check(SlurmClient(LocalTransport()))
    assert check.ok is True and "--signal" in check.detail
    assert [j for j in cluster.jobs() if j["name"] == "wrap"] == []  # --test-only queued nothing


def test_the_warning_starts_a_handover_and_mt_cancel_name_ends_the_chain(
    cluster: SlurmCluster, handover_models: Path
) -> None:
    """USR1 (what Slurm sends at --signal's time, sent now) submits the successor at once;
    `mt cancel MODEL` while it is pending or starting leaves no job and no process."""
    from hpc.slurm.client import SlurmClient
    from hpc.transport import LocalTransport

    first = json.loads(
        mt("submit", MODEL, "--backend", "slurm", "--wait", "--json", "--timeout", "90").stdout
    )
    assert first["state"] == "ready", first
    SlurmClient(LocalTransport()).scancel(first["job_id"], signal="USR1", batch_only=True)
    _wait_for("a successor", lambda: len(_chain()) == 2, 60)
    head, successor = _chain()
    assert head.successor == successor.job_id and successor.predecessor == head.job_id
    assert head.state == "ready"  # it serves until its successor is ready
    engines = [psutil.Process(r.engine_pid) for r in _chain() if r.engine_pid is not None]

    cancelled = json.loads(mt("cancel", MODEL, "--json").stdout)
    assert {r["job_id"] for r in cancelled} <= {head.job_id, successor.job_id}
    ends = {r.job_id: cluster.wait_job(int(r.job_id), timeout=30) for r in _chain()}
    assert len(ends) == 2 and all(state not in ACTIVE for state in ends.values()), ends
    assert all(r.state in ("gone", "failed") for r in _chain()), _chain()
    for engine in engines:
        assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    assert _engines_left() == []
