import json
import warnings

import pytest
import torch

from gptlab import GPTModel, UsageError, load_model, save_model
from gptlab.generation.explain import explain_sampling, format_table, percent, plot_sampling, token_label
from gptlab.generation.sampling import apply_top_k, next_token_probs
from gptlab.tokenizer import decode, encode, get_tokenizer
from tests.helpers import assert_clean_error, run_cli, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def texts(ids):
    return [f"t{i}" for i in ids]


def test_explain_sampling_numbers():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    table = explain_sampling(logits, texts, prompt="x", temperatures=[0.5, 1.0, 4.0], top_k=2, candidates=4)
    assert table.candidate_ids == [0, 1, 2, 3]
    assert table.candidate_texts == ["t0", "t1", "t2", "t3"]
    assert [p.label for p in table.panels] == ["T=0.5", "T=1", "T=4", "T=0.5, top-k=2", "T=1, top-k=2", "T=4, top-k=2"]
    for panel in table.panels[:3]:
        full = torch.softmax(logits / panel.temperature, dim=-1)
        assert panel.probs == pytest.approx(full[:4].tolist(), abs=1e-6)
        assert panel.other == pytest.approx(float(full[4:].sum()), abs=1e-6)
    # top-k=2 at T=1: only the two best remain, renormalised
    e = torch.exp(torch.tensor([2.0, 1.0]))
    assert table.panels[4].probs == pytest.approx((e / e.sum()).tolist() + [0.0, 0.0], abs=1e-6)
    assert table.panels[4].other == pytest.approx(0.0, abs=1e-6)
    # a lower temperature puts more mass on the best candidate
    assert table.panels[0].probs[0] > table.panels[1].probs[0] > table.panels[2].probs[0]


def test_explain_sampling_counts_draws():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    table = explain_sampling(logits, texts, temperatures=[1.0], top_p=0.6, candidates=4, samples=4000, generator=g)
    plain, nucleus = table.panels
    assert sum(plain.counts) == 4000
    for count, prob in zip(plain.counts, plain.probs, strict=True):
        assert abs(count / 4000 - prob) < 0.03
    # top-p 0.6: 0.644 for the best token alone already reaches it
    assert nucleus.probs == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert nucleus.counts == [4000, 0, 0, 0]
    text = format_table(table)
    assert "T=1, top-p=0.6" in text and "(4000)" in text and "times drawn in 4000 samples" in text


def test_next_token_probs_settings():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert next_token_probs(logits, 0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    k2 = next_token_probs(logits, 1.0, top_k=2)
    assert (k2[0, [0, 3]] == 0).all() and k2.sum().item() == pytest.approx(1.0)
    assert torch.equal(apply_top_k(logits, 10), logits)
    with pytest.raises(UsageError, match="top_k"):
        next_token_probs(logits, 1.0, top_k=0)
    with pytest.raises(UsageError, match="one position"):
        explain_sampling(logits, texts)


def test_plot_is_a_valid_png(tmp_path):
    logits = torch.linspace(3, -3, 50)
    table = explain_sampling(logits, texts, prompt="hello", temperatures=[0.1, 1.0, 5.0], top_k=5, top_p=0.9,
                             samples=100, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "fig.png"
    plot_sampling(table, out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no temporary file left behind


def test_sampling_plot_cli(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    with torch.no_grad():
        model.out_head.weight.mul_(50.0)  # a peaked distribution, not a near-uniform one
    folder = save_model(model, tmp_path / "m")
    out = tmp_path / "explain.png"
    proc = run_cli("sampling-plot", "--model", str(folder), "--prompt", "The cat", "--temperatures", "0.5,1,2",
                   "--top-k", "3", "--candidates", "5", "--samples", "200", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    table = json.loads(proc.stdout)
    loaded = load_model(folder).eval()
    with torch.no_grad():
        logits = loaded(torch.tensor([encode("The cat")]))[0, -1]
    best = torch.topk(logits, 5).indices.tolist()
    assert table["candidate_ids"] == best
    assert table["candidate_texts"] == [decode([i]) for i in best]
    for panel in table["panels"]:
        probs = next_token_probs(logits[None], panel["temperature"], panel["top_k"])[0, best]
        assert panel["probs"] == pytest.approx(probs.tolist(), abs=1e-5)
        assert sum(panel["counts"]) <= 200
    assert len(table["panels"]) == 6
    human = run_cli("sampling-plot", "--model", str(folder), "--prompt", "The cat", "--out", str(out))
    assert human.returncode == 0, human.stderr
    assert "T=0.1" in human.stdout and repr(decode([best[0]]))[1:-1] in human.stdout


def test_sampling_plot_bad_inputs(tmp_path):
    out = str(tmp_path / "x.png")
    assert_clean_error(run_cli("sampling-plot", "--model", "gpt-nano", "--prompt", "a", "--temperatures", "1,-2",
                               "--out", out), 2, "--temperatures", ">= 0")
    assert_clean_error(run_cli("sampling-plot", "--model", "gpt-nano", "--prompt", "a", "--out", "x.jpg"), 2, ".png")


def test_token_labels_show_partial_characters_as_bytes():
    tok = get_tokenizer()
    pieces = [tok.decode_single_token_bytes(i) for i in encode("鼠")]  # one character, three byte tokens
    assert len(pieces) > 1
    assert [token_label(p) for p in pieces] == ["<" + " ".join(f"{b:02X}" for b in p) + ">" for p in pieces]
    assert token_label(b" the") == " the" and token_label(b"\n") == "\\n"
    assert percent(0.00042) == "0.042%" and percent(0.9997) == "99.9%" and percent(1.0) == "100%"


def _chinese_table():
    logits = torch.linspace(4, -4, 40)
    labels = ["今天", "<E7 9A>", "天气", " the", "\\n", "好", "<E4>", "世界"]
    return explain_sampling(logits, lambda ids: [labels[i % len(labels)] for i in ids], prompt="今天天气",
                            temperatures=[1.0, 50.0], candidates=8, candidate_labels_of=lambda ids: labels)


def test_plot_draws_others_and_cjk_without_glyph_warnings(tmp_path):
    table = _chinese_table()
    assert table.panels[1].other > 0.7  # at T=50 most of the mass is outside the 8 candidates
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_sampling(table, tmp_path / "zh.png")
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "zh.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_escapes_characters_no_font_draws(tmp_path, monkeypatch):
    """Where the system has no font for a script, labels are escaped instead of drawn as empty boxes."""
    from matplotlib import font_manager

    from gptlab.generation import explain

    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: [])
    monkeypatch.setattr(font_manager.fontManager, "ttflist",
                        [f for f in font_manager.fontManager.ttflist if "DejaVu" in f.name])
    families, missing = explain._font_families(["今天 the"])
    assert missing == {"今", "天"} and explain._escape("今天 the", missing) == "\\u4eca\\u5929 the"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_sampling(_chinese_table(), tmp_path / "escaped.png")
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
