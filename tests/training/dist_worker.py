"""A minimal training loop run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/training/dist_worker.py MODE TOKENS OUT

MODE train: 3 AdamW steps under DDP, then under FSDP (2 micro-steps of gradient accumulation per
step, the first without gradient sync); writes losses and full model/optimizer states into OUT.
MODE fail: rank 1 raises at once. MODE hang: rank 1 sleeps while rank 0 waits in a collective.
Imports are absolute: the file runs as a script; the test imports its helpers too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import GPTConfig, GPTModel
from gptlab.data.tokenfile import TokenFileDataset, WindowBatchSampler, iter_batches
from gptlab.errors import GptlabError

# No qkv bias: the key bias has an exactly-zero true gradient (softmax ignores a constant shift), so
# AdamW would turn its rounding noise into lr-sized steps and weights could not be compared.
CONFIG = GPTConfig(
    vocab_size=512, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False
)
MICRO = 2  # windows per rank per micro-step
ACCUM = 2  # micro-steps per optimizer step
STEPS = 3
LR = 1e-2


def make_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(CONFIG)


def loss_of(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def reference_run(tokens: str, steps: int, global_batch: int) -> tuple[list[float], GPTModel, torch.optim.Optimizer]:
    """One process, one batch of `global_batch` windows per step: what the ranks together must match."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    data = TokenFileDataset(tokens, CONFIG.context_length)
    batches = iter_batches(data, WindowBatchSampler(len(data), global_batch, seed=7))
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        loss = loss_of(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model, opt


def _grad_checksum(model) -> float:
    from gptlab.model import unwrap_model

    grad = unwrap_model(model).trf_blocks[0].ff.fc.weight.grad
    return float(grad.double().abs().sum()) if grad is not None else float("nan")


def distributed_run(
    strategy: str, tokens: str, info, steps: int = STEPS, resume: dict | None = None, save_dir: Path | None = None
) -> dict:
    """`steps` optimizer steps; with `resume` (a checkpoint held by rank 0 only), continue after STEPS.

    `save_dir`: also save the trained model in gptlab's format there (rank 0 writes).
    """
    from gptlab.training import distributed as D

    model = D.wrap_model(make_model(), strategy, info.device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    done = 0
    if resume is not None:
        # Only rank 0 holds the checkpoint (as if only it could read the file): the loaders broadcast it.
        D.load_model_state_dict(model, resume["model"] if info.is_main else {})
        D.load_optimizer_state_dict(model, opt, resume["optim"] if info.is_main else {})
        done = STEPS
    data = TokenFileDataset(tokens, CONFIG.context_length)
    start = done * MICRO * ACCUM * info.world_size
    sampler = WindowBatchSampler(len(data), MICRO, seed=7, rank=info.rank, world_size=info.world_size, start=start)
    batches = iter_batches(data, sampler)
    losses, unsynced, synced = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for micro in range(ACCUM):
            x, y = next(batches)
            last = micro == ACCUM - 1
            with D.gradient_sync(model, enabled=last):
                loss = loss_of(model, x, y) / ACCUM
                loss.backward()
            total += loss.item()
            if strategy == "ddp":
                # Gather every rank's local gradient checksum: different before the sync, equal after.
                sums = [None] * info.world_size
                torch.distributed.all_gather_object(sums, _grad_checksum(model))
                (synced if last else unsynced).append(sums)
        opt.step()
        losses.append(D.all_reduce_mean(total))
    if save_dir is not None:
        D.save_model_distributed(model, save_dir)
    return {"losses": losses, "unsynced": unsynced, "synced": synced,
            "model": D.model_state_dict(model), "optim": D.optimizer_state_dict(model, opt)}


def main() -> int:
    from gptlab.training import distributed as D

    mode, tokens, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    try:
        if mode == "fail":
            if info.rank == 1:
                raise GptlabError("rank 1 failed on purpose")
            D.all_reduce_mean(1.0)  # waits for rank 1, which never comes
        elif mode == "hang":
            if info.rank == 1:
                time.sleep(120)
            D.all_reduce_mean(1.0)
        else:
            results, saved = {}, {}
            for strategy in ("ddp", "fsdp"):
                run = distributed_run(strategy, tokens, info, save_dir=out / f"{strategy}_model")
                saved[strategy] = {"model": run.pop("model"), "optim": run.pop("optim")}
                if info.is_main:
                    torch.save(saved[strategy], out / f"{strategy}.pt")
                results[strategy] = {k: v for k, v in run.items() if k in ("losses", "unsynced", "synced")}
            # Resume one step from the OTHER strategy's checkpoint: the full form is strategy-independent.
            for strategy, other in (("ddp", "fsdp"), ("fsdp", "ddp")):
                run = distributed_run(strategy, tokens, info, steps=1, resume=saved[other])
                results[f"{strategy}_resumed_from_{other}"] = run["losses"]
            if info.is_main:
                (out / "results.json").write_text(json.dumps(results))
    except GptlabError as exc:
        print(f"dist_worker (rank {info.rank}): error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if mode == "train":
            D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
