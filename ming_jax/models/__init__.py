"""One top-down file per network (llm, vision, audio, omni), the numpy-only model inputs, and the component registry."""
