"""Writing a run down: ``results.csv`` (one row per level and model) and ``results.json``.

``results.json`` holds everything: the config, the environment (machine, versions), every
level's summaries and every request's record, so any other statistic can be computed later.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from bench.loadgen import LevelResult
from bench.metrics import LevelSummary

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, object]:
    """Where the numbers were measured: host, CPUs, Python and package versions."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "modeltainer": _version("modeltainer"),
        "aiohttp": _version("aiohttp"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summaries(levels: Sequence[LevelResult]) -> list[LevelSummary]:
    """Every summary of a run, level by level, models in their order."""
    return [summary for level in levels for summary in level.summaries]


def write_results(
    out_dir: Path, config: Mapping[str, object], levels: Sequence[LevelResult]
) -> list[Path]:
    """Write ``results.csv`` and ``results.json`` under ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [s.flat() for s in summaries(levels)]
    csv_path = out_dir / RESULTS_CSV
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    document = {
        "config": dict(config),
        "environment": environment(),
        "levels": [
            {
                "concurrency": level.concurrency,
                "summaries": [asdict(s) for s in level.summaries],
                "records": [asdict(r) for r in level.records],
            }
            for level in levels
        ],
    }
    json_path = out_dir / RESULTS_JSON
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return [csv_path, json_path]
