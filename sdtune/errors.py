"""The base of every error sdtune reports to a user: bad input, a file that does not fit, a stopped run."""

from __future__ import annotations


class SdtuneError(Exception):
    """An error whose message is written for the user: what is wrong, the value, and the fix.

    `sdtune` prints the message (no traceback) and exits with `exit_code`: 2 for bad input unless a subclass says
    otherwise.
    """

    exit_code = 2
