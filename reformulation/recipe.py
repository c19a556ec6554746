"""What both trainers do the same way with a config's from-scratch keys: the task tokenizer and the training rows."""

from __future__ import annotations

from pathlib import Path

from .augment import augment
from .config import TrainConfig
from .data import Example


def task_tokenizer(cfg: TrainConfig, train: list[Example], saved: Path | None = None):
    """None when the model's own tokenizer is used; else the one trained on the train split (`tokenizer_vocab_size`
    pieces), or the one saved in `saved` (a checkpoint being resumed: the same vocabulary, not a retrained one)."""
    if not cfg.tokenizer_vocab_size:
        return None
    if saved is not None and (Path(saved) / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(saved))
    from .tokenizer import train_tokenizer

    return train_tokenizer([e.source for e in train] + [e.target for e in train], cfg.tokenizer_vocab_size)


def training_examples(cfg: TrainConfig, train: list[Example]) -> list[Example]:
    """The train split, then `augment_copies` entity-swapped variants of its rows (made from the train split only:
    nothing of valid or test enters training)."""
    if not cfg.augment_copies:
        return list(train)
    return list(train) + augment(train, cfg.augment_copies, cfg.seed, cfg.augment_invented,
                                 cfg.augment_names)


def phrasebook(tokenizer, train: list[Example], decoder_start: int):
    """The train split's targets as a speculative.Phrasebook (what follows each 1-3 target tokens), saved beside every
    model a run writes (drafts.json): speculative decoding drafts the relation words from it. The original rows
    only: augmented names would be noise."""
    from .speculative import Phrasebook

    return Phrasebook.from_texts([e.target for e in train], tokenizer, decoder_start)
