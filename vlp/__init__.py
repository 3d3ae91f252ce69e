"""vlp: vision-language pretraining."""

__version__ = "0.1.0"
