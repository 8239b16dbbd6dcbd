"""The retrieval model against the original implementation's recorded outputs and layout."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, REPO, TINY_KWARGS, VOCAB, assert_close, run_torchrun
from models import BLIP_Retrieval, blip_retrieval
from models.checkpoint import CheckpointError, read_checkpoint
from models.tokenizer import with_enc_token

GOLDEN_DIGITS = 5  # the original's outputs, computed with other kernels in another order (conftest.assert_close)
REORDERED_DIGITS = 6  # the same math in another order


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def test_base_state_dict_matches_official_layout():
    with open(os.path.join(FIXTURES, 'base_state_dict_keys.txt')) as f:
        reference = [tuple(line.rstrip('\n').split('\t')) for line in f if not line.startswith('#')]
    with torch.device('meta'):  # shapes only: no 450M random weights
        model = BLIP_Retrieval(med_config=os.path.join(REPO, 'configs', 'med_config.json'), image_size=384,
                               vit='base', embed_dim=256, queue_size=57600, tokenizer=VOCAB)
    params = dict(model.named_parameters())
    mine = [(k, str(list(v.shape)), str(v.dtype).removeprefix('torch.'), 'param' if k in params else 'buffer')
            for k, v in model.state_dict().items()]
    assert len(reference) == 949
    assert mine == reference


def test_tokenizer_matches_golden(tiny_model, golden):
    ids, mask = tiny_model.tokenize(golden['captions'])
    assert ids.tolist() == golden['input_ids']
    assert mask.tolist() == golden['attention_mask']
    tok = golden['tokenizer']
    assert (tiny_model.enc_token_id, tiny_model.tokenizer.bos_token_id, len(tiny_model.tokenizer)) == \
        (tok['enc_token_id'], tok['bos_token_id'], tok['len'])


@torch.no_grad()
def test_features_similarities_and_matching_logits(tiny_model, golden):
    images = t(golden['images'])
    image_embeds, image_feat = tiny_model.encode_image(images)
    assert_close(image_embeds, t(golden['image_embeds']), GOLDEN_DIGITS)
    assert_close(image_feat, t(golden['image_feat']), GOLDEN_DIGITS)
    ids, mask = tiny_model.tokenize(golden['captions'])
    text_feat = tiny_model.encode_text(ids, mask)
    assert_close(text_feat, t(golden['text_feat']), GOLDEN_DIGITS)
    assert_close(image_feat @ text_feat.t(), t(golden['sim_i2t']), GOLDEN_DIGITS)
    itm_ids = t(golden['itm_input_ids'], torch.long)
    assert (itm_ids[:, 0] == tiny_model.enc_token_id).all()
    logits = torch.stack([tiny_model.match_logits(itm_ids, mask, image_embeds=image_embeds[i:i + 1].expand(8, -1, -1))
                          for i in range(4)])
    assert_close(logits, t(golden['itm_logits']), GOLDEN_DIGITS)
    # The same logits from keys/values computed once per image.
    kv = tiny_model.image_kv(image_embeds[1:2].expand(8, -1, -1))
    assert_close(tiny_model.match_logits(itm_ids, mask, image_kv=kv), logits[1], REORDERED_DIGITS)


def _train_forward(model, golden, inject_negatives: bool, mode: str = 'eval'):
    batch = golden['train_batch']
    ref = golden[f'train_forward_{mode}_mode']
    model.train(mode == 'train')
    if inject_negatives:
        model.sample_hard_negatives = lambda w_t2i, w_i2t: (t(ref['neg_image_idx_for_text'], torch.long),
                                                            t(ref['neg_text_idx_for_image'], torch.long))
    images = t(golden['images'])[batch['image_rows']]
    ids, mask = model.tokenize([golden['captions'][i] for i in batch['caption_rows']])
    torch.manual_seed(batch['seed'])
    return model.forward_train(images, ids, mask, batch['alpha'], t(batch['idx'], torch.long)), ref


def _check_training_forward(model, golden, fast_path: bool, mode: str):
    model.fast_path = fast_path
    out, ref = _train_forward(model, golden, inject_negatives=(mode == 'eval'), mode=mode)
    if mode == 'train':  # sampled, not injected: the draws must follow the original's RNG order
        assert out.neg_image_idx.tolist() == ref['neg_image_idx_for_text']
        assert out.neg_text_idx.tolist() == ref['neg_text_idx_for_image']
    assert out.loss_ita.item() == pytest.approx(ref['loss_ita'], rel=10 ** -GOLDEN_DIGITS)
    assert out.loss_itm.item() == pytest.approx(ref['loss_itm'], rel=10 ** -GOLDEN_DIGITS)
    assert_close(out.itm_logits, t(ref['itm_head_output_vl']), GOLDEN_DIGITS)
    for name in ('image_queue', 'text_queue'):
        assert_close(getattr(model, name), t(ref[name]), GOLDEN_DIGITS)
    assert model.idx_queue.tolist() == ref['idx_queue']
    assert model.ptr_queue.tolist() == ref['ptr_queue']
    state = model.state_dict()
    for key, value in ref.items():
        if key.startswith('momentum_after::'):
            assert_close(state[key.split('::')[1]], t(value), GOLDEN_DIGITS)
    (out.loss_ita + out.loss_itm).backward()
    params = dict(model.named_parameters())
    for name, grad in ref['grads'].items():
        assert_close(params[name].grad, t(grad), GOLDEN_DIGITS, name)
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params.values() if p.grad is not None))
    assert norm.item() == pytest.approx(ref['grad_global_l2_norm'], rel=10 ** -GOLDEN_DIGITS)


@pytest.mark.parametrize('fast_path', [True, False], ids=['fast_path', 'reference_path'])
def test_training_forward_matches_golden(tiny_model, golden, fast_path):
    _check_training_forward(tiny_model, golden, fast_path, mode='eval')


def test_reference_training_forward_with_dropout_matches_golden(tiny_model, golden):
    """Dropout on: the straightforward path consumes the RNG in the original's order, so even the
    sampled negatives and every dropout mask agree with the run recorded from the original."""
    _check_training_forward(tiny_model, golden, fast_path=False, mode='train')


def test_hard_negative_sampling_follows_original_rng_order(tiny_model, golden):
    out, ref = _train_forward(tiny_model, golden, inject_negatives=False)
    assert out.neg_image_idx.tolist() == ref['neg_image_idx_for_text']
    assert out.neg_text_idx.tolist() == ref['neg_text_idx_for_image']


def test_last_layer_for_the_first_token_only_equals_the_full_pass(tiny_model, golden):
    """encode_text / match_logits skip the other tokens' last-layer work by default; the original ran them all."""
    torch.manual_seed(0)
    embeds, _ = tiny_model.encode_image(torch.randn(2, 3, 32, 32))
    ids, mask = tiny_model.tokenize(golden['captions'][:4])
    ids = with_enc_token(ids, tiny_model.enc_token_id)
    encoder = tiny_model.text_encoder
    with torch.no_grad():
        full = encoder(ids, mask)
        assert encoder(ids, mask, cls_only=True).shape == (4, 1, 64)
        assert_close(encoder(ids, mask, cls_only=True), full[:, :1], REORDERED_DIGITS)
        per_text = embeds.repeat_interleave(2, dim=0)
        full = encoder(ids, mask, image_embeds=per_text)
        assert_close(encoder(ids, mask, image_embeds=per_text, cls_only=True), full[:, :1],
                                   REORDERED_DIGITS)
        shared_kv = tiny_model.image_kv(embeds)  # two texts per image attend to one copy of its keys/values
        assert_close(encoder(ids, mask, image_kv=shared_kv, cls_only=True), full[:, :1],
                                   REORDERED_DIGITS)
        assert_close(tiny_model.match_logits(ids, mask, image_embeds=per_text),
                                   tiny_model.match_logits(ids, mask, image_embeds=per_text, cls_only=False),
                     REORDERED_DIGITS)


