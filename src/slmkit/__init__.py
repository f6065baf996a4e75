"""slmkit: obtain, enhance, deploy and audit small language models."""

__version__ = "0.1.0"
