import math

import pytest
import torch

from gptlab import GPTModel, UsageError, get_preset
from gptlab.config import PRESETS
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "name, count",
    [("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_exact_gpt2_parameter_counts(name, count):
    with torch.device("meta"):
        model = GPTModel(PRESETS[name])
    assert model.num_parameters() == count


def test_untied_head_adds_vocab_by_width():
    with torch.device("meta"):
        tied = GPTModel(get_preset("gpt2-small"))
        untied = GPTModel(get_preset("gpt2-small", tie_embeddings=False))
    assert tied.out_head.weight is tied.tok_emb.weight
    assert untied.out_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 50257 * 768


def test_output_shape_and_init():
    torch.manual_seed(0)
    cfg = tiny_config(n_layers=4)
    model = GPTModel(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (3, 7)))
    assert logits.shape == (3, 7, cfg.vocab_size)
    assert model.trf_blocks[0].att.qkv.bias.abs().sum() == 0
    std = model.trf_blocks[0].ff.fc.weight.std().item()
    assert abs(std - 0.02) < 0.002
    proj_std = model.trf_blocks[0].ff.proj.weight.std().item()
    assert abs(proj_std - 0.02 / math.sqrt(2 * 4)) < 0.001
    # a fresh model predicts nearly uniformly: loss close to ln(V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, cfg.vocab_size, (21,)))
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.2


def test_causality():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


def test_too_long_input_is_a_clear_error():
    model = GPTModel(tiny_config(context_length=8))
    with pytest.raises(UsageError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_equals_full_forward(batch):
    torch.manual_seed(1)
    cfg = tiny_config(context_length=40)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch, 30))
    full = model(idx)
    cache = model.make_kv_cache(batch)
    with torch.no_grad():
        steps = [model(idx[:, :10], kv_cache=cache)]
        for t in range(10, 30):
            steps.append(model(idx[:, t : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    # several tokens per step after the prefill, and reuse after reset
    cache.reset()
    with torch.no_grad():
        chunks = [model(idx[:, :4], kv_cache=cache), model(idx[:, 4:9], kv_cache=cache), model(idx[:, 9:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)
    last = model(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_kv_cache_overflow_is_an_error():
    model = GPTModel(tiny_config(context_length=8)).eval()
    cache = model.make_kv_cache(1)
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(UsageError, match="context"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_left_padding_with_mask_matches_unpadded():
    torch.manual_seed(2)
    cfg = tiny_config()
    model = GPTModel(cfg).eval()
    seq = torch.randint(0, cfg.vocab_size, (1, 6))
    ref = model(seq)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-4)
    # same through the cache, continuing one token at a time
    cache = model.make_kv_cache(1)
    nxt = torch.randint(0, cfg.vocab_size, (1, 1))
    ref2 = model(torch.cat([seq, nxt], dim=1))[:, -1]
    model(padded, attention_mask=mask, position_ids=positions, kv_cache=cache)
    step = model(nxt, kv_cache=cache, attention_mask=torch.ones(1, 1, dtype=torch.long),
                 position_ids=torch.tensor([[6]]))
    torch.testing.assert_close(step[:, 0], ref2, atol=1e-5, rtol=1e-4)


def test_padded_vocab_gives_same_logits():
    torch.manual_seed(3)
    cfg = tiny_config(vocab_size=50, vocab_multiple=64)
    model = GPTModel(cfg)
    assert model.tok_emb.weight.shape[0] == 64
    logits = model(torch.randint(0, 50, (2, 5)))
    assert logits.shape[-1] == 50


def test_slot_cache_rows_of_different_lengths_match_each_sequence_alone():
    """Continuous batching's forward: right-padded prompts prefilled together, then steps at per-row positions."""
    torch.manual_seed(4)
    model = GPTModel(tiny_config(context_length=40)).eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19]]
    steps = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # tokens fed after each prompt
    with torch.inference_mode():
        want = [model(torch.tensor([p + s]))[0, len(p) - 1 :] for p, s in zip(prompts, steps, strict=True)]
        cache = model.make_slot_cache(2)
        cache.grow(4)  # growing keeps nothing wrong (and room for a spare slot)
        ids = torch.zeros(3, 7, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        got = [model.forward_slots(ids, cache, 0, [len(p) for p in prompts])]
        for t in range(3):
            got.append(model.forward_slots(torch.tensor([[s[t]] for s in steps]), cache, 0))
    assert cache.lengths == [8, 5, 10, 0]
    for i in range(3):
        torch.testing.assert_close(torch.stack([g[i] for g in got]), want[i], atol=1e-5, rtol=1e-4)


def test_slot_cache_view_and_move_serve_the_single_sequence_path():
    torch.manual_seed(5)
    model = GPTModel(tiny_config(context_length=16)).eval()
    seq = [3, 1, 4, 1, 5, 9]
    with torch.inference_mode():
        want = model(torch.tensor([seq]))[0, -1]
        cache = model.make_slot_cache(3)
        view = cache.view(2)  # a batch-1 KVCache over slot 2's memory: the plain forward path
        model(torch.tensor([seq[:4]]), kv_cache=view)
        cache.lengths[2] = view.length
        cache.move(2, 0)  # a finished sequence's hole filled by a running one
        view = cache.view(0)
        model(torch.tensor([seq[4:5]]), kv_cache=view)
        got = model(torch.tensor([seq[5:]]), kv_cache=view)[0, -1]
    assert view.length == 6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(UsageError, match="past the cache"), torch.inference_mode():
        model.forward_slots(torch.zeros(1, 13, dtype=torch.long), cache, 0)  # slot 0 holds 4: 17 > 16
