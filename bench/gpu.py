"""GPU numbers in one short run: gpt2-small training MFU, eval and batch-1 decoding beside transformers.

    python -m bench.gpu [--steps 20] [--json OUT.json]

Random weights of the real shapes (speed does not depend on the values). Training: batch 8 x 1024,
bf16 autocast, fused AdamW, eager and torch.compile. Decoding: 16-token prompt, 128 new tokens, greedy,
KV cache, batch 1, float32 and bfloat16 weights, against GPT2LMHeadModel.generate in the same process.
Times are CUDA-synchronised medians; MFU uses 6*N + attention FLOPs per token and the card's
dense bf16 peak from gptlab.hardware.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from gptlab import GPTModel
from gptlab.config import get_preset
from gptlab.generation.generate import generate
from gptlab.hardware import lookup_peak_tflops
from gptlab.model import flops_per_token
from gptlab.training.optim import build_optimizer
from gptlab.training.settings import TrainConfig


def cuda_time(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def train_rate(compiled: bool, steps: int, batch: int = 8, seq: int = 1024) -> float:
    torch.manual_seed(0)
    model = GPTModel(get_preset("gpt2-small", drop_rate=0.0)).cuda()
    loss_fn = torch.compile(model.loss) if compiled else model.loss
    opt = build_optimizer(model, TrainConfig(), torch.device("cuda"))
    x = torch.randint(0, 50257, (batch, seq), device="cuda")
    y = torch.randint(0, 50257, (batch, seq), device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    times = cuda_time(step, warmup=3, repeats=steps)
    return batch * seq / statistics.median(times)


def eval_rate(batch: int = 16, seq: int = 1024) -> float:
    model = GPTModel(get_preset("gpt2-small", drop_rate=0.0)).cuda().eval()
    x = torch.randint(0, 50257, (batch, seq), device="cuda")

    def run() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.loss(x, x)

    return batch * seq / statistics.median(cuda_time(run, 3, 10))


def decode_rates(dtype: torch.dtype, new: int = 128) -> dict:
    import transformers

    torch.manual_seed(0)
    ours = GPTModel(get_preset("gpt2-small", drop_rate=0.0)).eval()
    hf_cfg = transformers.GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours, hf = ours.to("cuda", dtype), hf.to("cuda", dtype)
    prompt = torch.randint(0, 50257, (1, 16), device="cuda")
    mask = torch.ones_like(prompt)

    def run_ours() -> None:
        generate(ours, prompt, max_new_tokens=new)

    def run_hf() -> None:
        hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    use_cache=True, pad_token_id=0)

    return {name: new / statistics.median(cuda_time(fn, 2, 5)) for name, fn in
            (("gptlab", run_ours), ("transformers", run_hf))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible; run this on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = lookup_peak_tflops(name, "bfloat16")
    fpt = flops_per_token(get_preset("gpt2-small"), 1024)
    out: dict = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak}
    for compiled in (False, True):
        rate = train_rate(compiled, args.steps)
        key = "train_compiled" if compiled else "train_eager"
        out[key] = {"tokens_per_s": rate, "mfu": rate * fpt / (peak * 1e12) if peak else None}
        print(key, out[key], flush=True)
    out["eval_bf16_tokens_per_s"] = eval_rate()
    print("eval", out["eval_bf16_tokens_per_s"], flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        key = f"decode_b1_{str(dtype).removeprefix('torch.')}"
        out[key] = decode_rates(dtype)
        print(key, out[key], flush=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
