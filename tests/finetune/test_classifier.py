"""Classification: the head on the last real token, the data files, the split, and a toy task learnt."""

import json

import pytest
import torch

from gptlab import (
    GPTClassifier,
    GPTModel,
    build_classifier,
    calc_accuracy_loader,
    classification_collate,
    classify_texts,
    finetune,
    load_classification_data,
    load_classifier,
    load_pretrained,
    save_model,
)
from gptlab.errors import UsageError
from gptlab.finetune.classifier import PAD_ID, set_trainable
from gptlab.finetune.classify_data import class_names, stratified_split
from tests.helpers import TINY_FINETUNE_MODEL, labelled_rows, tiny_config, write_labelled_csv


def tiny_classifier(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return build_classifier(GPTModel(tiny_config()).eval(), num_classes)


def test_padding_after_a_text_never_changes_its_logits():
    model = tiny_classifier().eval()
    texts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([t])) for t in texts])
        inputs, _ = classification_collate([(t, 0) for t in texts])
        assert inputs[1].tolist() == [11, 12] + [PAD_ID] * 4
        torch.testing.assert_close(model(inputs), alone, atol=1e-6, rtol=0)
        explicit = model(inputs.clamp(min=0), attention_mask=(inputs != PAD_ID).long())
        torch.testing.assert_close(explicit, alone, atol=1e-6, rtol=0)
    with pytest.raises(UsageError, match="right-padded"):
        model(torch.tensor([[PAD_ID, 5]]))


def test_the_classifier_keeps_the_backbone_and_replaces_the_head():
    torch.manual_seed(0)
    base = GPTModel(tiny_config()).eval()
    model = build_classifier(base, 2, ["ham", "spam"])
    assert isinstance(model, GPTClassifier) and model.out_head.weight.shape == (2, 32) and model.labels == ["ham", "spam"]
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(ids), base.hidden_states(ids))
    set_trainable(model, "last-block")
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"trf_blocks.1", "final_norm", "out_head"}  # the book's choice
    set_trainable(model, "head")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["out_head.weight", "out_head.bias"]


def test_csv_tsv_and_jsonl(tmp_path):
    rows = labelled_rows(6)
    csv_data = load_classification_data(write_labelled_csv(tmp_path / "a.csv", 6))
    tsv_data = load_classification_data(write_labelled_csv(tmp_path / "a.tsv", 6, delimiter="\t"))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"review": t, "y": y}) for t, y in rows), encoding="utf-8")
    jsonl_data = load_classification_data(tmp_path / "a.jsonl", "review", "y")
    for data in (csv_data, tsv_data, jsonl_data):
        assert data.texts == [t for t, _ in rows] and data.labels == [y for _, y in rows]
    assert class_names(["10", "2", "1"]) == ["1", "2", "10"] and class_names(["spam", "ham"]) == ["ham", "spam"]
    labels = ["a"] * 20 + ["b"] * 5 + ["c"]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(26))
    assert [labels[i] for i in val].count("a") == 4 and [labels[i] for i in val].count("b") == 1
    assert "c" in [labels[i] for i in train]  # a class of one example stays in training


@pytest.mark.parametrize(("content", "columns", "needle"), [
    ("review,y\ngreat,pos\n", (), "has no column 'text' (its columns: review, y); name the right one with --text-column"),
    ("text,y\ngreat,pos\n", (), "no column 'label'"),
    ("text,label\ngreat,pos\nfine,pos\n", (), None),  # single class: refused when fine-tuning (below)
    ("text,label\ngreat,pos\n,neg\n", (), "record 2 (line 3): the text is empty"),
    ("text,label\ngreat,pos,extra\n", (), "has 3 fields but the header has 2"),
    ('{"instruction": "a", "output": "b"}\n', (), "instruction data"),
    ('{"text": "a", "label": 1.5}\n', (), "must be a string or a whole number"),
])
def test_bad_classification_files(tmp_path, content, columns, needle):
    path = tmp_path / ("data.jsonl" if content.startswith("{") else "data.csv")
    path.write_text(content, encoding="utf-8")
    if needle is None:
        assert load_classification_data(path).labels == ["pos", "pos"]
        return
    with pytest.raises(UsageError) as err:
        load_classification_data(path, *columns)
    assert needle in str(err.value)


def test_class_problems_are_refused_before_training(tmp_path):
    save_model(GPTModel(tiny_config()), tmp_path / "base")
    (tmp_path / "one.csv").write_text("text,label\ngreat,pos\nfine,pos\nnice,pos\n", encoding="utf-8")
    with pytest.raises(UsageError, match="single class"):
        finetune(tmp_path / "base", tmp_path / "one.csv", tmp_path / "r1", task="classify")
    write_labelled_csv(tmp_path / "train.csv", 20)
    (tmp_path / "val.csv").write_text("text,label\ngreat,pos\nso so,meh\n", encoding="utf-8")
    with pytest.raises(UsageError, match="'meh' that the training data lacks"):
        finetune(tmp_path / "base", tmp_path / "train.csv", tmp_path / "r2", task="classify",
                 val_data=str(tmp_path / "val.csv"))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_a_separable_toy_csv_is_learnt(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_FINETUNE_MODEL), encoding="utf-8")
    write_labelled_csv(tmp_path / "train.csv", 240, seed=0)
    write_labelled_csv(tmp_path / "test.csv", 100, seed=1)
    result = finetune(tmp_path / "tiny.json", tmp_path / "train.csv", tmp_path / "run", task="classify",
                      val_data=str(tmp_path / "test.csv"), trainable="all", epochs=4, lr=3e-3, eval_every=30,
                      quiet=True, log=lambda *a: None)
    final = result.metrics[-1]
    assert set(final) >= {"val_loss", "val_accuracy", "train_accuracy"}
    model = load_classifier(tmp_path / "run")
    assert model.labels == ["neg", "pos"] and model.max_length == TINY_FINETUNE_MODEL["context_length"]
    test = load_classification_data(tmp_path / "test.csv")
    probs = classify_texts(model, test.texts)
    accuracy = sum(model.labels[int(i)] == y for i, y in zip(probs.argmax(1), test.labels, strict=True)) / 100
    assert accuracy >= 0.9, accuracy
    assert torch.allclose(probs.sum(1), torch.ones(100))
    batches = [classification_collate([(list(map(int, x)), 0)]) for x in [[1, 2, 3]]]
    assert calc_accuracy_loader(batches, model, "cpu") in (0.0, 1.0)
    with pytest.raises(UsageError, match="holds a text classifier, not a language model"):
        load_pretrained(tmp_path / "run")
    with pytest.raises(UsageError, match="holds a text classifier"):
        load_pretrained(tmp_path / "run" / "model.safetensors")
