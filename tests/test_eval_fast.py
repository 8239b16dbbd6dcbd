"""The fast evaluation path against the straightforward one, on the same weights; bf16 against fp32."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import REPO, VOCAB, assert_close

import evaluation
import utils
from models import BLIP_Retrieval


def _recall(scores, txt2img, img2txt):
    return evaluation.recall_metrics(scores[0], scores[1], txt2img, img2txt)


def test_fast_equals_reference_on_a_base_size_model():
    """ViT-B / BERT-base at 384 px with random weights: 3 images, 9 captions of mixed lengths, k_test 4."""
    torch.manual_seed(0)
    model = BLIP_Retrieval(med_config=os.path.join(REPO, 'configs', 'med_config.json'), image_size=384, vit='base',
                           queue_size=8, tokenizer=VOCAB).eval()
    captions = ['a dog', 'two dogs play in the snow near a red fence', 'a man riding a bike down a steep hill',
                'people', 'a small child in a blue coat holds a balloon at the fair', 'a cat sleeping',
                'the skyline at night', 'three women laughing around a table full of food and drinks', 'a boat']
    images = torch.randn(3, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    loader = [(images, None)]
    txt2img = {t: t // 3 for t in range(9)}
    img2txt = {i: [3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)}
    fast = evaluation.evaluate_scores(model, loader, captions, {'k_test': 4, 'eval_pair_batch': 16}, torch.device('cpu'))
    ref = evaluation.evaluate_scores(model, loader, captions, {'k_test': 4, 'eval_mode': 'reference'},
                                     torch.device('cpu'))
    # Through 12 layers of 768 wide at 577 image tokens, in another order: 5 digits.
    assert_close(fast[0], ref[0], 5)
    assert_close(fast[1], ref[1], 5)
    assert (fast[0] > -100).sum() == 3 * 4 and (fast[1] > -100).sum() == 9 * 3
    assert _recall(fast, txt2img, img2txt) == _recall(ref, txt2img, img2txt)


def test_bf16_evaluation_keeps_golden_recall(tiny_model, golden):
    loader = [(torch.tensor(golden['images']), None)]
    txt2img = {int(k): v for k, v in golden['txt2img'].items()}
    img2txt = {int(k): v for k, v in golden['img2txt'].items()}
    config = {'k_test': golden['k_test']}
    fp32 = evaluation.evaluate_scores(tiny_model, loader, golden['captions'], config, torch.device('cpu'))
    autocast = utils.configure_precision('bf16', torch.device('cpu'))
    bf16 = evaluation.evaluate_scores(tiny_model, loader, golden['captions'], config, torch.device('cpu'), autocast)
    utils.configure_precision('fp32', torch.device('cpu'))
    assert _recall(bf16, txt2img, img2txt) == _recall(fp32, txt2img, img2txt) == golden['itm_eval']
    # Entries re-scored in both precisions differ by bf16 rounding in the encoders only (the largest seen:
    # 1.3e-3; 5.3e-3 when the output heads ran in bf16 too).
    for low, high in zip(bf16, fp32):
        both = (low > -100) & (high > -100)
        assert np.abs(low - high)[both].max() < 4e-3


def test_bf16_keeps_image_tokens_in_bf16_without_changing_a_score(tiny_model, golden):
    """Half the memory for the stored image tokens: the key/value projections cast them to bf16 anyway."""
    cpu = torch.device('cpu')
    images = torch.tensor(golden['images'])
    autocast = utils.configure_precision('bf16', cpu)
    try:
        embeds, image_feat = evaluation.image_features(tiny_model, [(images, None)], cpu, autocast)
        text_feat, ids, mask = evaluation.text_features(tiny_model, golden['captions'], cpu, autocast)
        with torch.no_grad(), autocast():
            embeds_fp32 = tiny_model.encode_image(images)[0]
        assert embeds.dtype == torch.bfloat16 and embeds_fp32.dtype == torch.float32
        assert torch.equal(embeds, embeds_fp32.to(torch.bfloat16))
        for scores, tolerance in ((evaluation.fast_scores, 0), (evaluation.reference_scores, 1e-3)):
            kept = scores(tiny_model, embeds, image_feat, text_feat, ids, mask, 3, autocast=autocast)
            full = scores(tiny_model, embeds_fp32, image_feat, text_feat, ids, mask, 3, autocast=autocast)
            # The reference path's broadcast (stride-0) bf16 tokens take another matmul kernel than their
            # contiguous cast copy: the same numbers, summed in another order.
            for a, b in zip(kept, full):
                torch.testing.assert_close(a, b, atol=tolerance, rtol=0, msg=scores.__name__)
    finally:
        utils.configure_precision('fp32', cpu)
    embeds, _ = evaluation.image_features(tiny_model, [(images, None)], cpu)  # fp32 stays fp32
    assert embeds.dtype == torch.float32


@pytest.mark.parametrize('pair_batch', [1, 3, 8, 64])
def test_plan_scores_every_pair_once_in_bounded_batches(pair_batch):
    """The fast path's schedule: each pair in exactly one batch, its images' keys/values a slice of its block's."""
    g = torch.Generator().manual_seed(pair_batch)
    pair_images = torch.sort(torch.randint(0, 9, (70,), generator=g)).values  # some images have no pair
    pair_lengths = torch.randint(2, 36, (70,), generator=g)
    plan = evaluation._plan(pair_images, pair_lengths, pair_batch)
    assert sorted(plan.order.tolist()) == list(range(70))
    assert torch.equal(plan.lengths, pair_lengths[plan.order])
    assert torch.equal(plan.block_images, pair_images.unique())
    positions = []
    for block in plan.blocks:
        block_images = plan.block_images[block.images]
        for batch in block.batches:
            pairs = plan.order[batch.pairs]
            positions += list(range(70)[batch.pairs])
            assert 0 < len(pairs) <= pair_batch
            # The pairs of image i of the batch are the next pairs_per_image[i] ones: packing relies on it.
            images = block_images[batch.images]
            assert torch.equal(pair_images[pairs], images.repeat_interleave(torch.tensor(batch.pairs_per_image)))
    assert positions == list(range(70))


@pytest.mark.parametrize('pair_batch', [1, 5, 48, 4096])
def test_fast_equals_reference_for_any_pair_batch(tiny_model, pair_batch):
    """Many more pairs than one batch: 11 images x 37 captions of random lengths, k_test 6."""
    g = torch.Generator().manual_seed(1)
    words = 'a dog cat man woman child runs sits on the red blue green grass street water near with two'.split()
    captions = [' '.join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
                for n in torch.randint(1, 30, (37,), generator=g)]
    loader = [(torch.randn(11, 3, 32, 32, generator=g), None)]
    fast = evaluation.evaluate_scores(tiny_model, loader, captions, {'k_test': 6, 'eval_pair_batch': pair_batch},
                                      torch.device('cpu'))
    ref = evaluation.evaluate_scores(tiny_model, loader, captions, {'k_test': 6, 'eval_mode': 'reference'},
                                     torch.device('cpu'))
    assert_close(fast[0], ref[0], 6)  # the same math in another order
    assert_close(fast[1], ref[1], 6)
    assert (fast[0] > -100).sum() == 11 * 6 and (fast[1] > -100).sum() == 37 * 6
