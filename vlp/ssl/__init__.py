"""Self-supervised image objectives: SimCLR, MoCo (v3/v2), BYOL and DINO, standalone or beside CLIP/SigLIP.

Importing this package registers every method as a standalone objective (``--objective NAME``) and as an
auxiliary term of the contrastive objective (``--aux-ssl NAME``).
"""

from vlp.ssl import byol, dino, moco, simclr  # noqa: F401 - registrations
from vlp.ssl.base import SSLMethod, SSLObjective, embedding_std

__all__ = ["SSLMethod", "SSLObjective", "embedding_std"]
