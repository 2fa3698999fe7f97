"""The exceptions fluxnb raises on purpose, under one base: each message says what is wrong and what to do.

A module of its own, imported by everything and importing nothing of fluxnb, so that any module can
raise them without importing the checks (:mod:`fluxnb.errors`), which need most of the others.
Each one also derives from the built-in exception a caller would catch for it (``ValueError``,
``torch.OutOfMemoryError``, ...), so code written against those keeps working.
"""

from __future__ import annotations


class FluxnbError(Exception):
    """An error fluxnb raises on purpose: its message says what is wrong and what to do next."""


class NeedsGPUError(FluxnbError, RuntimeError):
    """What was asked for is of no use without a GPU (e.g. building the 34 GB random stand-in on a CPU)."""
