"""An async API gateway and reverse proxy on aiohttp (see DESIGN.md)."""

__version__ = "0.1.0"