def test_fused_and_explicit_attention_agree(tiny_model, golden):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    ids, mask = tiny_model.tokenize(golden['captions'][:3])
    with torch.no_grad():
        outputs = []
        for fused in (True, False):
            tiny_model.text_encoder.set_fused_attn(fused)
            for block in tiny_model.visual_encoder.blocks:
                block.attn.fused_attn = fused
            embeds, _ = tiny_model.encode_image(images)
            outputs.append((embeds, tiny_model.encode_text(ids, mask), tiny_model.match_logits(ids, mask, embeds)))
    for fused_out, explicit_out in zip(*outputs):
        assert_close(fused_out, explicit_out, REORDERED_DIGITS)


def test_text_attention_avoids_cudnn_which_plans_every_new_shape(tiny_model, golden, monkeypatch):
    """Trimmed text batches change shape every step: the text encoder keeps to kernels that need no plan."""
    cudnn_enabled = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        cudnn_enabled.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    ids, mask = tiny_model.tokenize(golden['captions'][:3])
    with torch.no_grad():
        embeds, _ = tiny_model.encode_image(torch.randn(3, 3, 32, 32))
        monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
        tiny_model.encode_text(ids, mask)
        tiny_model.match_logits(ids, mask, embeds)
    assert cudnn_enabled == [False] * 6  # 2 layers: self-attention, then self- and cross-attention
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the global choice (and the ViT's) is left as it was


def test_every_trainable_parameter_gets_a_finite_gradient_and_momentum_only_ema(tiny_model, golden):
    tiny_model.train()
    before = {k: v.clone() for k, v in tiny_model.named_parameters()}
    out, _ = _train_forward(tiny_model, golden, inject_negatives=False)
    (out.loss_ita + out.loss_itm).backward()
    online = dict(tiny_model.named_parameters())
    for name, p in online.items():
        if name.split('.')[0].endswith('_m'):
            assert not p.requires_grad and p.grad is None, name
            online_name = name.replace('_m.', '.', 1)
            expected = 0.995 * before[name] + 0.005 * before[online_name]
            assert_close(p.detach(), expected, REORDERED_DIGITS, name)  # lerp rounds otherwise
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_a_batch_without_negatives_leaves_them_out_of_the_matching_loss(tiny_model, golden):
    """Every sample shows one image, so no hard negative exists (the original stops with `invalid multinomial
    distribution`): the negative pairs are flagged and left out, and loss_itm is the positives' loss alone."""
    tiny_model.train()
    images = t(golden['images'])[:1].expand(4, -1, -1, -1)
    ids, mask = tiny_model.tokenize(golden['captions'][:4])
    torch.manual_seed(0)
    out = tiny_model.forward_train(images, ids, mask, 0.4, torch.zeros(4, dtype=torch.long))
    assert out.no_negative.tolist() == [True] * 8
    positives = F.cross_entropy(out.itm_logits[:4], torch.ones(4, dtype=torch.long))
    assert out.loss_itm.item() == pytest.approx(positives.item(), rel=1e-6)
    (out.loss_ita + out.loss_itm).backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)
    # Two images: every row has a negative, nothing is left out.
    out = tiny_model.forward_train(images, ids, mask, 0.4, torch.tensor([0, 0, 1, 1]))
    assert not out.no_negative.any()


