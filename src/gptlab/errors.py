"""Errors the CLI turns into one clear line on stderr and an exit status.

Exit status 2 means the user asked for something invalid (usage error); 1 means the request was
valid but failed while running (a corrupt file, a full disk, a server that did not answer).
"""

from __future__ import annotations


class GptlabError(Exception):
    """A failure the user can fix; the message names the problem and the fix."""

    exit_code = 1


class UsageError(GptlabError, ValueError):
    """Invalid arguments or input given by the user (exit status 2)."""

    exit_code = 2


def did_you_mean(name: str, choices) -> str:
    """'; did you mean X?' for the closest of `choices` to a mistyped `name`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
