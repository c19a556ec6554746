"""transformers settings shared by loading, int8 folders and training."""

import contextlib


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load-time chatter (T5 in transformers 5 warns about every untied head)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