def test_position_embedding_resized_like_by_hand(tmp_path, golden_checkpoint):
    state = torch.load(golden_checkpoint, weights_only=True)['model']  # made at 32 px: 2x2 patches
    kwargs = dict(TINY_KWARGS, image_size=64)  # 4x4 patches
    model = blip_retrieval(golden_checkpoint, **kwargs)
    for key in ('visual_encoder.pos_embed', 'visual_encoder_m.pos_embed'):
        pos = state[key]
        grid = pos[:, 1:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(4, 4), mode='bicubic', align_corners=False)
        by_hand = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 16, 64)], dim=1)
        torch.testing.assert_close(model.state_dict()[key], by_hand, atol=0, rtol=0)
    assert len(model.load_report.resized) == 2 and model.load_report.clean


def test_pretraining_checkpoint_differences_are_expected(tmp_path, golden_checkpoint):
    state = torch.load(golden_checkpoint, weights_only=True)['model']
    state['text_decoder.bert.embeddings.word_embeddings.weight'] = torch.zeros(4, 4)  # captioning decoder
    state['queue_ptr'] = state.pop('ptr_queue')  # BLIP_Pretrain's name for it
    del state['idx_queue']
    state['image_queue'] = torch.zeros(16, 32)  # another queue_size
    path = tmp_path / 'pretrain.pth'
    torch.save({'model': state}, path)
    report = blip_retrieval(str(path), **TINY_KWARGS).load_report
    assert report.clean
    assert sorted(report.expected_unexpected) == ['queue_ptr', 'text_decoder.bert.embeddings.word_embeddings.weight']
    assert not report.unexpected
    assert report.expected_missing == ['idx_queue', 'ptr_queue']
    assert report.skipped_queue == ['image_queue: (16, 32) -> (16, 16)']


