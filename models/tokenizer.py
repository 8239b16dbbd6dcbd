"""BLIP's tokenizer: bert-base-uncased WordPiece plus `[DEC]` (bos) and `[ENC]` (the matching token)."""
from __future__ import annotations

import os

import torch
from transformers import BertTokenizer

MAX_TEXT_LENGTH = 35  # every retrieval caption is padded/truncated to this many tokens


def init_tokenizer(name_or_path: str = 'bert-base-uncased') -> BertTokenizer:
    """Load the WordPiece tokenizer and add BLIP's two special tokens.

    Args:
        name_or_path: a hub id (needs the network or the HF cache), a local folder holding
            `vocab.txt`, or the path of a `vocab.txt` file (for compute nodes without internet).
    """
    if os.path.isfile(name_or_path):
        tokenizer = BertTokenizer(name_or_path, do_lower_case=True)  # positional: vocab file in 4.x and 5.x
    else:
        try:
            tokenizer = BertTokenizer.from_pretrained(name_or_path)
        except OSError as error:
            raise OSError(
                f"could not load the tokenizer {name_or_path!r}: {error}\n"
                "Without internet, set the config key `tokenizer` to a local folder or to the path of "
                "bert-base-uncased's vocab.txt (copy it from a machine with internet).") from error
    tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    tokenizer.add_special_tokens({'additional_special_tokens': ['[ENC]']})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids('[ENC]')
    return tokenizer


def tokenize(tokenizer: BertTokenizer, captions: list[str], device: torch.device | str = 'cpu'
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids, attention_mask), each (B, 35)."""
    encoded = tokenizer(list(captions), padding='max_length', truncation=True, max_length=MAX_TEXT_LENGTH,
                        return_tensors='pt')
    return encoded['input_ids'].to(device), encoded['attention_mask'].to(device)


def with_enc_token(input_ids: torch.Tensor, enc_token_id: int) -> torch.Tensor:
    """Matching runs on the same ids with `[CLS]` replaced by `[ENC]`."""
    ids = input_ids.clone()
    ids[:, 0] = enc_token_id
    return ids


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns that every row of the batch has.

    Exact for BLIP's outputs: padding keys are masked out, so no real token (the [CLS]/[ENC] output
    included) ever depends on a padding position; only the wasted work goes.
    """
    length = int(attention_mask.sum(dim=1).max()) if attention_mask.numel() else 0
    return input_ids[:, :max(length, 1)], attention_mask[:, :max(length, 1)]
