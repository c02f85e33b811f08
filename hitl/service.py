"""Placeholder: being written (see hitl/cli.py SUBMODULES)."""

from __future__ import annotations

from galsift.cli import CommandGroups


def register(groups: CommandGroups) -> None:
    """Nothing yet."""
