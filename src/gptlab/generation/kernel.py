"""Batch-1 decoding on CPU in a small C kernel over repacked weights (`prepare_for_decoding`, generation/decoding.py).

Decoding one token at batch 1 reads every weight once, so it runs at the speed the cores stream the
weights. A matrix-vector product over nn.Linear's (out, in) rows needs two loads per cache line of
weights: the line and the matching slice of the input. On the development CPU (2 cores, AMD EPYC)
the cores, not the memory, then cap the read speed: in-flight loads are the limit, and a dot-product
loop over row-major weights read 0.75-0.85 of what a plain sum over the same bytes reads when the
machine read ~55 GB/s. So the decoder keeps its own copy of each product's weights, repacked in
blocks of 64 output rows stored column by column (`pack`): each loaded line is multiplied by one
broadcast input value, one load per line, in address order, and that loop read 0.92-0.96 of a plain
sum (bench/README.md).

The step itself -- embeddings, the blocks with their cache writes and attention, final norm, LM head
-- is ~350 lines of C (csrc/decode.c) in one OpenMP region, built with the machine's C compiler the
first time it is needed (~0.3 s) and cached in $GPTLAB_HOME/kernels (default ~/.cache/gptlab/kernels).
Prompts of up to MAX_TOKENS tokens go through the same code, each loaded line of weights used for
up to 4 tokens at a time (a 16-token prompt: 26 ms against 64 ms in the eager forward, float32).
Continuous batching's steps (`GPTModel.forward_slots`, gptlab.serve) take the same route (`decode_rows`):
one new token for each of up to MAX_TOKENS sequences, each at its own position in its own cache slot,
in one OpenMP region instead of the eager forward's few hundred small parallel operations.
Costs: a second copy of the weights in memory (the model's own stay, for long prompts, batches and
training), and a C compiler with OpenMP. Without them `use_kernel_decoding` returns False (with a
warning when asked to).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from ..hardware import huge_page_buffer
from ..model import GPTModel, KVCache, SlotKVCache
from ..storage.download import gptlab_home

ROWS_PER_BLOCK = 64  # RB in csrc/decode.c
MAX_TOKENS = 64  # prompts up to this long go through the kernel too; longer ones take the eager forward's GEMMs
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# The target CPU: this one (-march=native). GPTLAB_KERNEL_MARCH builds for another (e.g. x86-64-v3, an
# AVX2-only CPU) to test that code path on a machine with more features.
MARCH_ENV = "GPTLAB_KERNEL_MARCH"
VARIANTS = {"f32": [], "bf16": ["-DWEIGHTS_BF16"]}  # the kernel built once per weight dtype
VARIANT_OF = {torch.float32: "f32", torch.bfloat16: "bf16"}
# Keep the kernel only where its decoding step takes at most this fraction of the eager step, timed at
# preparation (`speed_check`). Where the kernel loses, decoding falls back to prepare_for_decoding's
# eager layout (column-major, 2 MiB pages), a few percent faster than the model as timed: hence a
# margin rather than 1.0.
SPEED_MARGIN = 0.95
SPEED_CHECK_ENV = "GPTLAB_KERNEL_SPEED_CHECK"

_PTR = ctypes.c_void_p


class _Layer(ctypes.Structure):
    _fields_ = [(name, _PTR) for name in (
        "ln1_w", "ln1_b", "qkv_b", "out_b", "ln2_w", "ln2_b", "fc_b", "proj_b", "qkv", "out", "fc", "proj"
    )]


class _Model(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_int) for name in (
            "n_layers", "emb", "n_heads", "head_dim", "hidden", "vocab_rows", "n_threads", "max_tokens"
        )],
        ("eps", ctypes.c_float),
        *[(name, _PTR) for name in ("tok_emb", "pos_emb", "lnf_w", "lnf_b", "head", "layers")],
        *[(name, _PTR) for name in ("x", "qkv", "att", "h", "logits", "scratch")],
    ]


def _cache_dir() -> Path:
    return gptlab_home() / "kernels"


def _cpu_name() -> str:
    """Part of the cache key: -march=native code is only valid on CPUs like the one that built it."""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.machine() + platform.processor()
    return "\n".join(line for line in first_cpu.splitlines() if line.startswith(("model name", "flags", "Features")))


def build(variant: str) -> Path:
    """The compiled kernel for `variant` ("f32" or "bf16"), compiling it on first use (atomic, cached)."""
    source = resources.files("gptlab.generation").joinpath("csrc/decode.c").read_bytes()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    flags = [*FLAGS, f"-march={os.environ.get(MARCH_ENV) or 'native'}", *VARIANTS[variant]]
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_name().encode()]))
    target = _cache_dir() / f"decode-{variant}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "decode.c", Path(tmp) / "decode.so"
        src.write_bytes(source)
        done = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(out, target)  # another process may have built it too: same bytes either way
    return target


def pack(weight: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """(rows, cols) weight -> blocks of 64 rows stored column by column, rows padded with zeros.

    float32: (blocks, cols, 64). bfloat16: (blocks, cols / 2, 64, 2), columns in pairs, so that one
    32-bit lane holds a row's two weights for one bfloat16 dot-product instruction (cols even).
    """
    rows, cols = weight.shape
    blocks = -(-rows // ROWS_PER_BLOCK)
    packed = torch.zeros(blocks * ROWS_PER_BLOCK, cols, dtype=dtype)
    packed[:rows] = weight.detach()
    if dtype == torch.bfloat16:
        packed = packed.view(blocks, ROWS_PER_BLOCK, cols // 2, 2).permute(0, 2, 1, 3)
    else:
        packed = packed.view(blocks, ROWS_PER_BLOCK, cols).transpose(1, 2)
    if out is None:
        return packed.contiguous()
    return out.view(packed.shape).copy_(packed)


def _padded(n: int) -> int:
    return -(-n // ROWS_PER_BLOCK) * ROWS_PER_BLOCK


class KernelDecoder:
    """GPTModel.forward hands it batch-1 steps with a KV cache: single tokens and short prompts (see `applies`).

    It keeps a packed copy of the weights, refreshed when a parameter has changed since (an optimizer
    step, load_state_dict, assigning `.data`: checked at every step). A module given a new Parameter
    object is not noticed: call prepare_for_decoding again after that. One decoding at a time per
    model: the work buffers are the decoder's own.
    """

    def __init__(self, model: GPTModel) -> None:
        weight = model.tok_emb.weight
        self.dtype, self.device = weight.dtype, weight.device
        variant = VARIANT_OF[self.dtype]
        lib = ctypes.CDLL(str(build(variant)))
        self.step = getattr(lib, f"decode_tokens_{variant}")
        self.step.restype = None
        self.step.argtypes = [ctypes.POINTER(_Model), _PTR, ctypes.c_int, ctypes.c_long, _PTR, _PTR, ctypes.c_long]
        self.rows_step = getattr(lib, f"decode_rows_{variant}")
        self.rows_step.restype = None
        self.rows_step.argtypes = [ctypes.POINTER(_Model), _PTR, ctypes.c_int, _PTR, _PTR, _PTR, ctypes.c_long, _PTR,
                                   ctypes.c_long]
        self.refresh(model)

    def _fingerprint(self) -> list[tuple[int, int]]:
        """Changes when a parameter is updated in place (its version) or replaced (its storage): ~20 us."""
        return [(p.data_ptr(), p._version) for p in self.params]

    def refresh(self, model: GPTModel) -> None:
        """(Re)build the packed weights and the C-side description of the model."""
        cfg, dt = model.config, self.dtype
        C, hidden, vocab_rows = cfg.emb_dim, 4 * cfg.emb_dim, model.out_head.weight.shape[0]
        linears = [m for b in model.trf_blocks for m in (b.att.qkv, b.att.out_proj, b.ff.fc, b.ff.proj)]
        linears.append(model.out_head)
        sizes = [_padded(m.weight.shape[0]) * m.weight.shape[1] * dt.itemsize for m in linears]
        block = huge_page_buffer(sum(sizes))
        block = block if block is not None else torch.empty(sum(sizes), dtype=torch.uint8)
        self.packed, offset = [], 0
        for m, size in zip(linears, sizes, strict=True):
            self.packed.append(pack(m.weight, dt, block[offset : offset + size].view(dt)))
            offset += size
        self.block = block

        def vec(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().float().contiguous()

        keep = self.vectors = []  # float32 copies of biases and norms, alive as long as the decoder

        def ptr(t: Tensor | None) -> int | None:
            if t is None:
                return None
            keep.append(t)
            return t.data_ptr()

        layers = (_Layer * cfg.n_layers)()
        for i, b in enumerate(model.trf_blocks):
            p = self.packed[4 * i : 4 * i + 4]
            layers[i] = _Layer(
                *(ptr(vec(t)) for t in (b.norm1.weight, b.norm1.bias, b.att.qkv.bias, b.att.out_proj.bias,
                                         b.norm2.weight, b.norm2.bias, b.ff.fc.bias, b.ff.proj.bias)),
                *(t.data_ptr() for t in p),
            )
        T = MAX_TOKENS
        sizes = (T * _padded(C), T * _padded(3 * C), T * _padded(C), T * _padded(hidden), _padded(vocab_rows))
        self.buffers = [torch.zeros(n) for n in sizes]  # x, qkv, att, h (max_tokens rows each), logits
        self.scratch = torch.zeros(0)
        self.layers = layers
        self.tables = tuple(t.weight.detach().to(dt).contiguous() for t in (model.tok_emb, model.pos_emb))
        self.desc = _Model(
            n_layers=cfg.n_layers, emb=C, n_heads=cfg.n_heads, head_dim=cfg.head_dim, hidden=hidden,
            vocab_rows=vocab_rows, n_threads=1, max_tokens=MAX_TOKENS, eps=model.final_norm.eps,
            tok_emb=self.tables[0].data_ptr(), pos_emb=self.tables[1].data_ptr(),
            lnf_w=ptr(vec(model.final_norm.weight)), lnf_b=ptr(vec(model.final_norm.bias)),
            head=self.packed[-1].data_ptr(), layers=ctypes.addressof(layers),
            **{name: t.data_ptr() for name, t in zip(("x", "qkv", "att", "h", "logits"), self.buffers, strict=True)},
        )
        self.vocab_size = cfg.vocab_size
        self.context = cfg.context_length
        self.params = list(model.parameters())
        self.fingerprint = self._fingerprint()

    def applies(self, model: GPTModel, idx: Tensor, kv_cache: KVCache | None, last_only: bool = True) -> bool:
        """True for the calls this kernel was made for: one row, a plain cache, no grad; one token, or a
        prompt of up to MAX_TOKENS when only the last position's logits are asked for."""
        weight = model.tok_emb.weight
        T = idx.shape[-1]
        return (
            kv_cache is not None and idx.dim() == 2 and idx.shape[0] == 1 and kv_cache.batch_size == 1
            and (T == 1 or (last_only and 1 < T <= min(MAX_TOKENS, self.desc.max_tokens))) and kv_cache.valid is None
            and not model.training and not torch.is_grad_enabled() and idx.device.type == "cpu"
            and weight.dtype == self.dtype and weight.device == self.device
            and kv_cache.k.dtype == self.dtype and kv_cache.k.is_contiguous() and kv_cache.v.is_contiguous()
        )

    def __call__(self, model: GPTModel, idx: Tensor, kv_cache: KVCache) -> Tensor:
        """Logits (1, 1, vocab_size) after the last of `idx`'s tokens, in the model's dtype; appends
        the tokens' keys/values to the cache."""
        tokens = self._ready(model, idx[0])
        pos, T = kv_cache.length, tokens.numel()
        self.step(ctypes.byref(self.desc), tokens.data_ptr(), T, pos, kv_cache.k.data_ptr(), kv_cache.v.data_ptr(),
                  kv_cache.max_len)
        kv_cache.length = pos + T
        return self.buffers[4][: self.vocab_size].to(self.dtype, copy=True).view(1, 1, -1)


    def _ready(self, model: GPTModel, ids: Tensor) -> Tensor:
        """Weights repacked if they changed, work memory for this many threads; `ids` checked, as int64."""
        if self._fingerprint() != self.fingerprint:
            self.refresh(model)
        tokens = ids.to(torch.int64).contiguous()
        if tokens.numel() == 1:
            low = high = int(tokens)
        else:
            low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.desc.vocab_rows:  # the eager path raises on this too (embedding lookup)
            bad = low if low < 0 else high
            raise IndexError(f"token id {bad} is outside the vocabulary (0..{self.desc.vocab_rows - 1})")
        threads = torch.get_num_threads()
        per_thread = self.desc.max_tokens * (self.desc.emb + self.desc.hidden) + self.context  # as decode.c lays it out
        if self.desc.n_threads != threads or self.scratch.numel() < threads * per_thread:
            self.scratch = torch.zeros(threads * per_thread)
            self.desc.scratch, self.desc.n_threads = self.scratch.data_ptr(), threads
        return tokens

    def applies_rows(self, model: GPTModel, idx: Tensor, cache: SlotKVCache) -> bool:
        """True for continuous batching's steps it can run (GPTModel.forward_slots): one new token per row,
        up to MAX_TOKENS rows, no grad, the kernel's device and dtype, contiguous slot buffers."""
        weight = model.tok_emb.weight
        return (
            idx.dim() == 2 and idx.shape[1] == 1 and 1 <= idx.shape[0] <= self.desc.max_tokens
            and not model.training and not torch.is_grad_enabled() and idx.device.type == "cpu"
            and weight.dtype == self.dtype and weight.device == self.device
            and cache.k.dtype == self.dtype and cache.k.is_contiguous() and cache.v.is_contiguous()
        )

    def rows(self, model: GPTModel, idx: Tensor, cache: SlotKVCache, first: int) -> Tensor:
        """Logits (B, vocab_size) after one new token (idx (B, 1)) in each of slots first..first+B-1, each at
        its slot's own position; writes the tokens' keys/values into the slots (their lengths are the caller's)."""
        tokens = self._ready(model, idx[:, 0])
        B = tokens.numel()
        pos = torch.tensor(cache.lengths[first : first + B], dtype=torch.int64)
        slot_bytes = cache.k[0].numel() * cache.k.element_size()  # a slot is one batch-1 cache, (L, H, max_len, D)
        k_rows = (_PTR * B)(*(cache.k.data_ptr() + (first + b) * slot_bytes for b in range(B)))
        v_rows = (_PTR * B)(*(cache.v.data_ptr() + (first + b) * slot_bytes for b in range(B)))
        ldl = self.buffers[4].numel()  # the padded vocabulary
        logits = torch.empty(B, ldl)
        self.rows_step(ctypes.byref(self.desc), tokens.data_ptr(), B, pos.data_ptr(), k_rows, v_rows, cache.max_len,
                       logits.data_ptr(), ldl)
        return logits[:, : self.vocab_size].to(self.dtype)