def test_checkpoint_of_another_architecture_lists_keys(tmp_path, golden_checkpoint):
    state = torch.load(golden_checkpoint, weights_only=True)['model']
    del state['itm_head.weight']
    state['vision_proj.weight'] = torch.zeros(16, 128)
    path = tmp_path / 'other.pth'
    torch.save({'model': state}, path)
    with pytest.raises(CheckpointError) as error:
        blip_retrieval(str(path), **TINY_KWARGS)
    message = str(error.value)
    assert 'missing: itm_head.weight' in message and 'vision_proj.weight: (16, 128) -> (16, 64)' in message


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_unsafe_pickle_refused_and_truncated_file_reported(tmp_path, golden_checkpoint):
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': _Evil()}, evil)
    with pytest.raises(CheckpointError, match='allow_unsafe_checkpoint'):
        read_checkpoint(str(evil))
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(golden_checkpoint, 'rb').read()[:100_000])
    with pytest.raises(CheckpointError, match='truncated'):
        read_checkpoint(str(truncated))
    with pytest.raises(CheckpointError, match='sha256'):
        read_checkpoint(golden_checkpoint, sha256='0' * 64)


ALL_RANK_SCRIPT = r'''
import sys, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import utils
from conftest import TINY_KWARGS
from models import BLIP_Retrieval
info = utils.init_distributed('cpu')
rank = info.rank
torch.manual_seed(0)
model = BLIP_Retrieval(**dict(TINY_KWARGS, negative_all_rank=True)).train()
captured = {{}}
def keep(module, inputs, output):
    output.retain_grad(); captured['embeds'] = output
model.visual_encoder.register_forward_hook(keep)
torch.manual_seed(100 + rank)
images = torch.randn(2, 3, 32, 32)
ids, mask = model.tokenize(['a dog', 'a cat'] if rank == 0 else ['a car', 'a tree'])
idx = torch.tensor([0, 1]) + 2 * rank
# Rank 1 takes every negative image from rank 0; rank 0 from itself.
neg = torch.tensor([0, 1]) if rank == 1 else torch.tensor([1, 0])
model.sample_hard_negatives = lambda w_t2i, w_i2t: (neg, torch.tensor([1, 0]) + 2 * rank)
out = model.forward_train(images, ids, mask, 0.4, idx)
scale = 0.0 if rank == 0 else 1.0   # only rank 1's loss counts
(out.loss_itm * scale).backward()
grad = captured['embeds'].grad
out = open(f'{out}/rank{{rank}}.txt', 'w')  # one file per rank: no interleaved stdout
out.write(f'RANK{{rank}} grad_abs={{grad.abs().sum().item():.6g}} ptr={{int(model.ptr_queue)}} '
          f'idx_queue={{model.idx_queue[0, :4].tolist()}}\n')
# Sampling weights span both ranks' candidates (same-id entries zeroed).
w = torch.zeros(2, 4)
orig = BLIP_Retrieval.sample_hard_negatives
seen = {{}}
def spy(self, w_t2i, w_i2t):
    seen['shape'] = tuple(w_t2i.shape); seen['zero'] = (w_t2i == 0).nonzero().tolist()
    return orig(self, w_t2i, w_i2t)
model.sample_hard_negatives = spy.__get__(model)
model.forward_train(images, ids, mask, 0.4, idx)
out.write(f'RANK{{rank}} weights_shape={{seen["shape"]}} zeros={{seen["zero"]}}\n')
out.close()
utils.destroy_distributed()
'''


def test_negative_all_rank_under_torchrun(tmp_path):
    script = tmp_path / 'all_rank.py'
    script.write_text(ALL_RANK_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, 'tests'), out=tmp_path))
    result = run_torchrun([str(script)], nproc=2, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / 'rank0.txt').read_text() + (tmp_path / 'rank1.txt').read_text()
    lines = {line.split()[0] + line.split()[1].split('=')[0]: line for line in text.splitlines()}
    # Rank 0's own loss is zeroed: its image embeddings get gradient only through rank 1's negatives.
    assert 'grad_abs=0 ' not in lines['RANK0grad_abs'], text
    assert 'grad_abs=0 ' not in lines['RANK1grad_abs']
    for rank in (0, 1):
        line = lines[f'RANK{rank}grad_abs']
        assert 'ptr=4' in line and 'idx_queue=[0, 1, 2, 3]' in line, line  # both ranks' features enqueued
        line = lines[f'RANK{rank}weights_shape']
        assert 'weights_shape=(2, 4)' in line, line  # candidates from both ranks
        assert f'zeros=[[0, {2 * rank}], [1, {2 * rank + 1}]]' in line, line  # only same-id entries zeroed


