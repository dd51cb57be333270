"""`python -m ming_jax.tts`: the text-to-speech CLI (`ming_jax.cli.tts`)."""

from ming_jax.cli import tts

if __name__ == "__main__":
    tts.run()
