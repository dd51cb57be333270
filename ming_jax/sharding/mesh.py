"""Device meshes: the four mesh axes, their sizes from a spec string, and a mesh laid out for the interconnect."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence, Union

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Axes = Union[str, tuple[str, ...], None]


class ShardingError(ValueError):
    """A rules / mesh / array combination that cannot be placed (unknown name, axis used twice, uneven split)."""


# --- mesh -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the four mesh axes. `data` ... `tensor` are within one slice (ICI); `dcn_*` multiply them across
    slices (DCN). One size per group may be -1: it takes the remaining devices. With several slices and no `dcn_*`
    given, the slices go to `data` (the only axis whose traffic - one gradient all-reduce per step - suits DCN)."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshSpec":
        """"data=2,fsdp=-1,expert=8" (also "dp", "ep", "tp" as short names; "dcn_data=2" for slices)."""
        short = {"dp": "data", "ep": "expert", "tp": "tensor"}
        kw = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            m = re.fullmatch(r"([a-z_]+)\s*=\s*(-?\d+)", item)
            if not m:
                raise ShardingError(f"mesh spec item {item!r}: expected name=size (in {text!r})")
            name = short.get(m.group(1), m.group(1))
            if name not in {f.name for f in dataclasses.fields(cls)}:
                raise ShardingError(f"mesh spec {text!r}: unknown axis {m.group(1)!r} (axes: {', '.join(MESH_AXES)})")
            kw[name] = int(m.group(2))
        return cls(**kw)

    def resolve(self, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """-> (ICI shape, DCN shape), each ordered as MESH_AXES, products = devices per slice and slices."""
        if num_devices % num_slices:
            raise ShardingError(f"{num_devices} devices do not split into {num_slices} equal slices")
        ici = _fill([self.data, self.fsdp, self.expert, self.tensor], num_devices // num_slices, "per-slice")
        dcn = _fill([self.dcn_data, self.dcn_fsdp, self.dcn_expert, self.dcn_tensor], num_slices, "dcn")
        return ici, dcn

    def __str__(self) -> str:
        return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, (self.data, self.fsdp, self.expert, self.tensor)))


def _fill(sizes: list[int], total: int, what: str) -> tuple[int, ...]:
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"{what} mesh sizes {sizes}: sizes must be >= 1 with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if total % known:
            raise ShardingError(f"{what} mesh sizes {sizes} do not divide {total} devices")
        sizes[free[0]] = total // known
    if math.prod(sizes) != total:
        raise ShardingError(f"{what} mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
                            f"not the {total} available")
    return tuple(sizes)


def make_mesh(spec: MeshSpec | str, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes MESH_AXES, laid out for the interconnect.

    Devices that report several `slice_index` values get a hybrid mesh (ICI shape inside each slice, DCN shape
    across slices); otherwise `mesh_utils.create_device_mesh` maps the axes onto the physical torus (on TPU) or
    simply reshapes (CPU / GPU).
    """
    spec = MeshSpec.parse(spec) if isinstance(spec, str) else spec
    devices = list(jax.devices() if devices is None else devices)
    slices = sorted({getattr(d, "slice_index", None) or 0 for d in devices})
    ici, dcn = spec.resolve(len(devices), len(slices))
    if len(slices) > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
