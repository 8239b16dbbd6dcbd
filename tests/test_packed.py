"""Packed pair batches (models/packed.py) against the padded text encoder, on the same weights."""
from __future__ import annotations

import torch

from conftest import assert_close
from models import packed
from models.tokenizer import with_enc_token

REORDERED_DIGITS = 6  # the same math in another order (conftest.assert_close)


def _pairs(tiny_model):
    """7 captions of 2 to 11 tokens paired with 3 images (3, 0 and 4 pairs: an image may have none)."""
    captions = ['a dog', 'two cats on a red sofa near the window', 'people', 'a man rides a bike down a hill',
                'snow', 'a child holds a blue balloon at the fair', 'the sea']
    ids, mask = tiny_model.tokenize(captions)
    ids = with_enc_token(ids, tiny_model.enc_token_id)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return ids, mask, images, [3, 0, 4]


def test_packed_match_logits_equal_the_padded_path(tiny_model):
    ids, mask, images, pairs_per_image = _pairs(tiny_model)
    with torch.no_grad():
        embeds, _ = tiny_model.encode_image(images)
        per_pair = embeds.repeat_interleave(torch.tensor(pairs_per_image), dim=0)
        padded = tiny_model.match_logits(ids, mask, image_embeds=per_pair, cls_only=False)  # the original's pass
        batch = packed.pack_padded(ids, mask, pairs_per_image)
        logits = tiny_model.match_logits_packed(batch, tiny_model.image_kv(embeds))
    assert batch.input_ids.numel() == int(mask.sum())  # no padding token is computed
    assert batch.image_tokens == [int(mask[:3].sum()), 0, int(mask[3:].sum())]
    assert_close(logits, padded, REORDERED_DIGITS)


def test_packing_keeps_each_caption_and_finds_its_first_token(tiny_model):
    ids, mask, _, pairs_per_image = _pairs(tiny_model)
    order = torch.tensor([4, 0, 6, 1, 2, 5, 3])  # pairs in another order than the rows of `ids`
    lengths = mask.sum(dim=1)[order]
    batch = packed.pack_pairs(ids, order, lengths, lengths, pairs_per_image)
    for b, (text, start) in enumerate(zip(order.tolist(), batch.first.tolist())):
        n = int(lengths[b])
        assert batch.input_ids[start:start + n].tolist() == ids[text, :n].tolist()
        assert batch.positions[start:start + n].tolist() == list(range(n))
        assert batch.padded_rows[start:start + n].tolist() == [b * int(lengths.max()) + p for p in range(n)]
    assert batch.key_mask.sum(dim=1).tolist() == lengths.tolist()
