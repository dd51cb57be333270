"""Official PyTorch state-dict names <-> our parameter tree: the Rule / Table engine (`table`) and one table per
component (`llm`, `vision`, `audio`); the whole omni table is `ming_jax.models.registry.omni_table`."""

from ming_jax.weights.table import (IDENTITY, LINEAR, Assignment, Rule, Table, Transform, WeightError, export_arrays,
                                    export_state_dict, linear_from, linear_to, load_arrays, load_state_dict,
                                    param_arrays, param_shapes)

__all__ = ["Assignment", "IDENTITY", "LINEAR", "Rule", "Table", "Transform", "WeightError", "export_arrays",
           "export_state_dict", "linear_from", "linear_to", "load_arrays", "load_state_dict", "param_arrays",
           "param_shapes"]