def speed_check(model: GPTModel, decoder: KernelDecoder, budget_s: float = 0.25, min_pairs: int = 5,
                max_pairs: int = 12) -> tuple[float, int]:
    """(median of kernel step time / eager step time, pairs timed): single-token steps of both on
    scratch batch-1 caches (the eager step is `model`'s own forward; its cpu_decoder must be None).

    Steps are timed in pairs (kernel then eager, then the other way round, so that neither always
    runs first) until `budget_s` is spent (at least `min_pairs`, at most `max_pairs`), after one
    untimed step each. Each pair's ratio counts, not the total times: a pair's two steps see the
    machine in the same state, so a machine whose speed drifts (a VM, another busy process) moves
    both alike. gpt2-small, float32, 2 cores: ~0.33 s idle (7 pairs); on a heavily loaded 2-core VM,
    3 pairs decided wrongly in up to 30% of checks and 8-12 pairs in ~5%: hence at least 5.
    """
    max_pairs = max(1, min(max_pairs, model.config.context_length - 2))  # both caches must fit the context
    min_pairs = min(min_pairs, max_pairs)
    with torch.inference_mode():
        k_cache, e_cache = model.make_kv_cache(1, max_pairs + 2), model.make_kv_cache(1, max_pairs + 2)
        token = torch.zeros(1, 1, dtype=torch.long)

        def timed(step) -> float:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start

        def kernel_step() -> float:
            return timed(lambda: decoder(model, token, k_cache))

        def eager_step() -> float:
            return timed(lambda: model(token, kv_cache=e_cache, last_only=True))

        kernel_step(), eager_step()
        ratios: list[float] = []
        timed_from = time.perf_counter()
        while len(ratios) < max_pairs and (len(ratios) < min_pairs or time.perf_counter() - timed_from < budget_s):
            if len(ratios) % 2:
                e, k = eager_step(), kernel_step()
            else:
                k, e = kernel_step(), eager_step()
            ratios.append(k / e)
    return statistics.median(ratios), len(ratios)


