"""Chat messages -> prompts: the base transcript and an instruction run's stored template."""

from __future__ import annotations

import pytest
import torch

from gptlab.finetune.templates import ALPACA, format_instruction, save_template
from gptlab.model import GPTModel
from gptlab.pretrained.native import save_model
from gptlab.serve.chat import ChatFormat, TemplateChat, chat_format
from gptlab.serve.protocol import ApiError
from gptlab.serve.server import load_served, model_name
from tests.helpers import tiny_config


def test_base_model_transcript_ends_with_the_assistants_turn():
    text, stops = ChatFormat().render([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello."},
                                       {"role": "user", "content": [{"type": "text", "text": "Again"}]}])
    assert text == "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: Again\nassistant:"
    assert stops == ["\nuser:"]


def test_alpaca_template_is_the_books_format():
    chat = TemplateChat(ALPACA)
    text, stops = chat.render([{"role": "user", "content": "Name a colour."}])
    assert text == format_instruction({"instruction": "Name a colour.", "input": ""})
    assert "\n### Instruction:" in stops
    two_turns, _ = chat.render([{"role": "system", "content": "You answer in one word."},
                                {"role": "user", "content": "A colour?"}, {"role": "assistant", "content": "Red"},
                                {"role": "user", "content": "Another?"}])
    assert two_turns == ("You answer in one word.\n\n### Instruction:\nA colour?\n\n### Response:\nRed"
                         "\n\n### Instruction:\nAnother?\n\n### Response:\n")


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "user"}], "messages[0].content"),
    (["hi"], "messages[0]"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
])
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(ApiError) as caught:
        ChatFormat().render(messages)
    assert caught.value.param == param and caught.value.status == 400


def test_an_instruction_run_folder_is_served_with_its_template(tmp_path):
    torch.manual_seed(0)
    folder = save_model(GPTModel(tiny_config()), tmp_path / "instruct-run")
    save_template(folder, ALPACA)
    served = load_served(str(folder), None, "cpu", torch.float32, "off", {})
    assert served.name == "instruct-run" == model_name(str(folder))
    assert isinstance(served.chat, TemplateChat) and served.chat.name == "alpaca"
    assert served.limits.context_length == 32
    assert type(chat_format(None)) is ChatFormat
