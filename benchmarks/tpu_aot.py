"""What the TPU benchmarks share: a chip's spec sheet and abstract one-chip arguments for AOT compilation."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import jax
import numpy as np
from jax.experimental import topologies
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks.results import run_meta, write_json

CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # megacore chips expose two TensorCores as one device


def chip_info(topology: str) -> pltpu.TpuInfo:
    name = topology.split(":")[0]
    return pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(name), CORES_PER_DEVICE.get(name, 1))


def one_chip_args(topology: str, shapes: Sequence[tuple]) -> list[jax.ShapeDtypeStruct]:
    """(shape, dtype) pairs -> abstract arguments placed on the first chip of `topology`."""
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    one_chip = NamedSharding(Mesh(np.array(topo.devices[:1]), ("chip",)), PartitionSpec())
    return [jax.ShapeDtypeStruct(s, dt, sharding=one_chip) for s, dt in shapes]


def write_results(path: str, default_name: str, rows: list[dict], note: str) -> str:
    """Write {meta, rows} as JSON to `path` (empty: <tmpdir>/default_name); meta records the date and jax's version.
    -> the path."""
    path = path or os.path.join(tempfile.gettempdir(), default_name)
    return write_json(path, dict(meta=dict(run_meta(), note=note), rows=rows))