def use_kernel_decoding(model: GPTModel, warn: bool = True, check_speed: bool | None = None) -> bool:
    """Set up the C decoding kernel for `model`; False (model unchanged, a warning if `warn`) where it cannot
    run or is not faster.

    Checks the kernel against the eager forward on a scratch cache, so a broken compiler is found
    here rather than in the middle of a generation. Then, with check_speed (default: on, unless the
    environment sets GPTLAB_KERNEL_SPEED_CHECK=0), times a few decoding steps of both (`speed_check`)
    and keeps the kernel only where its step takes at most SPEED_MARGIN of the eager one: a CPU where
    it is not faster (a compiler that vectorises it badly, another memory system) decodes eagerly.
    """
    if check_speed is None:
        check_speed = os.environ.get(SPEED_CHECK_ENV, "1") != "0"
    weight = model.tok_emb.weight
    if weight.device.type != "cpu" or weight.dtype not in VARIANT_OF or (weight.dtype == torch.bfloat16 and model.config.emb_dim % 2):
        if warn:
            what = f"{weight.dtype} weights on {weight.device.type}, emb_dim {model.config.emb_dim}"
            warnings.warn(f"the C decoding kernel serves float32 and bfloat16 (even emb_dim) models on CPU, not "
                          f"{what}; decoding stays eager", stacklevel=2)
        return False
    problem, decoder = _check_kernel(model, check_speed)
    if problem is not None:
        if warn:
            warnings.warn(f"the C decoding kernel is not used here ({problem}); decoding stays eager", stacklevel=2)
        return False
    model.cpu_decoder = decoder
    return True


