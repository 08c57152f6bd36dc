"""Running the server: the listening socket, the model, uvicorn, and a drain on Ctrl-C / SIGTERM."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import uvicorn

from ..errors import UsageError
from ..finetune.templates import load_template
from ..generation.decoding import prepare_for_decoding
from ..hardware import warn_if_slow_bfloat16
from ..pretrained.resolve import RANDOM_PREFIX, load_model_arg
from ..tokenizer import tokenizer_of
from .app import Served, create_app
from .chat import chat_format
from .protocol import Limits
from .scheduler import Scheduler

log = logging.getLogger("gptlab.serve")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), so a port in use fails before the model loads."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host!r}: {exc.strerror}; give an address such as 127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous server's TIME_WAIT does not block us
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = "; pick another with --port (0: any free port)" if exc.errno == 98 else ""
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    return sock


def model_name(spec: str) -> str:
    """The name clients use for `--model spec`: a folder's (or a weights file's folder's) name, else spec."""
    path = Path(spec)
    if not spec.startswith(RANDOM_PREFIX) and path.exists():
        return (path if path.is_dir() else path.parent).resolve().name
    return spec


def load_served(spec: str, name: str | None, device, dtype: torch.dtype, kernel: str, limits: dict) -> Served:
    """The model of `--model spec`, prepared for decoding, its chat format, and a scheduler for it that
    encodes and decodes with the model's own tokenizer (GPT-2's when the folder holds none)."""
    if dtype == torch.bfloat16:
        warn_if_slow_bfloat16(device)
    model = prepare_for_decoding(load_model_arg(spec, device, dtype=dtype, purpose="serve"), kernel=kernel)
    path = Path(spec)
    template = None
    if not spec.startswith(RANDOM_PREFIX) and path.exists():
        template = load_template(path if path.is_dir() else path.parent)
    config = model.config
    tokenizer = tokenizer_of(model)
    # as `gptlab generate`: no stop on an end-of-text id the model cannot produce
    eos_id = tokenizer.eot_id if tokenizer.eot_id < config.vocab_size else None
    limits = Limits(context_length=config.context_length, vocab_size=config.vocab_size, **limits)
    scheduler = Scheduler(model, limits.max_batch, limits.max_queue, eos_id, tokenizer)
    return Served(model, name or model_name(spec), scheduler, limits, chat_format(template))


class _Server(uvicorn.Server):
    """uvicorn's server, draining on SIGINT/SIGTERM and then exiting normally.

    uvicorn finishes the responses in flight on the first signal (a second one stops at once), then
    raises the signal again so the process dies of it (status 130/143); a server that shut down
    cleanly should exit 0, so the handlers here are restored without that.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            stats = self.config.app_served.scheduler.stats()
            log.info("%s: finishing %d running and %d waiting request(s), then exiting (again to stop now)",
                     signal.Signals(sig).name, stats["running"], stats["waiting"])
        elif not self.force_exit:
            log.info("stopping now")
        super().handle_exit(sig, frame)


def serve(served: Served, sock: socket.socket) -> int:
    """Serve until Ctrl-C or SIGTERM (then drain); 0 after a clean drain, 130 when stopped at once."""
    sock.listen(128)  # from here connections queue, even before uvicorn's loop accepts them
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    config = uvicorn.Config(create_app(served), log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=5)
    config.app_served = served
    server = _Server(config)
    print(f"serving {served.name} on {url} (playground: {url}/)", flush=True)
    if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
        log.warning("warning: %s is reachable from other machines and the server has no authentication", url)
    server.run(sockets=[sock])
    return 130 if server.force_exit else 0


def setup_logging(quiet: bool) -> None:
    """Request lines and server notes on stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
