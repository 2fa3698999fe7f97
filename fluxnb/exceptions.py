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


class BadSettingError(FluxnbError, ValueError, TypeError):
    """A setting fluxnb cannot use: the wrong type, size or range (a side not a multiple of 16, zero steps,
    an empty prompt, ...). One class for every such check, so the same mistake raises the same error on
    every entry point (notebook helpers, the Studio, the recipes' checks, the command lines); it is both a
    ``ValueError`` and a ``TypeError``, so code that catches either keeps working."""


class MissingFileError(FluxnbError, FileNotFoundError):
    """A file or folder fluxnb needs is missing or incomplete (a download cut short, a wrong path)."""


class DamagedFileError(FluxnbError, ValueError):
    """A file is there but cannot be read as what it should be (cut off while saving, not valid JSON, ...)."""


class HubAccessError(FluxnbError, PermissionError):
    """The Hugging Face Hub refused a download: no token, a revoked token, or a gated licence not accepted."""


class HubUnreachableError(FluxnbError, ConnectionError):
    """The Hugging Face Hub could not be reached (offline, a proxy, ``HF_HUB_OFFLINE=1``)."""


class UnwritableFolderError(FluxnbError, OSError):
    """A folder asked for output cannot be created or written (a path under a file, a read-only or full disk,
    no permission): said before the work that would end there, not after it."""