def test_fast_training_path_equals_reference_path_on_short_captions(golden_checkpoint, golden):
    """Padding trimmed and image keys/values shared: same losses and gradients as the straightforward path."""
    captions = ['a dog', 'two cats on a sofa', 'a red car parked outside', 'people']
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for fast in (True, False):
        model = blip_retrieval(golden_checkpoint, **TINY_KWARGS).eval()
        model.fast_path = fast
        model.sample_hard_negatives = lambda w_t2i, w_i2t: (torch.tensor([1, 2, 3, 0]), torch.tensor([2, 3, 0, 1]))
        ids, mask = model.tokenize(captions)
        out = model.forward_train(images, ids, mask, 0.4, torch.arange(4))
        (out.loss_ita + out.loss_itm).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (fast_out, fast_grads), (ref_out, ref_grads) = results
    # loss_ita is about 11.5, where one fp32 step is 9.5e-7: compared relative to its size.
    assert_close(fast_out.loss_ita, ref_out.loss_ita, REORDERED_DIGITS)
    assert_close(fast_out.loss_itm, ref_out.loss_itm, REORDERED_DIGITS)
    assert_close(fast_out.itm_logits, ref_out.itm_logits, REORDERED_DIGITS)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        if name.endswith('.key.bias'):
            # Softmax ignores a shift shared by all keys, so a key bias has no gradient: both are rounding noise of
            # the key weight's gradient terms, and only that scale bounds them.
            noise = 10.0 ** -REORDERED_DIGITS * float(ref_grads[name.replace('.bias', '.weight')].abs().max())
            assert max(float(fast_grads[name].abs().max()), float(ref_grads[name].abs().max())) <= noise, name
        else:
            assert_close(fast_grads[name], ref_grads[name], GOLDEN_DIGITS, name)  # through every layer's backward


@pytest.mark.parametrize('fused', [True, False])
def test_keys_values_shared_by_groups_of_texts(tiny_model, fused):
    """One image's keys/values serving several consecutive texts equals repeating the image per text."""
    tiny_model.text_encoder.set_fused_attn(fused)
    ids, mask = tiny_model.tokenize(['a dog', 'two cats on a sofa', 'a car', 'people in a park', 'snow', 'a b c'])
    ids[:, 0] = tiny_model.enc_token_id
    with torch.no_grad():
        embeds, _ = tiny_model.encode_image(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
        grouped = tiny_model.match_logits(ids, mask, image_kv=tiny_model.image_kv(embeds))  # 3 texts per image
        repeated = tiny_model.match_logits(ids, mask, image_embeds=embeds.repeat_interleave(3, dim=0))
    assert_close(grouped, repeated, REORDERED_DIGITS)


def test_output_heads_run_in_fp32_under_bf16_autocast(tiny_model, golden):
    """Similarities and matching logits are ranked: their layers stay fp32 when the encoders run in bf16."""
    ids, mask = tiny_model.tokenize(golden['captions'][:2])
    images = torch.tensor(golden['images'][:2])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        image_embeds, image_feat = tiny_model.encode_image(images)
        text_feat = tiny_model.encode_text(ids, mask)
        logits = tiny_model.match_logits(with_enc_token(ids, tiny_model.enc_token_id), mask, image_embeds)
        hidden = tiny_model.text_encoder(ids, mask)
    assert image_feat.dtype == text_feat.dtype == logits.dtype == torch.float32
    with torch.no_grad():
        exact = F.normalize(tiny_model.text_proj(hidden[:, 0, :].float()), dim=-1)
    assert_close(text_feat, exact, REORDERED_DIGITS)  # no bf16 rounding after the encoder


def test_compiled_encoders_match_golden(tiny_model, golden):
    """`compile: true` (torch.compile of both encoders, as train_retrieval does) changes no number (about 1 min)."""
    import evaluation
    tiny_model.visual_encoder.compile()
    tiny_model.text_encoder.compile()
    loader = [(t(golden['images']), None)]
    i2t, t2i = evaluation.evaluate_scores(tiny_model, loader, golden['captions'], {'k_test': golden['k_test']},
                                          torch.device('cpu'))
    assert_close(torch.from_numpy(i2t), t(golden['score_matrix_i2t']), GOLDEN_DIGITS)
    assert_close(torch.from_numpy(t2i), t(golden['score_matrix_t2i']), GOLDEN_DIGITS)
    _check_training_forward(tiny_model, golden, fast_path=True, mode='eval')
