"""Decoding steps compiled over static caches (generation/compiled.py): the same tokens as the eager path.

torch.compile runs with its "eager" backend here, which traces the same static-shape step without
inductor's compile time; tests/test_cuda.py runs inductor with CUDA graphs on a GPU.
"""

import torch

from gptlab import GPTModel, generate, stream_generate
from gptlab.generation.compiled import CompiledDecoder
from tests.helpers import tiny_config


def pair(seed=0, max_batch=4):
    torch.manual_seed(seed)
    eager = GPTModel(tiny_config()).eval()
    fast = GPTModel(tiny_config()).eval()
    fast.load_state_dict(eager.state_dict())
    fast.compiled_decoder = CompiledDecoder(fast, max_batch=max_batch, backend="eager")
    return eager, fast


def count_steps(decoder: CompiledDecoder, batch_size: int) -> list[int]:
    decoder.kv_cache(batch_size)  # builds the step for this batch size
    caches, step, ones = decoder.steps[batch_size]
    calls = []

    def counted(*args):
        calls.append(1)
        return step(*args)

    decoder.steps[batch_size] = (caches, counted, ones)
    return calls


def test_greedy_and_seeded_sampling_match_the_eager_path():
    eager, fast = pair()
    calls = count_steps(fast.compiled_decoder, 1)
    prompt = torch.tensor([[5, 17, 300]])
    assert torch.equal(generate(fast, prompt, 40), generate(eager, prompt, 40))  # crosses the 32-token window
    assert len(calls) > 20  # the single-token steps ran compiled; prompts and re-prefills stay eager
    a = generate(fast, prompt, 20, temperature=1.0, top_k=50, seed=3)
    assert torch.equal(a, generate(eager, prompt, 20, temperature=1.0, top_k=50, seed=3))
    again = generate(fast, prompt, 40)  # the static cache is reused by the next call
    assert torch.equal(again, generate(eager, prompt, 40))


def test_padded_batches_and_streaming_match():
    eager, fast = pair(seed=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    ours, theirs = generate(fast, prompts, 25, context_size=16), generate(eager, prompts, 25, context_size=16)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    streamed = [c.token_ids[0] for c in stream_generate(fast, torch.tensor([[7, 8]]), 12)]
    assert streamed == generate(eager, torch.tensor([[7, 8]]), 12)[0, 2:].tolist()


def test_what_stays_eager():
    eager, fast = pair(max_batch=2)
    calls = count_steps(fast.compiled_decoder, 2)
    big = torch.randint(0, 50257, (3, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(fast, big, 6), generate(eager, big, 6))  # batch 3 > max_batch: eager cache
    fast.train()
    with torch.no_grad():
        logits = fast(torch.tensor([[1, 2]]))  # training mode, plain forward: no static cache involved
    assert logits.shape == (1, 2, 50257) and calls == []
