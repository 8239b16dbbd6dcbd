"""BLIP's tokenizer: bert-base-uncased WordPiece plus `[DEC]` (bos) and `[ENC]` (the matching token).

bert-base-uncased's `vocab.txt` (30,522 lines; Apache-2.0, from google-research/bert via the Hugging Face Hub) ships
beside this file, so the default tokenizer never touches the network: a compute node without internet would
otherwise spend minutes in Hub retries before failing.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, snapshot_download
from transformers import BertTokenizer

MAX_TEXT_LENGTH = 35  # every retrieval caption is padded/truncated to this many tokens
DEFAULT_TOKENIZER = 'bert-base-uncased'
BUNDLED_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bert-base-uncased-vocab.txt')
_FIX = ("set the config key `tokenizer` to 'bert-base-uncased' (bundled, no download), a local folder holding "
        "vocab.txt, or the path of a vocab.txt")


class TokenizerError(ValueError):
    """The `tokenizer` config value cannot be loaded or does not fit the text encoder; one line with the fix."""


def init_tokenizer(name_or_path: str = DEFAULT_TOKENIZER) -> BertTokenizer:
    """Load the WordPiece tokenizer and add BLIP's two special tokens.

    Args:
        name_or_path: 'bert-base-uncased' (the bundled vocabulary), the path of a `vocab.txt` file, a local folder
            holding `vocab.txt` (or a saved tokenizer), or another Hub id (needs the network or the HF cache).
    """
    if name_or_path == DEFAULT_TOKENIZER:
        name_or_path = BUNDLED_VOCAB
    try:
        if os.path.isfile(name_or_path):
            tokenizer = BertTokenizer(name_or_path, do_lower_case=True)  # positional: vocab file in 4.x and 5.x
        else:
            tokenizer = BertTokenizer.from_pretrained(_tokenizer_folder(name_or_path))
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TokenizerError(f'config key `tokenizer`: cannot load {name_or_path!r} ({first_line}); {_FIX}') from None
    tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    tokenizer.add_special_tokens({'additional_special_tokens': ['[ENC]']})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids('[ENC]')
    return tokenizer


TOKENIZER_FILES = ['vocab.txt', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json']


def _tokenizer_folder(name_or_path: str) -> str:
    """A local folder holding the tokenizer's vocab.txt: the folder given, or a Hub repo's files.

    The Hub repo comes from the local cache if it is there, else it is downloaded, but only if the Hub answers at
    once: without that probe an offline node spends minutes in the Hub client's retries before failing.
    """
    if not os.path.isdir(name_or_path):
        try:
            name_or_path = snapshot_download(name_or_path, allow_patterns=TOKENIZER_FILES, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached (or not a valid id): try the network below
            if constants.HF_HUB_OFFLINE:
                raise OSError(f'not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set')
            endpoint = urlparse(constants.ENDPOINT)
            address = (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == 'https' else 80))
            try:
                socket.create_connection(address, timeout=5).close()
            except OSError as error:
                raise OSError(f'not in the Hugging Face cache and {constants.ENDPOINT} cannot be reached '
                              f'({error})') from None
            try:
                name_or_path = snapshot_download(name_or_path, allow_patterns=TOKENIZER_FILES)
            except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types (404, auth, ...)
                raise OSError(f'{type(error).__name__}: {error}') from None
    if not os.path.isfile(os.path.join(name_or_path, 'vocab.txt')):
        raise OSError(f'{name_or_path} holds no vocab.txt')
    return name_or_path


def check_vocab_size(tokenizer: BertTokenizer, vocab_size: int, name_or_path: str) -> None:
    """The text encoder's embedding table must have one row per token, [DEC] and [ENC] included."""
    if len(tokenizer) != vocab_size:
        raise TokenizerError(
            f'config key `tokenizer` ({name_or_path!r}) gives {len(tokenizer)} tokens (vocabulary + [DEC] + [ENC]) '
            f'but med_config has vocab_size {vocab_size}: use the vocabulary the model was built with '
            "('bert-base-uncased' for BLIP's checkpoints and configs/med_config.json; for a small model on your "
            "own captions, configs/retrieval_tiny.yaml: the demo's model knows only the demo's 55 words)")


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
