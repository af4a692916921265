"""dlo: Dynamic Layer Operation for Llama-family models."""

__version__ = "0.1.0"
