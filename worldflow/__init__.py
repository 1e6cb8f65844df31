"""WorldFlow: a learned simulator built on autoregressive normalizing flows."""

__version__ = "0.1.0"
