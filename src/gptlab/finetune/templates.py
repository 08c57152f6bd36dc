"""Prompt templates for instruction models: the book's chapter-7 (Alpaca) format, stored with the model.

A fine-tuned run folder holds `prompt_template.json` ({"name": "alpaca"}), so every tool that loads
the model (`gptlab generate --instruction`, `gptlab serve`'s chat endpoint) formats prompts exactly
as the model was trained on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError, did_you_mean
from ..storage.files import write_json

TEMPLATE_FILE = "prompt_template.json"


@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction (and an optional input) becomes the prompt; the response follows it."""

    name: str
    preamble: str
    instruction_header: str
    input_header: str
    response_header: str

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt up to and including the response header: the model continues with the response."""
        text = f"{self.preamble}{self.instruction_header}{instruction}"
        if input:
            text += f"{self.input_header}{input}"
        return text + self.response_header


# The book's chapter-7 template (Alpaca's): the input section only when the input is not empty.
ALPACA = PromptTemplate(
    name="alpaca",
    preamble="Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    instruction_header="\n\n### Instruction:\n",
    input_header="\n\n### Input:\n",
    response_header="\n\n### Response:\n",
)
TEMPLATES = {ALPACA.name: ALPACA}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UsageError(f"unknown prompt template {name!r}{did_you_mean(name, TEMPLATES)}; "
                         f"choose one of: {', '.join(TEMPLATES)}") from None


def format_instruction(entry: dict, template: str | PromptTemplate = "alpaca") -> str:
    """The prompt for one {"instruction", "input"} record, as the book's `format_input` builds it."""
    tpl = get_template(template) if isinstance(template, str) else template
    return tpl.format(entry["instruction"], entry.get("input") or "")


def save_template(folder: str | os.PathLike, template: PromptTemplate) -> None:
    write_json(Path(folder) / TEMPLATE_FILE, {"name": template.name})


def load_template(folder: str | os.PathLike) -> PromptTemplate | None:
    """The template a model folder was fine-tuned with, or None for a model that has none (a base model)."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}; fix it or delete it") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise UsageError(f"{path} must hold {{\"name\": TEMPLATE}}; fix it or delete it")
    return get_template(data["name"])
