"""Text generation: greedy, temperature, top-k, top-p and end-of-text stop, with a KV cache.

`generate` returns prompt + new ids; `stream_generate` yields the new ids (and their text) as they
are produced. Both run the same loop (`_decode`), so they produce the same tokens.

The context window (`context_size` tokens, the model's `context_length` by default): GPT-2 has
learned absolute positions, so once a sequence is longer than the window, every kept token moves to
a new position and its cached keys/values are stale; a rolling cache would silently differ from
running the model on the cropped text. Instead, when the window is full, the oldest `slide` tokens
are dropped (default: half the window) and the rest is run through the model again ("re-prefill")
with fresh positions 0, 1, ...; the next `slide` tokens are then cheap cached steps again. So each
step sees between `context_size - slide + 1` and `context_size` tokens. The no-cache path
(`use_cache=False`) crops the text with exactly the same schedule, so both paths give the same
tokens; `slide=1` reproduces the book's "crop to the last context_size tokens at every step"
(then the cached path re-prefills at every step past the window).
"""

from __future__ import annotations

import codecs
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import UsageError
from ..model import GPTModel, KVCache
from .sampling import check_sampling_args, sample_next


@dataclass
class GenerationSettings:
    """How to decode: the options `generate` and `stream_generate` share (see `generate`)."""

    max_new_tokens: int = 50
    context_size: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    generator: torch.Generator | None = None
    use_cache: bool = True
    pad_id: int | None = None
    seed: int | None = None
    slide: int | None = None


@dataclass
class _Setup:
    """Validated inputs of one generation: the prompts and the settings resolved for this model."""

    idx: Tensor  # (B, T) prompts on the model's device, left-padded where lengths differ
    pad: list[int]  # left-padding columns of each row
    max_new_tokens: int
    window: int  # context_size
    slide: int
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_id: int | None
    pad_id: int
    generator: torch.Generator | None
    use_cache: bool
    squeeze: bool = False  # a 1-D prompt came in: return 1-D
    per_row: bool = False  # a list of prompts came in: return one tensor per prompt, without padding


@dataclass
class _State:
    """What the loop shares with its callers after each step."""

    length: int  # columns of the output buffer filled so far
    done: Tensor | None = None  # (B,) rows that produced eos_id
    last: bool = False  # this step was the final one
    prefills: int = 0  # forward passes over a whole window (the first one included)


