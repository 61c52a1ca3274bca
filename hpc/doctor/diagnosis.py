"""`mt doctor`: what works on this cluster, checked here and on a compute node, as one report.

``diagnose`` runs the local checks (``hpc.doctor.checks``), then the probe job
(``hpc.slurm.probejob``) and its checks (``hpc.doctor.probe``), into a ``Diagnosis``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from hpc.doctor.checks import Check, local_checks
from hpc.doctor.handover import handover_check
from hpc.doctor.probe import probe_checks
from hpc.site import Site
from hpc.slurm.client import SlurmClient
from hpc.slurm.probejob import ProbeResult, run_probe
from hpc.transport import LocalTransport


@dataclass(frozen=True)
class Diagnosis:
    """Every check, and the probe (None when it did not run)."""

    checks: list[Check]
    probe: ProbeResult | None

    @property
    def ok(self) -> bool:
        """No check failed (not-applicable ones do not count)."""
        return not any(check.ok is False for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "ok": self.ok,
            "checks": [asdict(check) for check in self.checks],
            "probe": self.probe.to_dict() if self.probe else None,
        }


def diagnose(
    site: Site,
    *,
    probe: bool = True,
    gpus: int = 0,
    partition: str | None = None,
    timeout_s: float = 120.0,
    client: SlurmClient | None = None,
    environ: Mapping[str, str] | None = None,
    sbatch_extra: Mapping[str, str | bool] | None = None,
) -> Diagnosis:
    """The local checks, then (with ``probe``, where Slurm is here) the probe job's."""
    checks = local_checks(site, client=client, environ=environ)
    if not probe:
        return Diagnosis(checks, None)
    slurm_ok = next(c.ok for c in checks if c.name == "slurm commands")
    if not slurm_ok:
        checks.append(Check("probe job", None, "skipped: no Slurm commands here"))
        return Diagnosis(checks, None)
    slurm = client or SlurmClient(
        LocalTransport(dict(os.environ if environ is None else environ)),
        timeout_s=site.config.slurm.command_timeout_s,
    )
    checks.append(handover_check(slurm))  # continuity: handover (hpc.doctor.handover)
    result = run_probe(
        site,
        gpus=gpus,
        partition=partition,
        timeout_s=timeout_s,
        folder=site.log_dir / "doctor",
        client=client,
        sbatch_extra=sbatch_extra,
    )
    if result.outcome == "ok":
        # slurm.python names the Python as compute nodes see it: one missing here but
        # run by the probe on the node is fine.
        checks = [
            replace(c, ok=None, detail=f"{c.detail} (the node runs it: see job python (node))")
            if c.name == "job python" and c.ok is False and "not found here" in c.detail
            else c
            for c in checks
        ]
    found = probe_checks(
        result, registry_dir=site.registry_dir, staging_max_bytes=site.config.staging.max_bytes
    )
    return Diagnosis(checks + found, result)
