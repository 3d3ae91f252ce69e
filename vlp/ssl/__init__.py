"""Self-supervised image methods: SimCLR, MoCo (v3/v2), BYOL and DINO (their objectives are registered by
vlp/objectives/<method>.py, standalone and as auxiliary terms beside CLIP/SigLIP)."""

from vlp.ssl.base import SSLMethod, collapse_statistic

__all__ = ["SSLMethod", "collapse_statistic"]
