"""The error types a user sees (floor 1: imports nothing of ours).

Only these become one-line messages in the `artaug` command; any other exception is a bug
and keeps its traceback. Each subclass also derives from the builtin type a Python caller
would expect (ValueError for bad input, OSError-like failures as RuntimeError), so library
users can catch either.
"""

from __future__ import annotations


class ArtaugError(Exception):
    """A failure the user can fix; the message names the thing and the fix."""


class UsageError(ArtaugError, ValueError):
    """A bad argument, option or setting (found before the expensive work starts)."""


class FileFormatError(ArtaugError, ValueError):
    """A file we read is missing, truncated or of another kind; the message names the file."""

    def __init__(self, path: str, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}. Fix: {fix}")


class NonFiniteError(ArtaugError, FloatingPointError):
    """A computation produced NaN or Inf (a non-finite result is never written as an image)."""


class RunLockedError(ArtaugError, RuntimeError):
    """Another live process holds the run folder's lock."""


class PeerLostError(ArtaugError, RuntimeError):
    """Another process of a multi-process launch stopped or stopped answering; the message
    names it where it can, and says that running the same command again resumes."""


class OutOfSpaceError(ArtaugError, RuntimeError):
    """A write failed because the disk is full or a file-size limit was hit; the message names
    the file (what was written before is intact, and the same command resumes)."""
