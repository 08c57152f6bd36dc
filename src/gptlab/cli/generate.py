"""`gptlab generate`: continue a prompt with a model, streaming the text as it is produced.

`--instruction TEXT [--input TEXT]` asks an instruction-tuned model (a run of `gptlab finetune`):
the prompt is formatted with the run's stored template (prompt_template.json) and only the
response is printed, up to `<|endoftext|>`; it is greedy unless --temperature is given.

The model's own tokenizer encodes the prompt and decodes the output (GPT-2's unless the model folder
holds another). An empty `--prompt` starts from `<|endoftext|>` (the document separator, the usual
"no prompt"). A prompt longer than the context keeps its last `context_size` tokens, with a warning.
`--num-samples N` samples N continuations as one batch; the text of a single sample streams to the
terminal, several are printed one after another when all are done. `--json` prints one object
`{"prompt_ids": [...], "completions": [{"text": ..., "token_ids": [new ids]}]}` on stdout; the
prompt ids are those the model saw (after cropping). New ids include the end-of-text id when a
sample stopped on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import (
    MODEL_HELP,
    add_device_arg,
    finite_float,
    non_negative_float,
    non_negative_int,
    pick_device,
    positive_int,
)


def top_p_value(text: str) -> float:
    """A number in (0, 1]."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 keeps every token), got {text}")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt (greedy or sampled), streaming the text",
        description="Continue a prompt with the model's own tokenizer, streaming the text as it is produced. The "
        "text streams as whole characters: byte-level tokens can hold part of a character (with GPT-2's tokenizer "
        "many Chinese characters and emoji take two or three tokens), so such a token prints nothing until the "
        "next one completes the character. '\ufffd' appears only where the output ends (or the model writes bytes) "
        "in the middle of a character. --instruction asks a fine-tuned model (gptlab finetune) and prints only its "
        "answer.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue ('' starts from <|endoftext|>)")
    what.add_argument("--instruction", help="an instruction for a fine-tuned model: formatted with its prompt "
                      "template, only the response is printed")
    p.add_argument("--input", default="", help="with --instruction: the input the instruction works on")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=None,
                   help="tokens to add (default 50; with --instruction 256)")
    p.add_argument("--temperature", type=non_negative_float, default=None,
                   help="0 = greedy argmax; higher = more random (default 1.0; with --instruction 0)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=top_p_value, default=None,
                   help="sample only from the smallest set of tokens whose probability reaches P")
    p.add_argument("--seed", type=non_negative_int, default=None, help="make sampling reproducible")
    p.add_argument("--num-samples", type=positive_int, default=1, help="continuations to sample (one batch)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep going after <|endoftext|>")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token (slow)")
    p.add_argument("--context-size", type=positive_int, default=None,
                   help="tokens the model sees (default and maximum: the model's context_length)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype")
    p.add_argument("--cpu-kernel", choices=("auto", "on", "off"), default="auto",
                   help="one sample on CPU: run each step in gptlab's C decoding kernel (auto, the default: where it "
                   "builds and checks out, silently eager elsewhere; on: say why when it cannot; off: eager). "
                   "About 2x eager float32 decoding, 3-4x bfloat16, at the cost of a second, repacked copy of "
                   "the weights")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each single-token step over a static KV cache (in a CUDA graph on a GPU): "
                   "much faster decoding on GPUs once compiled; the first steps pay the compilation")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--verbose", action="store_true", help="report tokens/s on stderr")
    add_device_arg(p)
    p.set_defaults(func=run)


def prompt_ids_for(text: str, window: int, tokenizer=None) -> tuple[list[int], str | None]:
    """Token ids of the prompt (empty -> <|endoftext|>), cropped to `window`, and a warning if cropped."""
    from ..tokenizer import as_tokenizer

    tok = as_tokenizer(tokenizer)
    ids = tok.encode(text) if text else [tok.eot_id]
    if len(ids) <= window:
        return ids, None
    return ids[-window:], f"prompt has {len(ids)} tokens, more than the context of {window}; using its last {window}"


