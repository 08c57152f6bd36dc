"""Tokens as the API shows them, and what one step's logits say about them (logprobs, explain).

Every function here takes the served model's tokenizer: ids mean nothing without it (a trained
tokenizer's id 0 is `<|endoftext|>`, GPT-2's is "!"). Byte-level tokens are byte strings: a multi-byte
character (CJK, emoji) can be split over tokens, so a token may not be text on its own. Such a
"partial" token is displayed as its bytes, `<E7 9A>` (uppercase hex, space-separated), and in
OpenAI-style logprobs as `bytes:\\xe7\\x9a`, as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..generation.explain import token_label
from ..generation.sampling import next_token_probs
from ..tokenizer import Tokenizer


def token_bytes(tid: int, tokenizer: Tokenizer) -> bytes | None:
    """The token's bytes, or None for an id the tokenizer does not have (a model whose vocabulary is padded
    past its tokenizer's)."""
    try:
        return tokenizer.decode_single_token_bytes(tid)
    except KeyError:
        return None


def _text_of(data: bytes) -> str | None:
    """The bytes as text, or None when they are not complete UTF-8 on their own (part of a character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _hex(data: bytes) -> str:
    return " ".join(f"{b:02X}" for b in data)


def display(tid: int, tokenizer: Tokenizer) -> str:
    """One-line text for a token: `<E7 9A>` for part of a character, escapes for control characters."""
    if tid == tokenizer.eot_id:
        return tokenizer.eot_token
    data = token_bytes(tid, tokenizer)
    return f"<unknown id {tid}>" if data is None else token_label(data)


def token_info(tid: int, tokenizer: Tokenizer) -> dict:
    """The drawn token as the playground shows it: id, text, display, bytes (hex) and whether it is partial.

    `<|endoftext|>` ends a choice without adding text, so its text and bytes are empty."""
    data = b"" if tid == tokenizer.eot_id else (token_bytes(tid, tokenizer) or b"")
    text = _text_of(data)
    return {"id": tid, "text": "\ufffd" if text is None else text, "display": display(tid, tokenizer),
            "bytes": _hex(data), "partial": text is None}


def logprob_token(tid: int, tokenizer: Tokenizer) -> str:
    """The token as OpenAI's logprobs name it: its text, or `bytes:\\xe7\\x9a` when it is not text alone."""
    data = token_bytes(tid, tokenizer)
    if data is None:
        return f"<unknown id {tid}>"
    text = _text_of(data)
    return text if text is not None else "bytes:" + "".join(f"\\x{b:02x}" for b in data)


@dataclass
class TokenLogprob:
    """One position's log-probabilities (of the model's raw distribution, temperature 1).

    A prompt's first token has none (logprob and top are None): nothing comes before it.
    """

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None  # the most likely tokens and their logprobs, most likely first


def logprobs_at(logits: Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """For logits (N, V) and the token that followed each row, its logprob and the `top` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    best = torch.topk(logp, min(top, logp.shape[-1]), dim=-1) if top else None
    out = []
    for i, tid in enumerate(token_ids):
        pairs = list(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best is not None else []
        out.append(TokenLogprob(tid, chosen[i], pairs))
    return out


def explain(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, candidates: int,
            tokenizer: Tokenizer) -> dict:
    """How sampling turns one position's logits (V,) into the distribution it draws from.

    The `candidates` most likely tokens by p_base (temperature 1), each with p_base, p_temp (the chosen
    temperature alone) and p_final (after top-k and top-p: exactly what sampling draws from, through
    the same `next_token_probs`), plus `others`, the summed mass of every token not listed.
    Temperature 0 is greedy: p_temp and p_final are one-hot on the argmax.
    """
    row = logits[None]
    p_base = next_token_probs(row, 1.0)[0]
    p_temp = next_token_probs(row, temperature)[0]
    p_final = next_token_probs(row, temperature, top_k, top_p)[0]
    ids = torch.topk(p_base, min(candidates, p_base.shape[-1])).indices
    columns = {"p_base": p_base, "p_temp": p_temp, "p_final": p_final}
    listed = {name: p[ids].tolist() for name, p in columns.items()}
    rows = [{"id": tid, "display": display(tid, tokenizer), "p_base": listed["p_base"][i], "p_temp": listed["p_temp"][i],
             "p_final": listed["p_final"][i], "kept": listed["p_final"][i] > 0}
            for i, tid in enumerate(ids.tolist())]
    # Summed outside the candidates rather than 1 - listed, which rounding could make slightly negative.
    others = {name: max(0.0, float(p.sum() - p[ids].sum())) for name, p in columns.items()}
    return {"candidates": rows, "others": others, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "greedy": temperature == 0}


class StopText:
    """Text released as it is generated, held back while it could still become a stop string.

    `push(piece)` returns (text safe to send now, whether a stop string was found); the stop string
    and anything after it are never released, as OpenAI's `stop` does.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def push(self, piece: str) -> tuple[str, bool]:
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        keep = self._held(text)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The end of the text: whatever was held back is released."""
        text, self.pending = self.pending, ""
        return text
