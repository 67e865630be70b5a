"""llmctl: find, pull, run, chat with and benchmark local GGUF language models."""

__version__ = "0.1.0"
