"""Quiet transformers: no download bars and no 'newly initialized weights' notices.

A module of its own, below everything that builds a transformers model (the shipped shapes, the
Hugging Face model loader, the classifier baselines), so that each can silence it without importing
the others.
"""

from __future__ import annotations

import logging


def quiet_transformers() -> None:
    """No download bars and no 'newly initialized weights' notices (the head is meant to be new)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
