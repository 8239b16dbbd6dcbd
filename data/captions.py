"""Caption normalisation shared by training and evaluation."""
from __future__ import annotations

import re

# Punctuation that the original BLIP cleaner turns into spaces; commas, apostrophes,
# hyphens and question marks are kept on purpose (the tokenizer sees them).
_PUNCTUATION_TO_SPACE = re.compile(r'[.!"()*#:;~]')
_REPEATED_WHITESPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lower-case ``caption``, blank out a fixed set of punctuation and cut it to ``max_words`` words.

    Args:
        caption: raw caption text.
        max_words: the number of space-separated words kept.

    Returns:
        The cleaned caption, identical to what the original BLIP cleaner produces.
    """
    text = _PUNCTUATION_TO_SPACE.sub(" ", caption.lower())
    text = _REPEATED_WHITESPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
