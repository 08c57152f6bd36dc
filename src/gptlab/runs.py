"""A training run on disk: settings, data, model, output folder and resume, around `gptlab.train.train`.

A run folder is also a model folder (config.json + model.safetensors), so `gptlab eval` and
`gptlab generate` take it as `--model`. Everything is validated before the folder is touched, so a
bad option never leaves a half-made run behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_same_config,
    model_of,
    read_checkpoint,
)
from .config import GPTConfig
from .data import DataSplit, load_documents, make_loaders, tokenize_documents
from .device import resolve_device
from .errors import GptlabError, UsageError
from .fileio import RunLock, write_json
from .model import GPTModel
from .train import METRICS_NAME, PLOT_NAME, TrainConfig, TrainResult, make_precision, planned_steps, train

TRAIN_CONFIG_NAME = "train_config.json"
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, WEIGHTS_NAME, TRAIN_CONFIG_NAME, METRICS_NAME, PLOT_NAME)
# Settings that fix the data order and the model: a resumed run must keep them.
FIXED_ON_RESUME = ("data", "val_fraction", "batch_size", "context_length", "stride", "init", "grad_accum", "seed")


def default_out_dir(root: str | os.PathLike = "runs") -> Path:
    """runs/<date>-<time>, with a suffix if that folder already exists."""
    base = Path(root) / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to resume where there is no checkpoint, or to start a run over another one."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"--out {out} cannot be created: {blocker} is a file; choose another folder")
    if resume:
        if not (out / CHECKPOINT_NAME).is_file():
            raise UsageError(f"nothing to resume in {out}: it has no {CHECKPOINT_NAME}; start a new run without --resume")
        return
    if out.is_dir() and not force:
        entries = [p.name for p in out.iterdir() if p.name != ".lock"]
        if entries:
            what = "another run" if {TRAIN_CONFIG_NAME, CHECKPOINT_NAME} & set(entries) else "other files"
            raise UsageError(
                f"--out {out} already holds {what}; continue it with --resume, overwrite it with --force, "
                "or choose another --out"
            )


def load_saved_settings(out: Path) -> TrainConfig:
    path = out / TRAIN_CONFIG_NAME
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing, so the run cannot be resumed; start a new run") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise GptlabError(f"{path} is damaged ({exc}); start a new run with --force") from None


def resume_settings(out: Path, explicit: dict) -> TrainConfig:
    """The run's saved settings with the options given now laid over them."""
    saved = load_saved_settings(out)
    for name in FIXED_ON_RESUME:
        if name in explicit and explicit[name] != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} cannot change when resuming (the run used {getattr(saved, name)!r}); "
                "leave it out, or start a new run in another --out"
            )
    return dataclasses.replace(saved, **explicit)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig) -> GPTModel:
    """Random weights for a preset/config.json (`--model`), or the weights of `--init`."""
    from .commands.models import resolve_config
    from .pretrained import load_pretrained

    if cfg.init:
        base = load_pretrained(cfg.init).train()
        config = base.config.replace(drop_rate=cfg.drop_rate)
        if config == base.config:
            return base
        model = GPTModel(config)
        model.load_state_dict(base.state_dict())
        return model
    config = resolve_config(cfg.model)
    context = cfg.context_length or config.context_length
    check_context(context, config.context_length)
    # A fresh model gets exactly the training context: positions it never trains on would be noise.
    return GPTModel(config.replace(context_length=context, drop_rate=cfg.drop_rate,
                                   vocab_multiple=cfg.vocab_multiple))


def check_context(context: int, maximum: int) -> None:
    if context > maximum:
        raise UsageError(f"--context-length {context} is above the model's maximum of {maximum}; lower it "
                         "(or use a config.json with a larger context_length)")


