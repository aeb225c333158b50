"""pgl_fast: locally supervised learning with Periodic Global Guidance."""

__version__ = "0.1.0"
