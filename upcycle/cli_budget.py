"""Commands attached to the `upcycle` group (see cli.py)."""

from .cli import cli  # noqa: F401
