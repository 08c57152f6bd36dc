"""How decoding runs fast: the C kernel for batch-1 steps on CPU, compiled steps over static caches (GPU), and the eager weights' layout."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..hardware import huge_page_buffer
from ..model import GPTModel
from .kernel import use_kernel_decoding

KERNEL_CHOICES = ("auto", "on", "off")


def prepare_for_decoding(model: GPTModel, kernel: str = "auto", compile: bool = False,
                         max_batch: int = 8) -> GPTModel:
    """Make decoding faster; results stay the same up to float rounding. Returns `model`.

    compile=True: single-token steps of batches up to `max_batch` run compiled with torch.compile over
    static caches, in a CUDA graph on a GPU (generation/compiled.py); the first steps of each batch size
    pay the compilation.

    kernel "auto" (default) or "on": each batch-1 step on CPU (float32 or bfloat16 weights; single
    tokens and prompts of up to 64 tokens) runs in a small C kernel (generation/kernel.py) over its
    own repacked copy of the weights, built with the machine's C compiler the first time (~0.3 s,
    then cached). It streams the weights close to the machine's read bandwidth, and costs a second
    copy of the weights in memory; longer prompts, batches, training and other devices keep the
    eager forward. Where the kernel cannot run (no C compiler with OpenMP, an unsupported dtype),
    "auto" falls back silently and "on" warns; "off" never uses it (bench/README.md has the speeds).

    Without the kernel, float32 CPU Linear weights whose output is at least as wide as their input
    (qkv, MLP up-projection, LM head) are stored column-major in place: one token at a time every
    Linear is a matrix-vector product, and MKL streams `x @ W` faster with W laid out (in, out), as
    GPT-2's original Conv1D layers keep it, than over nn.Linear's (out, in) rows. Values, shapes,
    tied weights and saved files are unchanged (saving makes tensors contiguous); only strides
    change. bfloat16 weights are left alone. The CPU weights then move into memory backed by 2 MiB
    pages where Linux allows it (`move_weights_to_huge_pages`): reading them once per token goes
    faster there.
    """
    if kernel not in KERNEL_CHOICES:
        raise UsageError(f"kernel must be one of {', '.join(KERNEL_CHOICES)}, got {kernel!r}")
    if compile:
        from .compiled import CompiledDecoder

        model.compiled_decoder = CompiledDecoder(model, max_batch=max_batch)
    # "auto" keeps the kernel only where a quick timing says it beats eager decoding; "on" uses it anyway.
    if kernel != "off" and use_kernel_decoding(model, warn=kernel == "on", check_speed=kernel == "auto"):
        return model
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.in_features <= module.out_features:
            w = module.weight
            if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() and w.dim() == 2:
                w.data = w.data.t().contiguous().t()
    move_weights_to_huge_pages(model)
    return model


def move_weights_to_huge_pages(model: nn.Module) -> int:
    """Move the model's CPU parameters into one block of 2 MiB pages; returns the bytes moved (0: nothing done).

    Batch-1 decoding reads every weight once per token. With Linux's default 4 KiB pages that
    is ~120k pages (gpt2-small, float32) per token, and TLB misses cap the read speed: on the
    development VM a matrix-vector product read 23-26 GB/s from 4 KiB pages and 31-38 GB/s from
    2 MiB pages, the same code and bytes (bench/README.md). Values, shapes, strides and tied
    weights stay as they were; only where the bytes live changes. Parameters that are not dense
    (views with gaps) stay where they are.
    """
    params = []
    for p in model.parameters():  # a tied weight comes once
        dense = p.is_contiguous() or (p.dim() == 2 and p.t().is_contiguous())
        if p.device.type == "cpu" and not p.is_meta and dense and p.numel():
            params.append(p)
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in params]  # 64-byte aligned slots
    block = huge_page_buffer(sum(sizes))
    if block is None:
        return 0
    offset = 0
    with torch.no_grad():
        for p, size in zip(params, sizes, strict=True):
            nbytes = p.numel() * p.element_size()
            slot = block[offset : offset + nbytes].view(p.dtype).as_strided(p.shape, p.stride())
            slot.copy_(p.data)
            p.data = slot
            offset += size
    return offset
