"""broker: an OAuth2 token broker."""

__version__ = "0.2.0"
