"""`gptlab serve`: an OpenAI-compatible HTTP server for a model, with continuous batching and a web playground.

Needs the `serve` extra (FastAPI and uvicorn): `pip install -e '.[serve]'` in a clone. The manual is docs/serve.md.
"""

from __future__ import annotations

import argparse

from .common import add_device_arg, pick_device, positive_int


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0: any free port), got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: OpenAI-compatible API, continuous batching, playground",
                       description="Serve a model over HTTP: OpenAI's /v1/completions, /v1/chat/completions and "
                       "/v1/models, requests batched together step by step, and a web playground at /. Text is encoded "
                       "and decoded with the model folder's own tokenizer, as in gptlab generate. Ctrl-C or SIGTERM finishes the requests in flight, then exits. Manual: docs/serve.md.")
    p.add_argument("--model", required=True, help="what to serve: a GPT-2 name, a model or run folder, random:PRESET")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the folder's name or --model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="most sequences decoded together; also the largest n a request may ask for (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="most requests waiting for a free slot; more are answered 429 (default 64)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="largest request body; larger ones are answered 413 (default 1 MiB)")
    p.add_argument("--cpu-kernel", choices=("auto", "on", "off"), default="auto",
                   help="on CPU, decoding steps run in gptlab's C kernel: a lone request as `gptlab generate` runs it, "
                   "several together in one pass (default auto: where it builds; off: eager PyTorch)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines (errors only)")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"gptlab serve needs FastAPI and uvicorn ({exc}): pip install fastapi uvicorn") from None
    import torch

    from ..serve.server import bind, load_served, serve, setup_logging

    sock = bind(args.host, args.port)  # before loading: a port in use fails at once
    try:
        device = pick_device(args, quiet=True)
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        limits = {"max_batch": args.max_batch, "max_queue": args.max_queue, "max_body_bytes": args.max_body_bytes}
        served = load_served(args.model, args.name, device, dtype, args.cpu_kernel, limits)
        setup_logging(args.quiet)
        return serve(served, sock)
    finally:
        sock.close()