def pad_prompts(prompts: Sequence[Sequence[int] | Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad prompts of different lengths: (ids (B, T_max), attention_mask (B, T_max), 1 = real token)."""
    rows = [p.tolist() if isinstance(p, Tensor) else list(p) for p in prompts]
    if not rows:
        raise UsageError("no prompts given; pass at least one list of token ids")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _check_int(name: str, value, low: int, high: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise UsageError(f"{name} must be {bounds}, got {value}{hint}")


def _prepare(model: GPTModel, idx, settings: GenerationSettings, attention_mask: Tensor | None) -> _Setup:
    """Check every argument (so nothing fails half-way through the loop) and normalise the prompts."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "make_kv_cache"):
        raise UsageError(f"generate needs a GPTModel, got {type(model).__name__}")
    vocab = config.vocab_size
    device = model.tok_emb.weight.device
    max_new_tokens, temperature, top_k, top_p = (settings.max_new_tokens, settings.temperature, settings.top_k,
                                                 settings.top_p)
    eos_id, pad_id, generator, seed = settings.eos_id, settings.pad_id, settings.generator, settings.seed
    check_sampling_args(temperature, top_k, top_p)
    _check_int("max_new_tokens", max_new_tokens, 0)
    window = config.context_length if settings.context_size is None else settings.context_size
    _check_int("context_size", window, 1, config.context_length, " (the model's context_length is the maximum)")
    slide = max(1, window // 2) if settings.slide is None else settings.slide
    _check_int("slide", slide, 1, window)
    if eos_id is not None:
        _check_int("eos_id", eos_id, 0, vocab - 1, " (a token id of the model's vocabulary)")
    if pad_id is not None:
        _check_int("pad_id", pad_id, 0, vocab - 1)
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

    per_row = isinstance(idx, (list, tuple)) and bool(idx) and not all(isinstance(x, int) for x in idx)
    idx, attention_mask, squeeze = _as_batch(idx, attention_mask, pad_id)
    B, T = idx.shape
    if B == 0:
        raise UsageError("idx has no rows; give at least one prompt")
    if T == 0:
        raise UsageError("the prompt is empty; give at least one token id (start from the <|endoftext|> id for none, "
                         "50256 in GPT-2's tokenizer)")
    pad = [0] * B
    if attention_mask is not None:
        pad = _check_mask(attention_mask, B, T)
    real = idx if attention_mask is None else idx.masked_select(attention_mask.to(idx.device).bool())
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise UsageError(f"token id {bad} in idx is outside the model's vocabulary (0..{vocab - 1})")
    longest = T - min(pad)
    if longest > window:
        warnings.warn(
            f"prompt of {longest} tokens is longer than the context of {window}; "
            f"only its last {window} tokens are used",
            stacklevel=3,
        )
    if seed is not None:
        if generator is not None:
            raise UsageError("give either seed or generator, not both")
        _check_int("seed", seed, 0)
        generator = torch.Generator(device=device).manual_seed(seed)
    if generator is not None and generator.device.type != device.type:
        raise UsageError(f"the generator is on {generator.device} but the model is on {device}; create it there")
    idx = idx.to(device=device, dtype=torch.long)
    if attention_mask is not None:  # padding columns may hold anything; the embedding needs valid ids
        idx = idx.masked_fill(~attention_mask.to(device).bool(), pad_id)
    return _Setup(idx, pad, max_new_tokens, window, slide, float(temperature), top_k, top_p, eos_id, pad_id,
                  generator, bool(settings.use_cache), squeeze, per_row)


def _as_batch(idx, attention_mask: Tensor | None, pad_id: int) -> tuple[Tensor, Tensor | None, bool]:
    """Prompts as one (B, T) integer tensor (a list of prompts left-padded), its mask, and whether it came in 1-D."""
    squeeze = False
    if isinstance(idx, Tensor):
        if idx.dim() == 1:
            idx, squeeze = idx[None], True
    elif isinstance(idx, (list, tuple)) and idx and all(isinstance(x, int) for x in idx):
        idx = torch.tensor([idx], dtype=torch.long)
    elif isinstance(idx, (list, tuple)) and idx:
        if attention_mask is not None:
            raise UsageError("attention_mask goes with a padded tensor; give either a list of prompts or both tensors")
        if any(len(p) == 0 for p in idx):
            raise UsageError("a prompt is empty; every prompt needs at least one token id (e.g. <|endoftext|>)")
        idx, attention_mask = pad_prompts(idx, pad_id)
    else:
        raise UsageError(f"idx must be a (batch, tokens) tensor of token ids or a list of prompts, got {idx!r:.60}")
    if idx.dim() != 2:
        raise UsageError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise UsageError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    return idx, attention_mask, squeeze


def _check_mask(attention_mask: Tensor, B: int, T: int) -> list[int]:
    """Left-padding columns per row; the mask must be 0s then 1s in every row."""
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, T):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise UsageError(f"attention_mask must be a tensor of shape {(B, T)} like idx, got {shape}")
    mask = attention_mask.detach().to("cpu", torch.long)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise UsageError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise UsageError("attention_mask must be left padding (0s before 1s in each row); pad prompts on the left")
    pad = (T - mask.sum(dim=1)).tolist()
    if max(pad) >= T:
        raise UsageError("a prompt is empty (its attention_mask row is all 0); give at least one real token")
    return pad


class _Windows:
    """Each row's context window [start, length) in output-buffer columns, and the model inputs for it."""

    def __init__(self, setup: _Setup) -> None:
        T = setup.idx.shape[1]
        self.W, self.slide = setup.window, setup.slide
        # A row of T - p real tokens keeps its last W: it starts at column max(p, T - W).
        self.start = [max(p, T - self.W) for p in setup.pad]
        self.uniform = len(set(self.start)) == 1 and not any(setup.pad)
        self.device = setup.idx.device

    @property
    def first(self) -> int:
        return min(self.start)

    def advance(self, length: int) -> bool:
        """The buffer now has `length` columns: slide windows that overflow; True if any did."""
        moved = False
        for i, s in enumerate(self.start):
            if length - s > self.W:
                self.start[i] = length - (self.W + 1 - self.slide)
                moved = True
        return moved

    def inputs(self, buf: Tensor, length: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """ids, attention mask and positions for running every window in full (positions from 0)."""
        c0 = self.first
        ids = buf[:, c0:length]
        if self.uniform:
            return ids, None, None
        cols = torch.arange(c0, length, device=self.device)[None, :]
        start = torch.tensor(self.start, device=self.device)[:, None]
        return ids, (cols >= start).long(), (cols - start).clamp(min=0)

    def next_positions(self, length: int) -> Tensor | None:
        """Positions (B, 1) of the token in column length - 1, for a cached step."""
        if self.uniform:
            return None  # the model counts from the cache start, which is the window start
        return torch.tensor([[length - 1 - s] for s in self.start], device=self.device)


def _new_cache(model: GPTModel, batch_size: int, length: int) -> KVCache:
    """The compiled decoder's static cache where one is attached and fits, else a cache sized to the run."""
    compiled = model.compiled_decoder
    cache = compiled.kv_cache(batch_size) if compiled is not None else None
    return cache if cache is not None else model.make_kv_cache(batch_size, length)


def prefill(model: GPTModel, windows: _Windows, buf: Tensor, length: int, cache: KVCache | None) -> Tensor:
    """Run every row's window in full (the prompt, or a window that slid), refilling the cache."""
    ids, mask, pos = windows.inputs(buf, length)
    if cache is not None:
        cache.reset()
    return model(ids, kv_cache=cache, attention_mask=mask, position_ids=pos, last_only=True)


def decode_one_token(model: GPTModel, windows: _Windows, buf: Tensor, length: int, cache: KVCache) -> Tensor:
    """Only the newest token goes through the model; every earlier one is in the cache."""
    idx, positions = buf[:, length - 1 : length], windows.next_positions(length)
    compiled = model.compiled_decoder
    if compiled is not None and compiled.applies(idx, cache):
        return compiled(idx, cache, positions)
    return model(idx, kv_cache=cache, position_ids=positions, last_only=True)


def _decode(model: GPTModel, setup: _Setup, state: _State, buf: Tensor) -> Iterator[Tensor]:
    """The generation loop: writes each step's ids (B,) into `buf` and yields them."""
    windows = _Windows(setup)
    B, eos, temperature = buf.shape[0], setup.eos_id, setup.temperature
    # Sized to what this run can use (a whole-context cache would be zero-filled for nothing).
    cache = _new_cache(model, B, min(setup.window, buf.shape[1] - min(windows.start))) if setup.use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=buf.device) if eos is not None else None
    pad_tok = torch.full((B,), setup.pad_id, dtype=buf.dtype, device=buf.device)
    state.done = done
    length = state.length
    for step in range(setup.max_new_tokens):
        if step == 0 or windows.advance(length) or cache is None:
            logits = prefill(model, windows, buf, length, cache)
            state.prefills += 1
        else:
            logits = decode_one_token(model, windows, buf, length, cache)
        tok = sample_next(logits[:, -1], temperature, setup.top_k, setup.top_p, setup.generator)
        if done is not None and B > 1:
            tok = torch.where(done, pad_tok, tok)  # finished rows only grow padding
        buf[:, length] = tok
        length += 1
        state.length = length
        if done is not None:
            done |= tok == eos
            state.last = bool(done.all())
        state.last = state.last or step == setup.max_new_tokens - 1
        yield tok
        if state.last:
            break


@torch.inference_mode()
def generate(
    model: GPTModel,
    idx,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    *,
    attention_mask: Tensor | None = None,
    pad_id: int | None = None,
    seed: int | None = None,
    slide: int | None = None,
) -> Tensor | list[Tensor]:
    """Prompt ids (B, T) -> prompt + up to `max_new_tokens` new ids, shape (B, T + n).

    idx: a (B, T) tensor (or (T,), returning (T + n,)), a list of ids, or a list of prompts of
        different lengths, batched together (left-padded inside); for a list of prompts the result
        is a list with one 1-D tensor per prompt: its ids and its new ids, never any padding (so
        `token_ids_to_text(out[i])` is exactly that row's text), ending at its end-of-text.
    temperature 0 is greedy; top_k / top_p restrict sampling (order in generation/sampling.py).
    eos_id: a row stops when it produces this id; it keeps the id, and later columns of that row
        hold `pad_id` (default: eos_id). The result ends after the last step any row needed, so it
        is shorter than T + max_new_tokens when every row stopped early.
    attention_mask: (B, T), 1 for real tokens and 0 for left padding of shorter prompts; each row
        then gets the same tokens as generating it alone. The output keeps the left padding
        (as `pad_id`), as the input had it.
    generator / seed: sample from this generator (seed: a new one) and never touch the global RNG.
    context_size / slide: the window the model sees and how it slides (module docstring).
    use_cache: False runs the whole window through the model at every step (slow; for checking).
    """
    settings = GenerationSettings(max_new_tokens, context_size, temperature, top_k, top_p, eos_id, generator,
                                  use_cache, pad_id, seed, slide)
    setup = _prepare(model, idx, settings, attention_mask)
    buf, state = _new_buffer(setup)
    was_training = model.training
    model.eval()
    try:
        for _ in _decode(model, setup, state, buf):
            pass
    finally:
        model.train(was_training)
    out = buf[:, : state.length].contiguous()
    if setup.per_row:
        return [_row(out[i], setup.pad[i], setup.idx.shape[1], setup.eos_id) for i in range(out.shape[0])]
    return out[0] if setup.squeeze else out


def _row(ids: Tensor, pad: int, prompt_width: int, eos_id: int | None) -> Tensor:
    """One row of a batch without its padding: the prompt, then the new tokens up to its own end-of-text."""
    new = ids[prompt_width:]
    if eos_id is not None and bool((new == eos_id).any()):
        new = new[: int((new == eos_id).nonzero()[0]) + 1]
    return torch.cat([ids[pad:prompt_width], new])


def _new_buffer(setup: _Setup) -> tuple[Tensor, _State]:
    """The output buffer, allocated once: the prompt, then room for every new token."""
    B, T = setup.idx.shape
    buf = torch.empty((B, T + setup.max_new_tokens), dtype=torch.long, device=setup.idx.device)
    buf[:, :T] = setup.idx
    return buf, _State(length=T)


class TokenTextDecoder:
    """Turns a stream of token ids into text, holding back the bytes of an unfinished character.

    GPT-2's byte-level tokens can split one UTF-8 character (an emoji, a CJK character) over
    several tokens; printing each token's bytes alone would show replacement characters.
    """

    def __init__(self, tokenizer=None) -> None:
        from ..tokenizer import as_tokenizer

        self._tok = as_tokenizer(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is complete now (possibly '')."""
        try:
            data = self._tok.decode_single_token_bytes(token_id)
        except KeyError:
            data = "\ufffd".encode()  # an id the tokenizer does not know (a model with a bigger vocab)
        piece = self._utf8.decode(data)
        self.text += piece
        return piece

    def flush(self) -> str:
        """End of stream: bytes of an unfinished character become U+FFFD."""
        piece = self._utf8.decode(b"", final=True)
        self.text += piece
        return piece


@dataclass
class StreamChunk:
    """One generation step, for every row of the batch."""

    token_ids: list[int | None]  # the new id of each row (None for rows that had already stopped)
    text: list[str]  # text of each row that became complete at this step (may be '')
    text_so_far: list[str]  # each row's generated text so far (complete characters only)
    finished: list[bool] = field(default_factory=list)  # rows that have stopped (EOS or the last step)


def stream_generate(
    model: GPTModel,
    idx,
    max_new_tokens: int = 50,
    *,
    attention_mask: Tensor | None = None,
    tokenizer=None,
    settings: GenerationSettings | None = None,
    **options,
) -> Iterator[StreamChunk]:
    """Like `generate` (same options, by keyword, or one GenerationSettings), but an iterator of one
    StreamChunk per step, each as soon as it exists.

    Arguments are checked here, before the iterator is returned. Text is decoded with `tokenizer`
    (default: the model's, see gptlab.tokenizer.tokenizer_of) and never splits a multi-byte character; an EOS token shows as its text
    (`<|endoftext|>`). The new ids are the same as `generate` gives with the same arguments.
    """
    if settings is None:
        try:
            settings = GenerationSettings(max_new_tokens=max_new_tokens, **options)
        except TypeError:
            known = ", ".join(f.name for f in dataclasses.fields(GenerationSettings))
            raise UsageError(f"unknown stream_generate option(s) {', '.join(sorted(options))}; known: {known}") from None
    setup = _prepare(model, idx, settings, attention_mask)
    if tokenizer is None:
        from ..tokenizer import tokenizer_of

        tokenizer = tokenizer_of(model)
    decoders = [TokenTextDecoder(tokenizer) for _ in range(setup.idx.shape[0])]
    return _stream(model, setup, decoders)


@torch.inference_mode()  # torch enters and leaves it around each step, so the caller's code is unaffected
def _stream(model: GPTModel, setup: _Setup, decoders: list[TokenTextDecoder]) -> Iterator[StreamChunk]:
    buf, state = _new_buffer(setup)
    B = buf.shape[0]
    stopped = [False] * B
    was_training = model.training
    model.eval()
    try:
        for tok in _decode(model, setup, state, buf):
            ids = tok.tolist()
            new_ids: list[int | None] = []
            texts = []
            for i in range(B):
                if stopped[i]:
                    new_ids.append(None)
                    texts.append("")
                    continue
                new_ids.append(ids[i])
                piece = decoders[i].push(ids[i])
                if setup.eos_id is not None and ids[i] == setup.eos_id:
                    stopped[i] = True
                if state.last or stopped[i]:
                    piece += decoders[i].flush()
                texts.append(piece)
            if state.last:
                stopped = [True] * B
            yield StreamChunk(new_ids, texts, [d.text for d in decoders], list(stopped))
    finally:
        model.train(was_training)
