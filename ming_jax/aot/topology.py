"""TPU topologies to compile for from any host: chip HBM sizes and the devices of a named slice (libtpu)."""

from __future__ import annotations

import os

# HBM per chip (one JAX device per chip on these generations), bytes, from Google's spec sheets.
HBM_BYTES = {"v4": 32e9, "v5p": 95e9, "v5e": 16e9, "v6e": 32e9}


def chip_of(topology: str) -> str:
    """"v5p:4x4x4" -> "v5p"."""
    chip = topology.split(":")[0].strip().lower()
    if chip not in HBM_BYTES:
        raise ValueError(f"topology {topology!r}: unknown chip {chip!r} (known: {', '.join(HBM_BYTES)})")
    return chip


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a TPU topology such as "v5p:4x4x4" (all slices), for compiling only.

    Needs libtpu (`pip install "jax[tpu]"`). Several processes may compile at once: libtpu's single-user lock file is
    for owning real chips, so it is disabled here (ALLOW_MULTIPLE_LIBTPU_LOAD) unless the caller set it.
    """
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip_of(topology)
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices)
