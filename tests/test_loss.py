"""GPTModel.loss / gptlab.loss.chunked_cross_entropy: same loss and gradients as the plain logits path."""

import pytest
import torch
import torch.nn.functional as F

from gptlab import GPTModel, UsageError
from gptlab.loss import chunked_cross_entropy
from tests.helpers import tiny_config


def loss_and_grads(model, fn, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("vocab_multiple, ignore", [(1, False), (64, True)])
def test_loss_matches_plain_cross_entropy_and_gradients(vocab_multiple, ignore):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=1000, vocab_multiple=vocab_multiple))
    x = torch.randint(0, 1000, (3, 30))
    y = torch.randint(0, 1000, (3, 30))
    if ignore:
        y[0, :7] = -100
    plain = loss_and_grads(model, lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100))
    lean = loss_and_grads(model, lambda: model.loss(x, y))
    assert lean[0] == pytest.approx(plain[0], rel=1e-6)
    for name, g in plain[1].items():
        torch.testing.assert_close(lean[1][name], g, rtol=1e-4, atol=1e-7)
    with torch.inference_mode():
        assert model.loss(x, y).item() == pytest.approx(plain[0], rel=1e-6)


def test_many_small_chunks_equal_one_chunk():
    torch.manual_seed(1)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    one = chunked_cross_entropy(h, w, t, chunk_rows=1000)
    gh1, gw1 = torch.autograd.grad(one, (h, w))
    many = chunked_cross_entropy(h, w, t, chunk_rows=5)
    gh5, gw5 = torch.autograd.grad(many, (h, w))
    ref = F.cross_entropy(h @ w.t(), t)
    assert one.item() == pytest.approx(ref.item(), rel=1e-6) and many.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gh5, gh1)
    torch.testing.assert_close(gw5, gw1)


def test_bf16_autocast_is_as_accurate_as_the_plain_autocast_path():
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=1000))
    x = torch.randint(0, 1000, (3, 30))
    y = torch.randint(0, 1000, (3, 30))

    def plain():
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    ref = loss_and_grads(model, plain)
    bf16_plain = loss_and_grads(model, plain, autocast=True)
    bf16_lean = loss_and_grads(model, lambda: model.loss(x, y), autocast=True)

    def err(grads):
        return max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref[1].items())

    assert bf16_lean[0] == pytest.approx(ref[0], rel=1e-3)
    assert err(bf16_lean[1]) < 1.5 * err(bf16_plain[1]) + 1e-3


def test_loss_rejects_bad_shapes():
    model = GPTModel(tiny_config())
    idx = torch.zeros(1, 33, dtype=torch.long)
    with pytest.raises(UsageError, match="longer than the model's context"):
        model.loss(idx, idx)
    with pytest.raises(UsageError, match="must both have shape"):
        model.loss(idx[:, :5], idx[:, :4])
