import math

import pytest
import torch
from torch import nn

from gptlab import GPTModel, calc_loss_batch, calc_loss_loader, create_dataloader, perplexity, score_tokens
from gptlab.errors import UsageError
from gptlab.evaluate import sliding_windows
from tests.helpers import tiny_config


def test_uniform_model_loss_is_ln_vocab():
    model = GPTModel(tiny_config()).eval()
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied head: every logit is 0, a uniform prediction
    loader = create_dataloader(torch.arange(0, 50_000, 37), batch_size=2, max_length=16, stride=16, seed=0)
    loss = calc_loss_loader(loader, model, "cpu")
    assert loss == pytest.approx(math.log(50257), abs=1e-5)
    assert perplexity(loss) == pytest.approx(50257, rel=1e-4)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, idx):
        return self.logits.expand(idx.shape[0], -1, -1)


def test_perplexity_of_hand_made_logits():
    # position 1: target 3 has probability 4/8; position 2: target 0 has probability 1/8
    logits = torch.log(torch.tensor([[[1.0, 1, 2, 4], [1.0, 1, 2, 4]]]))
    loss = calc_loss_batch(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 0]]), FixedLogits(logits), "cpu")
    assert loss.item() == pytest.approx((math.log(2) + math.log(8)) / 2)
    assert perplexity(loss) == pytest.approx(4.0)
    assert perplexity(1e6) == float("inf")


def test_loader_average_and_empty_loader():
    model = GPTModel(tiny_config(vocab_size=64)).eval()
    ids = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(0))
    loader = create_dataloader(ids, batch_size=2, max_length=16, stride=16, shuffle=False)
    per_batch = [calc_loss_batch(x, y, model, "cpu").item() for x, y in loader]
    assert calc_loss_loader(loader, model, "cpu") == pytest.approx(sum(per_batch) / len(per_batch))
    assert calc_loss_loader(loader, model, "cpu", num_batches=3) == pytest.approx(sum(per_batch[:3]) / 3)
    empty = create_dataloader(ids[:10], batch_size=2, max_length=16, stride=16)
    assert len(empty) == 0 and math.isnan(calc_loss_loader(empty, model, "cpu"))


def hf_to_gptlab(hf_state: dict, n_layers: int) -> dict:
    """Test-only weight mapping: HF's Conv1D stores (in, out), nn.Linear wants (out, in)."""
    out = {
        "tok_emb.weight": hf_state["transformer.wte.weight"],
        "pos_emb.weight": hf_state["transformer.wpe.weight"],
        "final_norm.weight": hf_state["transformer.ln_f.weight"],
        "final_norm.bias": hf_state["transformer.ln_f.bias"],
    }
    names = {"attn.c_attn": "att.qkv", "attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.fc", "mlp.c_proj": "ff.proj",
             "ln_1": "norm1", "ln_2": "norm2"}
    for i in range(n_layers):
        for hf_name, ours in names.items():
            weight = hf_state[f"transformer.h.{i}.{hf_name}.weight"]
            out[f"trf_blocks.{i}.{ours}.weight"] = weight if hf_name.startswith("ln") else weight.t()
            out[f"trf_blocks.{i}.{ours}.bias"] = hf_state[f"transformer.h.{i}.{hf_name}.bias"]
    return out


@pytest.fixture(scope="module")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPTModel(tiny_config(context_length=64)).eval()
    ours.load_state_dict(hf_to_gptlab(hf.state_dict(), 2), strict=False)
    assert torch.equal(ours.out_head.weight, hf.lm_head.weight)
    return hf, ours


