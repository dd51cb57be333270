"""Generation: sampling, the shared prefill / decode step bodies, and the text and omni pipelines."""
