"""tix: textual inversion for Stable Diffusion on JAX."""

__version__ = "0.1.0"
