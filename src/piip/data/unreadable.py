"""Unreadable images never stop an epoch: every dataset skips them the same way and counts them."""
from __future__ import annotations

import warnings

__all__ = ["DECODE_ERRORS", "SkipsUnreadable"]

#: what decoding a damaged or truncated image file raises (PIL and friends)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # PIL.UnidentifiedImageError is an OSError


class SkipsUnreadable:
    """Bookkeeping of a dataset's unreadable images: ``skipped`` counts the failed reads,
    ``bad_files`` lists each file once, and every new bad file is reported with a warning. With
    ``DataLoader(num_workers>0)`` the counters live in the worker processes; the warnings still
    reach the log."""

    skipped: int = 0

    def note_unreadable(self, path: str, error: Exception) -> None:
        self.skipped = self.skipped + 1
        bad = self.__dict__.setdefault("bad_files", [])
        if path not in bad:
            bad.append(path)
            warnings.warn(f"skipping unreadable image {path!r} ({type(error).__name__}: {error}); "
                          f"{len(bad)} unreadable so far", RuntimeWarning, stacklevel=3)
