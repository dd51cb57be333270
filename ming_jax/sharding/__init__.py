"""Device meshes and the logical-axis sharding rules that place parameters, inputs and activations on them.

Mesh axes, ordered from the least to the most communication-hungry (the order `mesh_utils` lays onto the torus):
  data    pure data parallelism: parameters replicated, batch split (across slices by default: DCN-friendly);
  fsdp    batch split and parameters sharded on their model dim (gathered per layer; ZeRO-3);
  expert  batch split outside the MoE, routed experts split inside it (`ming_jax.moe.expert_parallel`); dense
          weights may be ZeRO-sharded over it too;
  tensor  Megatron-style split of heads / MLP width / vocab; the batch is *not* split over it.

Every parameter carries logical axis names (`ming_jax.layers.params`). A `ShardingRules` maps each logical name to a
mesh axis, a tuple of axes or None (replicated); `logical_to_spec` turns one array's names into a `PartitionSpec`
and refuses a mesh axis used twice in that array. Presets (`ShardingRules.preset("ep_fsdp")`) cover the layouts we
use; `param_shardings(abstract_model, mesh, rules)` gives the NamedSharding of every parameter (the checkpoint
loader uses it), `init_sharded` builds a model directly in its sharded layout (never materialising it on one
device), and `use_mesh(mesh, rules)` activates both for tracing: `constrain` (`constrain_even`: only the dims that
divide) and the MoE block read them.

Modules: `mesh` (MeshSpec, make_mesh), `rules` (ShardingRules, presets, logical_to_spec), `context` (use_mesh,
active, constrain), `place` (param / state / tree / input shardings, init_sharded). This package imports only
`ming_jax.config` and libraries; everything that has a tree to place (caches, optimizer state, LoRA) builds its
axis-name tree and calls `tree_shardings`.
"""

from ming_jax.sharding.context import Active, active, constrain, constrain_even, use_mesh
from ming_jax.sharding.mesh import MESH_AXES, Axes, MeshSpec, ShardingError, make_mesh
from ming_jax.sharding.place import (flat_param_shardings, init_sharded, logical_axes, param_shardings, shard_inputs,
                                     sharding_table, state_shardings, tree_shardings, variable_shardings)
from ming_jax.sharding.rules import PRESETS, ShardingRules, logical_to_spec, named_sharding

__all__ = ["Active", "Axes", "MESH_AXES", "MeshSpec", "PRESETS", "ShardingError", "ShardingRules", "active",
           "constrain", "constrain_even", "flat_param_shardings", "init_sharded", "logical_axes", "logical_to_spec",
           "make_mesh", "named_sharding", "param_shardings", "shard_inputs", "sharding_table", "state_shardings",
           "tree_shardings", "use_mesh", "variable_shardings"]
