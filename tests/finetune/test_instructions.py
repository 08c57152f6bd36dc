"""Instruction data: reading and checking records, the book's prompt and collate rules, the masked loss."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from gptlab import (
    GPTModel,
    InstructionDataset,
    format_instruction,
    instruction_collate,
    load_instruction_data,
)
from gptlab.errors import UsageError
from gptlab.evaluate import calc_loss_batch
from gptlab.finetune.batching import example_loaders
from gptlab.tokenizer import EOT_ID, get_tokenizer
from tests.helpers import INSTRUCTIONS, tiny_config, write_instructions


def book_format_input(entry):
    """The book's format_input (chapter 7), written out from its text."""
    instruction_text = ("Below is an instruction that describes a task. Write a response that appropriately "
                        f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def book_collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
    """The book's custom_collate_fn (chapter 7), written out from its text."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy() + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        indices = torch.nonzero(targets == pad_token_id).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


@pytest.mark.parametrize("entry", INSTRUCTIONS[1:3])
def test_prompt_is_the_books_template(entry):
    assert format_instruction(entry) + entry["output"] == book_format_input(entry) + f"\n\n### Response:\n{entry['output']}"
    dataset = InstructionDataset([entry])
    ids, prompt_length = dataset[0]
    tok = get_tokenizer()
    assert tok.decode(ids) == format_instruction(entry) + entry["output"]
    assert ids[:prompt_length] == tok.encode(book_format_input(entry) + "\n\n### Response:\n")


def test_json_array_jsonl_and_chat_records(tmp_path):
    assert load_instruction_data(write_instructions(tmp_path / "a.json")) == INSTRUCTIONS
    assert load_instruction_data(write_instructions(tmp_path / "b.jsonl", jsonl=True)) == INSTRUCTIONS
    chat = [
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]},
        {"messages": [{"role": "system", "content": "Translate into French."}, {"role": "user", "content": "cat"},
                      {"role": "assistant", "content": "chat"}]},
        {"instruction": "Say hi.", "input": None, "output": "Hi."},
        {"instruction": "Say bye.", "output": "Bye."},
    ]
    assert load_instruction_data(write_instructions(tmp_path / "c.jsonl", chat, jsonl=True)) == [
        {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
        {"instruction": "Translate into French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
        {"instruction": "Say bye.", "input": "", "output": "Bye."},
    ]


BAD = [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n', "line 2"),
    ('[{"instruction": "a", "output": "b"},\n\n {"instruction": "c"}]', "record 2 (line 3): missing 'output'"),
    ('{"output": "b"}\n', "record 1 (line 1): missing 'instruction'"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', "'input' must be a string, got a number"),
    ('[{"instruction": ["a"], "output": "b"}]', "'instruction' must be a string, got an array"),
    ('[{"instruction": "a", "output": null}]', "'output' must be a string, got null"),
    ('[]', "holds no examples"),
    ('   \n', "is empty"),
    ('[1, 2]', "expected a JSON object"),
    ('{"text": "great film", "label": "pos"}\n', "--task classify"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n', "one exchange"),
    ('{"messages": [{"role": "robot", "content": "a"}]}\n', "needs a role"),
]


@pytest.mark.parametrize(("text", "needle"), BAD)
def test_bad_records_name_the_record(tmp_path, text, needle):
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as err:
        load_instruction_data(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_a_table_is_not_instruction_data(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngreat,pos\n", encoding="utf-8")
    with pytest.raises(UsageError, match="--task classify"):
        load_instruction_data(path)


def test_collate_follows_the_books_rules():
    batch = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5]]
    for limit in (None, 4):
        ours = instruction_collate(batch, allowed_max_length=limit)
        theirs = book_collate(batch, allowed_max_length=limit)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    inputs, targets = instruction_collate(batch)
    assert inputs.tolist() == [[5, 6, 7, 8, 9], [1, 2, EOT_ID, EOT_ID, EOT_ID], [3, 4, 5, EOT_ID, EOT_ID]]
    assert targets.tolist() == [[6, 7, 8, 9, EOT_ID], [2, EOT_ID, -100, -100, -100], [4, 5, EOT_ID, -100, -100]]
    # (ids, prompt length) items: targets inside the prompt are left out; the first response token is scored
    inputs, masked = instruction_collate([([5, 6, 7, 8, 9], 3), ([1, 2], 1)])
    assert masked.tolist() == [[-100, -100, 8, 9, EOT_ID], [2, EOT_ID, -100, -100, -100]]
    assert torch.equal(instruction_collate([([5, 6, 7, 8, 9], 3)], mask_prompt=False)[1][0], targets[0])


def test_masked_loss_is_the_mean_over_response_tokens(tiny):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=96)).eval()
    dataset = InstructionDataset(INSTRUCTIONS[:3])
    inputs, targets = instruction_collate([dataset[i] for i in range(3)])
    with torch.no_grad():
        log_probs = F.log_softmax(model(inputs), dim=-1)
    terms = []
    for row in range(3):
        ids, prompt_length = dataset[row]
        sequence = ids + [EOT_ID]
        for j in range(prompt_length - 1, len(ids)):  # predicting the response tokens and the closing one
            terms.append(-log_probs[row, j, sequence[j + 1]])
    expected = torch.stack(terms).mean()
    with torch.no_grad():
        assert calc_loss_batch(inputs, targets, model, "cpu").item() == pytest.approx(expected.item(), abs=1e-5)
    n_response = sum(len(ids) - p + 1 for ids, p in dataset.encoded)
    assert len(terms) == n_response == int((targets != -100).sum())


def test_long_examples_are_truncated_with_a_warning_and_counted():
    long_output = {"instruction": "Repeat.", "input": "", "output": " word" * 80}
    long_prompt = {"instruction": "Read this. " * 40, "input": "", "output": "Done."}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = InstructionDataset([INSTRUCTIONS[0], long_output, long_prompt], max_length=64)
        dataset.warn_if_cut("training")
    assert (dataset.truncated, dataset.dropped, len(dataset)) == (1, 1, 2)
    message = str(caught[0].message)
    assert len(caught) == 1 and "2 of the 3 training examples are longer than 64 tokens: 1 are truncated; 1 are " \
        "left out: their prompt alone is longer" in message
    kept = InstructionDataset([long_prompt], max_length=64, train_on_prompt=True)
    assert (kept.truncated, kept.dropped, len(kept)) == (1, 0, 1)
    inputs, targets = instruction_collate([dataset[1]], allowed_max_length=64)
    assert inputs.shape == (1, 64) and (targets != -100).sum() > 0


def test_batches_are_padded_to_their_longest_example():
    records = [{"instruction": "Say" + " it" * k, "input": "", "output": "ok"} for k in range(10)]
    dataset = InstructionDataset(records)
    train_loader, val_loader = example_loaders(dataset, dataset, instruction_collate, 3, seed=0)
    widths = [inputs.shape[1] for inputs, _ in train_loader]
    assert len(train_loader) == 3 and len(val_loader) == 4  # train drops the ragged batch, validation keeps it
    longest = max(len(ids) for ids, _ in dataset.encoded)
    assert max(widths) <= longest and min(widths) < longest
    first_val = next(iter(val_loader))[0]
    assert first_val.shape[1] == max(len(dataset[i][0]) for i in range(3))
    assert json.dumps(dataset.data[0])  # records stay plain data (responses.jsonl writes them)
