"""Token modalities: which router gate of a MultiRouter serves each token, and the gates' official names.

The ids index the gate axis of the router kernel ([R, D, E]) and the `modality` arrays the host builds for each
prompt (`ming_jax.models.inputs.prepare`); an LLM with one gate ("topN") routes every token through gate 0.
"""

TEXT, VISION, AUDIO = 0, 1, 2
GATE_NAMES = ("gate", "image_gate", "audio_gate")  # official `mlp.<name>` of each gate, in modality order
