"""The labeling command's one user-facing exception (the CLI prints it on one line and exits with status 2)."""

from __future__ import annotations

import re

__all__ = ["LabelError", "plain"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` as one plain line: terminal colour codes removed, runs of whitespace (newlines) joined."""
    return " ".join(_ANSI.sub("", text).split())


class LabelError(Exception):
    """A user-facing error (bad input, weights, settings or output path); the CLI exits with status 2."""
