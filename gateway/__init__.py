"""An LLM API gateway: counts, admits, forwards, settles and records every model call."""

__version__ = "0.1.0"
