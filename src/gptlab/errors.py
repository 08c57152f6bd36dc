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
