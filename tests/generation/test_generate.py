import warnings

import pytest
import torch

from gptlab import GPTModel, UsageError, load_model, save_model
from gptlab.generation.decoding import prepare_for_decoding
from gptlab.generation.generate import TokenTextDecoder, generate, pad_prompts, stream_generate
from gptlab.tokenizer import decode, encode
from tests.helpers import tiny_config

VOCAB = 1000


def make_model(seed: int = 0, **overrides) -> GPTModel:
    """A tiny model with a 1000-token vocabulary (GPT-2's 50257 would only make the tests slower)."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_config(**{"vocab_size": VOCAB, **overrides})).eval()
    # Larger weights than GPT-2's init make greedy choices far apart (no near-ties between the
    # cached and uncached float paths) and the generated sequences varied instead of repetitive.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model


def book_greedy(model: GPTModel, idx: torch.Tensor, n: int, window: int) -> torch.Tensor:
    """The reference: a full forward over the last `window` tokens and argmax, at every step."""
    out = idx
    with torch.no_grad():
        for _ in range(n):
            logits = model(out[:, -window:])
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return make_model()


def test_greedy_is_argmax_of_a_full_forward_at_every_step(model):
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = book_greedy(model, idx, 20, window=32)
    for use_cache in (True, False):
        out = generate(model, idx, 20, use_cache=use_cache)
        assert torch.equal(out, ref)
    assert len(set(ref[0, 5:].tolist())) > 5  # the test means something: varied tokens


def test_slide_one_is_the_books_crop_every_step_past_the_window(model):
    idx = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    ref = book_greedy(model, idx, 40, window=16)
    assert torch.equal(generate(model, idx, 40, context_size=16, slide=1), ref)
    assert torch.equal(generate(model, idx, 40, context_size=16, slide=1, use_cache=False), ref)


@pytest.mark.parametrize("slide", [None, 3, 8, 16])
def test_cache_equals_no_cache_across_the_context_window(model, slide):
    idx = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    cached = generate(model, idx, 60, context_size=16, slide=slide)
    plain = generate(model, idx, 60, context_size=16, slide=slide, use_cache=False)
    assert cached.shape == (1, 65)
    assert torch.equal(cached, plain)


def test_cache_path_does_not_reprefill_every_step(model, monkeypatch):
    widths = []
    forward = model.forward

    def counting(idx, **kw):
        widths.append(idx.shape[1])
        return forward(idx, **kw)

    monkeypatch.setattr(model, "forward", counting)
    generate(model, torch.tensor([[1, 2, 3, 4, 5]]), 60, context_size=16)  # slide 8
    prefills = [w for w in widths if w > 1]
    # the first prefill, then one re-prefill of 9 tokens each time 8 new tokens filled the window
    assert prefills[0] == 5 and set(prefills[1:]) == {9}
    # inputs reach 64 tokens; the window overflows at lengths 17, 25, ..., 57
    assert len(prefills) == 1 + len(range(17, 65, 8))
    assert len(widths) == 60


def test_long_prompt_is_cropped_with_a_warning(model):
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match="longer than the context"):
        out = generate(model, idx, 10, context_size=16)
    assert torch.equal(out[:, :40], idx)  # the whole prompt is returned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(out[:, 40:], generate(model, idx[:, -16:], 10, context_size=16)[:, 16:])
        assert torch.equal(out, generate(model, idx, 10, context_size=16, use_cache=False))


def test_batched_prompts_of_different_lengths_equal_one_by_one(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 14, 6)]
    n_new = 30  # crosses the 16-token window for every row, at different steps
    ids, mask = pad_prompts(prompts)
    batched = generate(model, ids, n_new, context_size=16, attention_mask=mask)
    rows = generate(model, prompts, n_new, context_size=16)  # a list of prompts: one tensor each, no padding
    assert [len(r) for r in rows] == [len(p) + n_new for p in prompts]
    assert all(torch.equal(r, batched[i, 14 - len(p) :]) for i, (r, p) in enumerate(zip(rows, prompts, strict=True)))
    junk = ids.masked_fill(mask == 0, -7)  # whatever the padding holds is ignored (and output as pad_id)
    assert torch.equal(generate(model, junk, n_new, context_size=16, attention_mask=mask), batched)
    assert torch.equal(generate(model, ids, n_new, context_size=16, attention_mask=mask, use_cache=False), batched)
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), n_new, context_size=16)
        assert torch.equal(batched[i, 14 - len(p) :], alone[0]), i
        assert torch.equal(rows[i], alone[0]), i
        assert torch.equal(mask[i].bool(), torch.arange(14) >= 14 - len(p))


def test_eos_stops_each_row_of_a_batch(model):
    idx = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    free = generate(model, idx, 12)
    eos = int(free[0, 4 + 3])  # row 0 produces it at step 3
    first = [(free[r, 4:] == eos).nonzero()[0].item() if (free[r, 4:] == eos).any() else None for r in range(2)]
    assert first[0] == 3 and (first[1] is None or first[1] > 3)
    out = generate(model, idx, 12, eos_id=eos, pad_id=0)
    last = 4 + (first[1] if first[1] is not None else 11)
    assert out.shape[1] == last + 1  # trimmed to the last step any row needed
    assert torch.equal(out[0, : 4 + 4], free[0, : 4 + 4])  # row 0 keeps its EOS ...
    assert (out[0, 4 + 4 :] == 0).all()  # ... then only padding
    assert torch.equal(out[1], free[1, : last + 1])  # row 1 is unaffected
    # a single row stops right at its EOS; default padding is the EOS id
    solo = generate(model, idx[:1], 12, eos_id=eos)
    assert torch.equal(solo, free[:1, :8])
    both = generate(model, idx, 12, eos_id=eos)
    assert (both[0, 8:] == eos).all()


def test_top_k_never_leaves_the_k_best():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 1000, generator=g).repeat(4000, 1)
    from gptlab.generation.sampling import sample_next

    best = set(torch.topk(logits[0], 5).indices.tolist())
    draws = sample_next(logits, temperature=1.5, top_k=5, generator=g)
    assert set(draws.tolist()) == best  # every draw in the set, and every member drawn
    # k larger than the vocabulary is clamped (keeps everything)
    many = sample_next(logits[:200], temperature=1.0, top_k=10**6, generator=g)
    assert len(set(many.tolist())) > 50


def test_top_p_keeps_the_smallest_set_reaching_p():
    from gptlab.generation.sampling import next_token_probs, sample_next

    logits = torch.log(torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]]))
    probs = next_token_probs(logits, temperature=1.0, top_p=0.75)
    # 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; renormalised over 0.85
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.4, 0.3, 0.15, 0.0]]) / 0.85)
    g = torch.Generator().manual_seed(8)
    draws = sample_next(logits.repeat(6000, 1), temperature=1.0, top_p=0.75, generator=g)
    counts = torch.bincount(draws, minlength=5).float() / 6000
    assert counts[0] == 0 and counts[4] == 0
    torch.testing.assert_close(counts, probs[0], atol=0.02, rtol=0)
    # p = 1 keeps everything; a tiny p keeps only the best
    assert (next_token_probs(logits, 1.0, top_p=1.0) > 0).all()
    assert next_token_probs(logits, 1.0, top_p=1e-6)[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_temperature_sharpens_and_flattens():
    from gptlab.generation.sampling import sample_next

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 50, generator=g).repeat(3000, 1)
    top = int(logits[0].argmax())

    def stats(t):
        draws = sample_next(logits, temperature=t, generator=g)
        return (draws == top).float().mean().item(), len(set(draws.tolist()))

    cold, warm, hot = stats(0.05), stats(1.0), stats(50.0)
    assert cold[0] > 0.97 and cold[1] <= 3  # close to greedy
    assert hot[0] < warm[0] < cold[0]
    assert hot[1] == 50 and hot[0] < 0.05  # nearly uniform over 50 tokens


def test_top_k_one_and_tiny_temperature_are_greedy(model):
    idx = torch.tensor([[10, 20, 30]])
    greedy = generate(model, idx, 15)
    assert torch.equal(generate(model, idx, 15, temperature=1.0, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, idx, 15, temperature=1e-4, seed=0), greedy)


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(model):
    idx = torch.tensor([[10, 20, 30]])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, idx, 20, temperature=1.0, top_p=0.95, seed=42)
    b = generate(model, idx, 20, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(42))
    c = generate(model, idx, 20, temperature=1.0, top_p=0.95, seed=43)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)
    streamed = [ch.token_ids[0] for ch in stream_generate(model, idx, 20, temperature=1.0, top_p=0.95, seed=42)]
    assert streamed == a[0, 3:].tolist()


def test_stream_yields_the_same_ids_and_text():
    model = make_model(vocab_size=50257)
    idx = torch.tensor([encode("Hello there")])
    chunks = list(stream_generate(model, idx, 12))
    ids = [c.token_ids[0] for c in chunks]
    assert ids == generate(model, idx, 12)[0, idx.shape[1] :].tolist()
    assert "".join(c.text[0] for c in chunks) == chunks[-1].text_so_far[0] == decode(ids)
    assert [c.finished[0] for c in chunks] == [False] * 11 + [True]


def test_stream_text_never_splits_a_multibyte_character():
    text = "héllo 😀 日本語 🎉!"
    ids = encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    dec = TokenTextDecoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # the bytes of a split character were held back
    # an unfinished character at the very end is flushed as U+FFFD
    emoji = encode("😀")
    cut = TokenTextDecoder()
    assert "".join(cut.push(i) for i in emoji[:-1]) == ""
    assert cut.flush() == "\ufffd"


def test_one_dimensional_prompt_and_zero_new_tokens(model):
    out = generate(model, torch.tensor([5, 6, 7]), 4)
    assert out.shape == (7,)
    assert torch.equal(generate(model, torch.tensor([[5, 6, 7]]), 0), torch.tensor([[5, 6, 7]]))
    assert torch.equal(generate(model, [5, 6, 7], 4), out[None])


def test_training_mode_is_restored_and_dropout_is_off():
    model = make_model(drop_rate=0.5).train()
    idx = torch.tensor([[1, 2, 3]])
    a = generate(model, idx, 8)
    assert model.training
    assert torch.equal(a, generate(model, idx, 8))


def test_bfloat16_weights_generate():
    model = make_model().to(torch.bfloat16)
    out = generate(model, torch.tensor([[1, 2, 3]]), 10, temperature=0.8, top_k=50, seed=0)
    assert out.shape == (1, 13) and out.dtype == torch.long and int(out.max()) < VOCAB
    assert torch.equal(generate(model, torch.tensor([[1, 2, 3]]), 10), generate(model, torch.tensor([[1, 2, 3]]), 10))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "finite"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(top_k=0), "top_k must be at least 1"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(idx=torch.tensor([[1, VOCAB]])), f"token id {VOCAB}"),
        (dict(idx=torch.tensor([[-1, 2]])), "token id -1"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "prompt is empty"),
        (dict(idx=torch.tensor([[1.0, 2.0]])), "integer token ids"),
        (dict(idx=[[1, 2], []]), "a prompt is empty"),
        (dict(context_size=33), "context_size must be in 1..32"),
        (dict(eos_id=VOCAB), "eos_id"),
        (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
        (dict(slide=0), "slide"),
        (dict(attention_mask=torch.tensor([[1, 0, 1]])), "left padding"),
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), "prompt is empty"),
        (dict(attention_mask=torch.ones(2, 3)), "shape"),
    ],
)
def test_bad_inputs_fail_before_the_loop(model, kwargs, needle):
    calls = []
    args = dict(idx=torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    args.update(kwargs)
    original = model.forward
    model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with pytest.raises(UsageError) as err:
            generate(model, **args)
        assert needle in str(err.value)
        with pytest.raises(UsageError):
            stream_generate(model, **args)  # checked when called, before any iteration
    finally:
        del model.forward
    assert calls == []


def test_prepare_for_decoding_changes_layout_not_results(tmp_path):
    model = make_model(seed=3)
    idx = torch.tensor([[1, 2, 3, 4]])
    before = model(idx)
    greedy = generate(model, idx, 12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_for_decoding(model, kernel="off") is model
    w = model.trf_blocks[0].att.qkv.weight
    assert w.shape == (96, 32) and w.stride() == (1, 96)  # column-major now
    down = model.trf_blocks[0].ff.proj.weight  # narrower output than input: keeps its rows
    assert down.shape == (32, 128) and down.is_contiguous()
    assert model.out_head.weight is model.tok_emb.weight  # still tied
    torch.testing.assert_close(model(idx), before, atol=1e-4, rtol=1e-5)
    assert torch.equal(generate(model, idx, 12), greedy)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    loaded = load_model(save_model(model, tmp_path / "m"))
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