def _check_kernel(model: GPTModel, check_speed: bool) -> tuple[str | None, KernelDecoder | None]:
    """(what is wrong with the kernel on this model and machine, or None; the decoder)."""
    problem, decoder, was_training, previous = None, None, model.training, model.cpu_decoder
    try:
        model.cpu_decoder = None  # the check's reference is the eager forward
        decoder = KernelDecoder(model)
        model.eval()
        with torch.inference_mode():
            ids = torch.tensor([[0, 1]])
            cache = model.make_kv_cache(1, 3)
            model(ids[:, :1], kv_cache=cache)
            got = decoder(model, ids[:, 1:], cache).float()
            want = model(ids, last_only=True).float()
        if not torch.allclose(got, want, atol=5e-2, rtol=5e-2):
            problem = f"the kernel differs from the eager forward by {(got - want).abs().max():.3g}"
        elif check_speed:
            ratio, pairs = speed_check(model, decoder)
            if ratio > SPEED_MARGIN:
                problem = (f"its decoding step measured {ratio:.2f}x the eager step's time here (median of "
                           f"{pairs} pairs; it is kept from {SPEED_MARGIN:.2f}x down)")
    except (OSError, RuntimeError) as exc:  # no compiler, no OpenMP, a failed build or load: stay eager
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        model.train(was_training)
        model.cpu_decoder = previous
    return problem, decoder