def instruction_prompt(args: argparse.Namespace) -> str:
    """--instruction/--input formatted with the model folder's template (the book's Alpaca one if it has none)."""
    from pathlib import Path

    from ..finetune.templates import ALPACA, load_template

    template = load_template(args.model) if Path(args.model).is_dir() else None
    if template is None:
        print(f"warning: {args.model} has no prompt template (not a gptlab finetune run); using the "
              f"{ALPACA.name} template", file=sys.stderr)
        template = ALPACA
    return template.format(args.instruction, args.input)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UsageError
    from ..generation.decoding import prepare_for_decoding
    from ..generation.generate import stream_generate
    from ..hardware import warn_if_slow_bfloat16
    from ..pretrained.resolve import load_model_arg
    from ..tokenizer import tokenizer_of

    if args.input and args.instruction is None:
        raise UsageError("--input goes with --instruction")
    asking = args.instruction is not None
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if asking else 50  # the book's response limit in chapter 7
    if args.temperature is None:
        args.temperature = 0.0 if asking else 1.0
    device = pick_device(args, quiet=not args.verbose)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    kernel = args.cpu_kernel
    if kernel != "off" and (args.num_samples > 1 or args.no_cache or torch.device(device).type != "cpu"):
        # the kernel serves batch-1 cached decoding on CPU only: skip building and packing for nothing
        if kernel == "on":
            print("warning: --cpu-kernel speeds up one sample with the KV cache on CPU; ignored here",
                  file=sys.stderr)
        kernel = "off"
    if dtype == torch.bfloat16:
        warn_if_slow_bfloat16(device)
    model = prepare_for_decoding(load_model_arg(args.model, device, dtype=dtype), kernel=kernel,
                                 compile=args.compile, max_batch=max(8, args.num_samples))
    config = model.config
    tokenizer = tokenizer_of(model)
    window = args.context_size or config.context_length
    if window > config.context_length:
        raise UsageError(f"--context-size {window} is larger than the model's context_length {config.context_length}")
    if asking:  # tokenized as in fine-tuning (finetune/instructions.py): special-token text stays text
        ids = tokenizer.encode_ordinary(instruction_prompt(args))
        ids, warning = ids[-window:], (f"the prompt has {len(ids)} tokens, more than the context of {window}; "
                                       f"using its last {window}" if len(ids) > window else None)
    else:
        ids, warning = prompt_ids_for(args.prompt, window, tokenizer)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    eot = tokenizer.eot_id
    eos_id = None if args.no_eos_stop or eot >= config.vocab_size else eot
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    chunks = stream_generate(
        model, prompt, args.max_new_tokens, context_size=window, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_id=eos_id, seed=args.seed, use_cache=not args.no_cache, tokenizer=tokenizer,
    )
    live = not args.json and args.num_samples == 1
    if live and not asking:
        sys.stdout.write(tokenizer.decode(ids) if args.prompt else "")
        sys.stdout.flush()
    new_ids: list[list[int]] = [[] for _ in range(args.num_samples)]
    texts = [""] * args.num_samples
    start = time.perf_counter()
    for chunk in chunks:
        for i, tid in enumerate(chunk.token_ids):
            if tid is not None:
                new_ids[i].append(tid)
        texts = chunk.text_so_far
        if asking:  # the response ends at <|endoftext|>, which is not part of it
            texts = [t.removesuffix(tokenizer.eot_token) for t in texts]
            if chunk.token_ids[0] == eot:
                continue
        if live and chunk.text[0]:
            sys.stdout.write(chunk.text[0])
            sys.stdout.flush()
    seconds = time.perf_counter() - start
    if args.json:
        completions = [{"text": t, "token_ids": n} for t, n in zip(texts, new_ids, strict=True)]
        print(json.dumps({"prompt_ids": ids, "completions": completions}))
    elif live:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(texts):
            print(f"=== sample {i + 1} ===")
            print((tokenizer.decode(ids) if args.prompt and not asking else "") + text)
    if args.verbose:
        n = sum(len(x) for x in new_ids)
        rate = n / seconds if seconds > 0 else float("inf")
        print(f"generated {n} tokens in {seconds:.2f} s: {rate:.1f} tokens/s "
              f"({args.num_samples} sample(s), {'no cache' if args.no_cache else 'KV cache'}, {args.dtype})",
              file=sys.stderr)
    return 0
