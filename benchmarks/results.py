"""One way for the benchmark scripts to record a run: when, where, which jax, written atomically as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform

import jax


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (/proc/cpuinfo), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta() -> dict:
    """Date (UTC), machine (with its CPU model: speed ratios against other libraries differ between CPUs) and jax
    version / backend of this run."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "cpu": cpu_model(), "jax": jax.__version__, "backend": jax.default_backend()}


def write_json(path: str, payload: dict) -> str:
    """Write `payload` to `path` (parent folders made) through a temporary file and a rename: never half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
