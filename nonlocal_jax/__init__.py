"""nonlocal-jax: Non-local Neural Networks (Wang et al., CVPR 2018) in JAX / Flax NNX.

With two relatives: the local relation layer (Hu et al., ICCV 2019) and the
object relation module (Hu et al., CVPR 2018).
"""

from nonlocal_jax.local_relation import LocalRelation
from nonlocal_jax.nonlocal_block import NonLocalBlock
from nonlocal_jax.relation_module import RelationModule

__all__ = ["LocalRelation", "NonLocalBlock", "RelationModule"]
__version__ = "0.1.0"
