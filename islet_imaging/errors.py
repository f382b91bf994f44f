"""Exceptions raised for bad user input, and warnings about input that is usable but poor.

Every error names the file (when there is one) and says what to do, so that a batch job can record it
and a user can fix it without reading a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "CoarseImageWarning",
    "EmptyImageWarning",
    "ImageReadError",
    "InputError",
    "MissingZStepWarning",
    "ModelError",
    "SmallImageWarning",
    "StageError",
    "logged_warnings",
]


class InputError(ValueError):
    """Bad user input: an unreadable file, a missing channel, a bad pixel size, ...

    Parameters
    ----------
    message : str
        What is wrong and what to do about it.
    path : path-like, optional
        The file the problem was found in; prefixed to the message.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class ImageReadError(InputError):
    """An image file is missing, corrupt, truncated or has no usable pixels."""


class StageError(InputError):
    """An unknown stage name or an invalid stage profile."""


class ModelError(InputError):
    """A model directory with missing, mismatched or tampered files."""


class EmptyImageWarning(UserWarning):
    """The image holds no usable signal (blank, constant or saturated); labels are empty."""


class SmallImageWarning(UserWarning):
    """The image is smaller than the context the CNN needs for its full accuracy."""


class CoarseImageWarning(UserWarning):
    """The image is sampled more coarsely than the CNN was trained and validated for."""


class MissingZStepWarning(UserWarning):
    """A z-stack without a z step: its planes are taken as far apart as its pixels."""


@contextlib.contextmanager
def logged_warnings(
    logger: logging.Logger, prefix: str = ""
) -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside the block, then log each at WARNING after ``prefix``.

    "Always": none is lost to Python's once-per-location filter, so a batch of images logs each
    image's warnings. Yields the list of recorded warnings (their ``category`` and ``message``).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for w in caught:
        logger.warning("%s%s", prefix, w.message)