def test_eval_loss_equals_hugging_face(hf_pair):
    hf, ours = hf_pair
    ids = torch.randint(0, 50257, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss.item()
    result = score_tokens(ours, ids[0])
    assert result.tokens == 39
    assert result.loss == pytest.approx(expected, abs=1e-5)
    assert calc_loss_batch(ids[:, :-1], ids[:, 1:], ours, "cpu").item() == pytest.approx(expected, abs=1e-5)


def test_sliding_windows_score_every_token_once():
    for n, ctx, stride in [(2, 8, 4), (9, 8, 4), (100, 8, 3), (100, 8, 8), (57, 16, 1), (30, 64, 32)]:
        seen = []
        length = min(ctx, n - 1)
        for start, n_new in sliding_windows(n, ctx, stride):
            targets = list(range(start + 1, start + length + 1))
            assert start >= 0 and targets[-1] <= n - 1
            seen.extend(targets[length - n_new :])
            if start > 0:  # later windows: every new token has at least ctx - stride tokens of context
                assert length - n_new >= length - min(stride, length)
        assert seen == list(range(1, n)), (n, ctx, stride)
    with pytest.raises(UsageError, match="at least 2 tokens"):
        sliding_windows(1, 8, 4)


def test_long_text_uses_as_much_context_as_the_stride_allows():
    model = GPTModel(tiny_config(vocab_size=64, context_length=8)).eval()
    ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(2))
    # stride 1: token t is predicted from exactly the previous min(t, 8) tokens
    with torch.no_grad():
        nll = [
            torch.nn.functional.cross_entropy(model(ids[max(0, t - 8) : t][None])[0, -1], ids[t]).item()
            for t in range(1, 30)
        ]
    result = score_tokens(model, ids, context_length=8, stride=1, batch_size=5)
    assert result.tokens == 29
    assert result.loss == pytest.approx(sum(nll) / 29, abs=1e-5)
    with pytest.raises(UsageError, match="above the model's maximum of 8"):
        score_tokens(model, ids, context_length=9)


def test_bits_per_byte_is_the_hand_computation():
    """Summed cross-entropy in bits / UTF-8 bytes of the scored tokens; <|endoftext|> counts 0 bytes."""
    from gptlab.tokenizer import get_tokenizer

    tok = get_tokenizer()
    text = "Der Bär schläft.<|endoftext|>天气很好 😀 and the end"
    ids = torch.tensor(tok.encode(text))
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64)).eval()
    result = score_tokens(model, ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None, :-1]).double(), dim=-1)[0]
    nats = -logp[torch.arange(len(ids) - 1), ids[1:]].sum().item()
    scored_bytes = sum(len(tok.decode_single_token_bytes(i)) for i in ids[1:].tolist() if i != tok.eot_id)
    assert scored_bytes == len(text.encode()) - len(tok.decode_single_token_bytes(int(ids[0]))) - len("<|endoftext|>")
    assert result.bytes == scored_bytes and result.tokens == len(ids) - 1
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / scored_bytes, rel=1e-6)
    # with sliding windows every token is still scored once: the same bytes
    assert score_tokens(model, ids, context_length=8, stride=3).bytes == scored_bytes


def test_training_records_validation_bits_per_byte(tmp_path):
    """val_bpb = val_loss / ln 2 / (bytes per token of the whole validation set)."""
    import json

    from gptlab import train
    from gptlab.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = torch.tensor(tok.encode("Tea or coffee? Tee oder Kaffee? 茶还是咖啡？ " * 40))
    train_loader = create_dataloader(ids[:300], batch_size=2, max_length=16, stride=16, seed=0)
    val_loader = create_dataloader(ids[300:], batch_size=2, max_length=16, stride=16, shuffle=False)
    torch.manual_seed(0)
    result = train(GPTModel(tiny_config()), train_loader, val_loader, max_steps=2, eval_every=1, quiet=True, warmup_steps=0,
                   out_dir=tmp_path)
    per_token = sum(len(tok.decode_single_token_bytes(i)) for i in ids[300:].tolist()) / len(ids[300:])
    for record in result.metrics:
        assert record["val_bpb"] == pytest.approx(record["val_loss"] / math.log(2) / per_token, rel=1e-9)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["val_bpb"] for line in lines] == [m["val_bpb"] for m in result.metrics]
    # a model whose vocabulary is not its tokenizer's gets no bits per byte (its ids' bytes are unknown)
    small = train(GPTModel(tiny_config(vocab_size=64)), create_dataloader(ids[:300] % 64, batch_size=2, max_length=16,
                  stride=16, seed=0), create_dataloader(ids[300:] % 64, batch_size=2, max_length=16, stride=16),
                  max_steps=1, quiet=True, warmup_steps=0)
    assert "val_bpb" not in small.metrics[0]
