"""sagellm-cli: the `sage llm` command line and the core behind it."""

__version__ = "0.1.0"
