"""Quiet output: the warnings a learner cannot act on are silenced where they arise, and only there.

Each silencer names one message of one library (or one progress bar of fluxnb's own stand-in builds);
everything else the libraries say still reaches the learner.

* transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and
  the same for SigLIP): diffusers' FLUX pipeline imports image processors it never uses for text to
  image, and the fallback works. Dropped at its logger (:func:`silence_torchvision_fallback`, run on
  ``import fluxnb``); Colab has torchvision and never shows it.
* the "Writing model shards" progress bars while fluxnb builds or exports a stand-in (tiny, random-dev,
  their NF4 packages): fluxnb's bookkeeping, not the learner's download (:func:`no_progress_bars`).
* the tokenizers' truncation warnings, which print the whole cut text: replaced by one line in
  :func:`fluxnb.errors.prompt_truncation_notice`, around ``encode_prompt`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

TORCHVISION_FALLBACK = ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to")


class DropMessages(logging.Filter):
    """Drop the records of one logger whose message contains ``text``; let every other record through."""

    def __init__(self, text: str, at_start: bool = False) -> None:
        super().__init__()
        self.text, self.at_start = text, at_start

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()  # the text as it would print, arguments filled in
        return not (message.startswith(self.text) if self.at_start else self.text in message)


def silence_torchvision_fallback() -> None:
    """Drop transformers' torchvision-fallback warning (see the module docstring); idempotent."""
    name, text = TORCHVISION_FALLBACK
    logger = logging.getLogger(name)
    if not any(isinstance(f, DropMessages) and f.text == text for f in logger.filters):
        logger.addFilter(DropMessages(text))


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Inside: no transformers/huggingface_hub progress bars (fluxnb's stand-in builds). Restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
