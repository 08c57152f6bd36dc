"""Chat messages -> one prompt, in the format the model knows.

An instruction-tuned run folder holds prompt_template.json (gptlab.finetune.templates): its messages
are written in that template (the book's chapter-7 Alpaca format). A base model has no template and
gets a plain transcript, one `role: content` line per message, ending in `assistant:` for the model
to continue:

    system: You are terse.
    user: Hello!
    assistant: Hi.
    user: How are you?
    assistant:

Generation stops at <|endoftext|> and where the model starts the next turn (`\\nuser:`), so a base
model's answer ends where it would begin to speak for the user.

The prompt is encoded with the model's tokenizer as `gptlab generate` encodes it: a transcript as a
`--prompt` (`<|endoftext|>` written in it is the special token), a template's prompt as an
`--instruction`, whose special-token text stays text, as in the fine-tuning that taught the template.
"""

from __future__ import annotations

from ..finetune.templates import PromptTemplate
from ..tokenizer import Tokenizer
from .protocol import ApiError

ROLES = ("system", "developer", "user", "assistant")


def message_text(message, i: int) -> tuple[str, str]:
    """(role, content) of message i; content may be a string or OpenAI's list of text parts."""
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ApiError(f"{param} must be an object with role and content", param)
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ApiError(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(f"{param}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                               "supported", f"{param}.content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(f"{param}.content must be a string, got {type(content).__name__}", f"{param}.content")
    return ("system" if role == "developer" else role), content


def _checked(messages) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    pairs = [message_text(m, i) for i, m in enumerate(messages)]
    if pairs[-1][0] == "assistant":
        raise ApiError("the last message must be the user's (or the system's), not the assistant's", "messages")
    return pairs


class ChatFormat:
    """How one model's conversations become prompts (`render`) and where its answers end (`stop`)."""

    name = "transcript"
    stop = ["\nuser:"]

    def render(self, messages) -> tuple[str, list[str]]:
        """(prompt text, stop strings) for a list of OpenAI chat messages."""
        pairs = _checked(messages)
        return "".join(f"{role}: {content}\n" for role, content in pairs) + "assistant:", list(self.stop)

    def encode(self, text: str, tokenizer: Tokenizer) -> list[int]:
        """The rendered prompt's token ids."""
        return tokenizer.encode(text)


class TemplateChat(ChatFormat):
    """An instruction template: system messages replace its preamble, each user message is an instruction
    and each assistant message the response that followed it."""

    def __init__(self, template: PromptTemplate) -> None:
        self.template = template
        self.name = template.name
        headers = (template.instruction_header, template.input_header, template.response_header)
        self.stop = ["\n" + h.strip() for h in headers if h.strip()]

    def render(self, messages) -> tuple[str, list[str]]:
        pairs = _checked(messages)
        t = self.template
        system = "\n\n".join(content for role, content in pairs if role == "system")
        text = system or t.preamble
        for role, content in pairs:
            if role == "user":
                text += t.instruction_header + content + t.response_header
            elif role == "assistant":
                text += content
        if pairs[-1][0] != "user":
            raise ApiError("an instruction template needs a user message last (the instruction to answer)", "messages")
        return text, list(self.stop)

    def encode(self, text: str, tokenizer: Tokenizer) -> list[int]:
        return tokenizer.encode_ordinary(text)


def chat_format(template: PromptTemplate | None) -> ChatFormat:
    """The model's stored template when it has one, else the plain transcript."""
    return TemplateChat(template) if template is not None else ChatFormat()
