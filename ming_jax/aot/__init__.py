"""Ahead-of-time compiles for TPU topologies from any host: topologies, compile, per-chip memory plans (`omni`: the
multimodal prefill with the vision and audio towers)."""
