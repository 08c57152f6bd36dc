"""Instruction data (the book's chapter 7): records, their token ids, and the padded batches the loop trains on.

A record is {"instruction", "input", "output"} (input optional), or a chat record {"messages": [...]}
mapped onto the same three fields (`entry_from_messages`). Each example is the prompt of the
template (finetune/templates.py) followed by the output and `<|endoftext|>`; the loss covers the
output and that closing token only, unless the prompt is trained on too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..data.text import read_text_file
from ..errors import UsageError
from ..tokenizer import EOT_ID, as_tokenizer
from .records import Record, is_table, read_json_records, require_records
from .templates import PromptTemplate, format_instruction, get_template

IGNORE_INDEX = -100  # targets the loss skips (F.cross_entropy's and GPTModel.loss's default ignore_index)
CHAT_ROLES = ("system", "user", "assistant")


def load_instruction_data(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON array or JSON Lines file as {"instruction", "input", "output"} dicts, checked."""
    text = read_text_file(path)
    if is_table(path, text):
        raise UsageError(f"{path} is a CSV/TSV table: classification data goes with --task classify; "
                         "instruction data is a JSON array or JSON Lines of {instruction, input, output} records")
    records = read_json_records(path, text)
    require_records(path, records)
    return [check_entry(record, path) for record in records]


def check_entry(record: Record, path: str | os.PathLike) -> dict:
    """One record as {"instruction", "input", "output"}; anything else is an error naming the record."""
    where, value = record.where(path), record.value
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a JSON object, got {_json_type(value)}")
    if "messages" in value:
        return entry_from_messages(value["messages"], where)
    if "instruction" not in value and "output" not in value and {"text", "label"} & set(value):
        raise UsageError(f"{where}: a text/label record is classification data (use --task classify); "
                         "instruction records have instruction and output")
    for key in ("instruction", "output"):
        if key not in value:
            raise UsageError(f"{where}: missing {key!r}; every record needs instruction and output "
                             "(input is optional)")
    entry = {key: value.get(key) for key in ("instruction", "input", "output")}
    if entry["input"] is None:  # JSON null or absent: no input section in the prompt
        entry["input"] = ""
    for key, text in entry.items():
        if not isinstance(text, str):
            raise UsageError(f"{where}: {key!r} must be a string, got {_json_type(text)}")
    if not entry["instruction"].strip():
        raise UsageError(f"{where}: the instruction is empty")
    return entry


def entry_from_messages(messages: object, where: str) -> dict:
    """A chat record as one Alpaca example.

    [system?, user, assistant]: the system message (if any) becomes the instruction and the user's
    message the input; without a system message the user's message is the instruction. The
    assistant's message is the output. The template holds one exchange, so longer conversations
    are refused (split them into one record per answer).
    """
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise UsageError(f"{where}: message {i} needs a role of {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UsageError(f"{where}: message {i} ({message['role']}): 'content' must be a string, "
                             f"got {_json_type(message.get('content'))}")
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise UsageError(f"{where}: messages go [system (optional), user, assistant], got [{', '.join(roles)}]; "
                         "the Alpaca template holds one exchange: split a conversation into one record per answer")
    *question, answer = messages
    if len(question) == 2:
        return {"instruction": question[0]["content"], "input": question[1]["content"], "output": answer["content"]}
    return {"instruction": question[0]["content"], "input": "", "output": answer["content"]}


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class InstructionDataset(Dataset):
    """The book's InstructionDataset: every entry tokenized once, as (prompt + output ids, prompt length).

    Prompt and output are tokenized separately, so the prompt's tokens are exactly those the model
    sees when asked the instruction later (`gptlab generate --instruction`). Literal special-token
    text in the data stays plain text. With `max_length`, examples that do not fit are counted
    (`truncated`), and those whose prompt alone fills it are left out (`dropped`): none of their
    response would be scored. With `train_on_prompt` nothing is dropped.
    """

    def __init__(self, data: Sequence[dict], tokenizer=None, template: str | PromptTemplate = "alpaca",
                 max_length: int | None = None, train_on_prompt: bool = False) -> None:
        tok = as_tokenizer(tokenizer)
        template = get_template(template) if isinstance(template, str) else template
        self.data, self.encoded = [], []
        self.truncated = self.dropped = 0
        self.max_length = max_length
        for entry in data:
            prompt = tok.encode_ordinary(format_instruction(entry, template))
            ids = prompt + tok.encode_ordinary(entry["output"])
            if max_length is not None and len(ids) > max_length:
                # the inputs are the ids (the targets the ids shifted, then <|endoftext|>), so this is cut
                if len(prompt) > max_length and not train_on_prompt:
                    self.dropped += 1
                    continue
                self.truncated += 1
            self.data.append(entry)
            self.encoded.append((ids, len(prompt)))

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.encoded[index]

    def __len__(self) -> int:
        return len(self.encoded)

    def warn_if_cut(self, what: str) -> None:
        """One warning that counts the examples cut to max_length and those left out."""
        if not (self.truncated or self.dropped):
            return
        parts = [f"{n} {how}" for n, how in ((self.truncated, "are truncated"), (self.dropped, "are left out: their "
                 "prompt alone is longer, so no response token would be scored")) if n]
        total = len(self.encoded) + self.dropped
        warnings.warn(f"{self.truncated + self.dropped} of the {total} {what} examples are longer than "
                      f"{self.max_length} tokens: {'; '.join(parts)}; raise --max-length (up to the model's "
                      "context) to keep them", stacklevel=2)


def instruction_collate(batch: Sequence, pad_token_id: int = EOT_ID, ignore_index: int = IGNORE_INDEX,
                        allowed_max_length: int | None = None, mask_prompt: bool = True,
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's custom_collate_fn: (inputs, targets) padded to the longest example of the batch.

    Each example gets `pad_token_id` (<|endoftext|>) appended; inputs are the ids, targets the ids
    shifted by one, so the appended token is the last target: the model learns to stop. Later
    padding is `pad_token_id` in the inputs and `ignore_index` in the targets. With `mask_prompt`,
    the targets inside the prompt are `ignore_index` too, so only the response and its end token
    are scored. Items are (ids, prompt_length) pairs, or plain id lists as in the book (nothing
    masked). `allowed_max_length` cuts every row to that many tokens.
    """
    items = [(list(item), 0) if not isinstance(item, tuple) else (list(item[0]), item[1]) for item in batch]
    width = max(len(ids) for ids, _ in items) + 1  # the longest example and its end token
    inputs = torch.full((len(items), width - 1), pad_token_id, dtype=torch.long)
    targets = torch.full((len(items), width - 1), ignore_index, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(items):
        n = len(ids)
        if n:
            inputs[row, :n] = torch.tensor(ids, dtype=torch.long)
            targets[row, : n - 1] = inputs[row, 1:n]
            targets[row, n - 1] = pad_token_id  # the end of the response: scored
        if mask_prompt:
            targets[row, : max(prompt_length - 1, 0)] = ignore_index  # target j predicts token j + 1
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs, targets
