"""Train checkpoints: orbax `CheckpointManager` over the whole TrainState, the data iterator's state and the run's
metadata, so that a resumed run continues exactly where the saved one was.

Layout of `<dir>/<step>/`: `state/` (every array of the TrainState as a nested dict of its tree path: `step`,
`params/...`, `frozen/...`, `opt_state/...`, tensorstore / OCDBT), `data/` (every host's grain iterator state, JSON),
`meta/` (JSON: the run's settings, its model source, the save time). Saves are asynchronous (training continues while the
arrays are written) and atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
crash mid-save leaves the previous checkpoint as the latest (tested by killing a process mid-save). Which steps are
saved: every `save_every` steps, the last one, and the step at which a preemption notice arrives (orbax's
`PreemptionCheckpointingPolicy`, from JAX's distributed preemption sync on multi-host TPU); `keep` newest are kept.
Paths go through `etils.epath`, so `gs://bucket/run` works as a directory.

Restore takes the abstract TrainState with the shardings of the mesh it runs on, which may differ from the mesh
that saved: orbax reads each shard's slice.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unsupported tree path entry {k!r}")


def to_nested(tree) -> dict:
    """A pytree -> nested dict of its leaves keyed by their path entries (orbax saves plain nested dicts)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        keys = [_key(k) for k in path] or ["value"]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def from_nested(like, nested: dict):
    """Inverse of `to_nested` onto the structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for k in [_key(k) for k in path] or ["value"]:
            node = node[k]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class Checkpointer:
    """Saves and restores (TrainState, data iterator state, metadata) by step."""

    def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every={save_every} and keep={keep} must be >= 1")
        self.directory = epath.Path(directory)
        if "://" not in str(directory):  # orbax (tensorstore OCDBT) wants absolute local paths
            self.directory = epath.Path(os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.preservation_policy.LatestN(keep),
            cleanup_tmp_directories=True,  # partial saves of a crashed run are removed on start
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, step: int, state, *, data: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        """Start saving at `step` if the policies say so (or `force`); returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(to_nested(state)),
                                  data=ocp.args.JsonSave(data or {}), meta=ocp.args.JsonSave(meta or {}))
        return self.manager.save(step, args=args, force=force)

    def restore_meta(self, step: int) -> dict:
        """The metadata item of `step` alone (to check a resumed run's settings before restoring any array)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
        """-> (state, data state, meta) of `step` (default: the latest), the state placed as `abstract_state`'s
        shardings say (ShapeDtypeStructs carrying shardings, e.g. from `ming_jax.train.step.state_shardings`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (have {self.all_steps()})")
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                              to_nested(abstract_state))
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return from_nested(abstract_state, out["state"]), dict(out["data"] or {}), dict(out["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
