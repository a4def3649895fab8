"""retool: declarative, resumable training of tool-using LLMs (the reconciler core)."""

__version__ = "0.1.0"
