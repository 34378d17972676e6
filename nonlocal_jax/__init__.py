"""nonlocal-jax: Non-local Neural Networks (Wang et al., CVPR 2018) in JAX / Flax NNX."""

from nonlocal_jax.nonlocal_block import NonLocalBlock

__all__ = ["NonLocalBlock"]
__version__ = "0.1.0"
