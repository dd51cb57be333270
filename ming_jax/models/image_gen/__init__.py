"""Image generation: learned query tokens through the thinker -> Qwen2 connector -> Z-Image DiT -> Flux-layout VAE."""
