"""The tokenizer files of a Hugging Face model folder, so that `AutoTokenizer.from_pretrained(folder)` and
`pipeline("text-generation", model=folder)` work offline with exactly gptlab's ids.

For GPT-2's BPE: vocab.json and merges.txt (OpenAI's encoder.json and vocab.bpe, the same formats),
tokenizer.json (the fast-tokenizer file, built with Hugging Face `tokenizers`), tokenizer_config.json
and special_tokens_map.json. Choices that matter for exact ids, each checked against transformers:
- tokenizer_class PreTrainedTokenizerFast: it loads tokenizer.json as it is (transformers 5 rebuilds a
  GPT2Tokenizer from vocab/merges and its own defaults instead);
- no prefix space: `add_prefix_space` true changes the id of every text's first word;
- `clean_up_tokenization_spaces` false: older transformers default it to true and turn " ," into ",";
- merges written as "a b" strings: newer `tokenizers` writes pairs, which older versions cannot read
  (byte-level tokens never contain a space, so the string form is unambiguous).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..storage.files import atomic_open, write_json
from .base import ENDOFTEXT, Tokenizer
from .bpe import BPETokenizer
from .folder import hf_tokenizer_config, write_tokenizer
from .gpt2 import EOT_ID, GPT2_NAME, GPT2_VOCAB_SIZE, gpt2_vocab_files


def portable_tokenizer_json(tokenizer) -> str:
    """A `tokenizers.Tokenizer` as tokenizer.json text that every version of `tokenizers` reads."""
    data = json.loads(tokenizer.to_str())
    merges = data["model"].get("merges", [])
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def gpt2_fast_tokenizer():
    """GPT-2's BPE as a `tokenizers.Tokenizer`: byte-level, GPT-2's split, no prefix space, <|endoftext|> special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    encoder_json, vocab_bpe = gpt2_vocab_files()
    merges = [tuple(line.split(" ")) for line in vocab_bpe.decode("utf-8").split("\n")[1:] if line]
    tok = Tokenizer(models.BPE(vocab=json.loads(encoder_json), merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; it adds no tokens
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    assert tok.token_to_id(ENDOFTEXT) == EOT_ID and tok.get_vocab_size() == GPT2_VOCAB_SIZE
    return tok


def write_gpt2_tokenizer(folder: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
    """Write GPT-2's tokenizer files into `folder`; returns their names."""
    folder = Path(folder)
    encoder_json, vocab_bpe = gpt2_vocab_files()
    for name, data in (("vocab.json", encoder_json), ("merges.txt", vocab_bpe)):
        with atomic_open(folder / name, "wb") as fh:
            fh.write(data)
    with atomic_open(folder / "tokenizer.json") as fh:
        fh.write(portable_tokenizer_json(gpt2_fast_tokenizer()))
    write_json(folder / "tokenizer_config.json", hf_tokenizer_config(ENDOFTEXT, model_max_length))
    write_json(folder / "special_tokens_map.json", {k: ENDOFTEXT for k in ("bos_token", "eos_token", "unk_token")})
    return ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def write_hf_tokenizer(tok: Tokenizer, folder: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
    """Write the tokenizer files of a Hugging Face folder for any gptlab tokenizer; returns their names.

    GPT-2: its files above. A byte-level BPE: its tokenizer.json byte for byte, tokenizer_config.json
    (with gptlab's record, so gptlab reads the folder back as the same tokenizer) and special_tokens_map.json.
    """
    if not isinstance(tok, BPETokenizer):
        if tok.name != GPT2_NAME:
            raise ValueError(f"tokenizer {tok.name} has no Hugging Face files")
        return write_gpt2_tokenizer(folder, model_max_length)
    names = write_tokenizer(tok, folder, model_max_length)
    special_map: dict = {key: tok.eot_token for key in ("bos_token", "eos_token", "unk_token")}
    others = [s for s in tok.special_tokens if s != tok.eot_token]
    if others:
        special_map["additional_special_tokens"] = others
    write_json(Path(folder) / "special_tokens_map.json", special_map)
    return [*names, "special_tokens_map.json"]