def prepare_data(cfg: TrainConfig, model_config: GPTConfig, device: torch.device | None = None) -> DataSplit:
    from .distributed import get_rank, get_world_size
    from .train_data import prepared_folder, prepared_split

    context = cfg.context_length or model_config.context_length
    check_context(context, model_config.context_length)
    folder = prepared_folder(cfg.data)
    if folder is not None:  # memory-mapped token files; each rank reads its own share of every global batch
        return prepared_split(folder, context_length=context, stride=cfg.stride, batch_size=cfg.batch_size,
                              seed=cfg.seed, vocab_size=model_config.vocab_size, rank=get_rank(),
                              world_size=get_world_size(), device=device)
    if get_world_size() > 1:
        raise UsageError("training on several ranks reads a prepared folder (each rank its own windows); "
                         "run gptlab prepare --data ... --out DIR, then train with --data DIR")
    ids = tokenize_documents(load_documents(cfg.data))
    if ids.numel() and int(ids.max()) >= model_config.vocab_size:
        raise UsageError(f"the model's vocabulary ({model_config.vocab_size}) is smaller than the GPT-2 "
                         "tokenizer's (50257); use vocab_size 50257")
    return make_loaders(ids, batch_size=cfg.batch_size, max_length=context, stride=cfg.stride,
                        val_fraction=cfg.val_fraction, seed=cfg.seed, num_workers=cfg.num_workers)


def run_training(
    cfg: TrainConfig,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    log=print,
) -> TrainResult:
    """Train as `gptlab train` does: check, load data, build the model, train into `out`, resume."""
    out = Path(out) if out is not None else default_out_dir()
    check_out_dir(out, resume, force)
    from . import dist_train
    from .distributed import barrier, translate_errors

    # Settled before joining the job, so a wrong --strategy fails at once on every rank.
    strategy = dist_train.pick_strategy(cfg.strategy, log if os.environ.get("RANK", "0") == "0" else _quiet)
    info = dist_train.setup(resolve_device(cfg.device))
    device = info.device
    if not info.is_main:
        log = _quiet  # only rank 0 of a torchrun job talks
    make_precision(cfg.dtype, device)  # an unsupported --dtype fails now, not after loading data
    checkpoint = read_checkpoint(out / CHECKPOINT_NAME) if resume else None
    seed_everything(cfg.seed)
    model = build_model(cfg)
    if checkpoint is not None:
        check_same_config(checkpoint, model.config, f"checkpoint in {out}")
    if checkpoint is not None:
        dist_train.check_world_size(checkpoint["extra"].get("world_size", 1))
    split = prepare_data(cfg, model.config, device)
    if checkpoint is not None and checkpoint["extra"].get("data_fingerprint") not in (None, split.fingerprint):
        raise UsageError(f"the training data changed since the run in {out} started; resume needs the same data")
    steps_per_epoch = math.ceil(len(split.train_loader) / cfg.grad_accum)
    if cfg.decay_steps is None:  # fix the cosine length now, so a later --max-steps does not reshape it
        cfg = dataclasses.replace(cfg, decay_steps=planned_steps(cfg, steps_per_epoch))
    log(f"data: {split.total_tokens:,} tokens ({split.train_tokens:,} train, {split.val_tokens:,} validation); "
        f"{len(split.train_loader)} batches of {cfg.batch_size} x {context_of(split)} per epoch"
        + (f" on each of {info.world_size} ranks ({strategy})" if info.world_size > 1 else ""))
    log(f"model: {model.num_parameters():,} parameters; device {device}; output {out}")
    model = dist_train.prepare_model(model, strategy, device, cfg.compile_backend if cfg.compile else None)
    barrier()  # every rank has checked --out before rank 0 writes into it
    with RunLock(out) if info.is_main else contextlib.nullcontext():
        if info.is_main:
            if not resume:
                remove_run_files(out, RUN_FILES)
            remove_stale_temp_files(out)
            model_of(model).config.save(out / CONFIG_NAME)
            write_json(out / TRAIN_CONFIG_NAME, cfg.to_dict())
        with translate_errors(info.rank):
            return train(model, split.train_loader, split.val_loader, cfg, device=device, out_dir=out,
                         resume=resume, run_info={"data_fingerprint": split.fingerprint,
                                                  "world_size": info.world_size})


def _quiet(*args, **kwargs) -> None:
    """The log function of ranks other than 0."""


def context_of(split: DataSplit) -> int:
    dataset = split.train_loader.dataset
    return getattr(dataset, "max_length", None) or dataset.context_length


def remove_stale_temp_files(out: Path) -> None:
    """Temporary files a killed run left behind (never under a final name); safe to drop under the lock."""
    for name in RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def remove_run_files(out: Path, names: Iterable[str]) -> None:
    """--force: clear a previous run's files (only gptlab's own, never anything else in the folder)."""
    for name in names:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
