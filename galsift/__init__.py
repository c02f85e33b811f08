"""galsift: event-driven survey monitoring for galaxy images (cross-cutting code)."""

__version__ = "0.1.0"
