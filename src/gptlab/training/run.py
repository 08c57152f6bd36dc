"""A training run on disk, as `gptlab train` makes it: check the folder, read the data, build the
model, lock the folder and hand everything to the loop (`training.loop.train`).

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

import numpy as np
import torch

from ..config import GPTConfig
from ..data.prepared import prepared_folder, prepared_split
from ..data.text import DataSplit, load_documents, make_loaders, tokenize_documents
from ..errors import GptlabError, UsageError
from ..hardware import resolve_device
from ..model import GPTModel, unwrap_model
from ..pretrained import load_pretrained
from ..pretrained.native import CONFIG_NAME, WEIGHTS_NAME
from ..pretrained.resolve import resolve_config
from ..storage.files import RunLock, remove_stale_temp_files, write_json
from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, check_same_config, read_checkpoint
from .loop import train
from .optim import make_precision, planned_steps
from .report import METRICS_NAME, PLOT_NAME
from .settings import RunConfig, TrainConfig, TrainResult, split_settings

TRAIN_CONFIG_NAME = "train_config.json"
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, WEIGHTS_NAME, TRAIN_CONFIG_NAME, METRICS_NAME, PLOT_NAME)
# Settings that fix the data order and the model: a resumed run must keep them.
# The main job's sample after each epoch: how the built-in corpus (Python's docs) often begins a sentence.
BUILTIN_SAMPLE_PROMPT = "A function"
FIXED_ON_RESUME = ("data", "val_fraction", "batch_size", "context_length", "stride", "init", "grad_accum", "seed")


def run_training(run_cfg: RunConfig, cfg: TrainConfig, out: str | os.PathLike | None = None, *,
                 resume: bool = False, force: bool = False, log=print) -> TrainResult:
    """Train as `gptlab train` does: check, load data, build the model, train into `out`, resume."""
    out = Path(out) if out is not None else default_out_dir()
    check_out_dir(out, resume, force)
    # Settled before joining the job, so a wrong --strategy fails at once on every rank.
    strategy = D.pick_strategy(run_cfg.strategy, log if os.environ.get("RANK", "0") == "0" else _quiet)
    info = D.setup(resolve_device(cfg.device))
    if not info.is_main:
        log = _quiet  # only rank 0 of a torchrun job talks
    make_precision(cfg.dtype, info.device)  # an unsupported --dtype fails now, not after loading data
    checkpoint = read_checkpoint(out / CHECKPOINT_NAME) if resume else None
    seed_everything(cfg.seed)
    model = build_model(run_cfg)
    if checkpoint is not None:
        check_same_config(checkpoint, model.config, f"checkpoint in {out}")
        D.check_world_size(checkpoint["extra"].get("world_size", 1))
    split = prepare_data(run_cfg, cfg.seed, model.config, info.device)
    if checkpoint is not None and checkpoint["extra"].get("data_fingerprint") not in (None, split.fingerprint):
        raise UsageError(f"the training data changed since the run in {out} started; resume needs the same data")
    if cfg.sample_prompt is None and not run_cfg.data:
        cfg = dataclasses.replace(cfg, sample_prompt=BUILTIN_SAMPLE_PROMPT)
    if cfg.decay_steps is None:  # fix the cosine length now, so a later --max-steps does not reshape it
        steps_per_epoch = math.ceil(len(split.train_loader) / cfg.grad_accum)
        cfg = dataclasses.replace(cfg, decay_steps=planned_steps(cfg, steps_per_epoch))
    _log_plan(log, split, run_cfg, model, info, strategy, out)
    model = D.prepare_model(model, strategy, info.device, run_cfg.compile_backend if run_cfg.compile else None)
    D.barrier()  # every rank has checked --out before rank 0 writes into it
    with RunLock(out) if info.is_main else contextlib.nullcontext():
        if info.is_main:
            _write_run_files(out, resume, model, run_cfg, cfg)
        with D.translate_errors(info.rank):
            return train(model, split.train_loader, split.val_loader, cfg, device=info.device, out_dir=out,
                         resume=resume, run_info={"data_fingerprint": split.fingerprint,
                                                  "world_size": info.world_size})


def _log_plan(log, split: DataSplit, run_cfg: RunConfig, model: GPTModel, info: D.DistInfo, strategy: str,
              out: Path) -> None:
    log(f"data: {split.total_tokens:,} tokens ({split.train_tokens:,} train, {split.val_tokens:,} validation); "
        f"{len(split.train_loader)} batches of {run_cfg.batch_size} x {context_of(split)} per epoch"
        + (f" on each of {info.world_size} ranks ({strategy})" if info.world_size > 1 else ""))
    log(f"model: {model.num_parameters():,} parameters; device {info.device}; output {out}")


def _write_run_files(out: Path, resume: bool, model: torch.nn.Module, run_cfg: RunConfig, cfg: TrainConfig) -> None:
    """Under the lock: clear a replaced run, drop a killed writer's leftovers, write config and settings."""
    if not resume:
        remove_run_files(out, RUN_FILES)
    remove_stale_temp_files(out, RUN_FILES)
    unwrap_model(model).config.save(out / CONFIG_NAME)
    write_json(out / TRAIN_CONFIG_NAME, {**run_cfg.to_dict(), **cfg.to_dict()})


def _quiet(*args, **kwargs) -> None:
    """The log function of ranks other than 0."""


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


def load_saved_settings(out: Path) -> tuple[RunConfig, TrainConfig]:
    path = out / TRAIN_CONFIG_NAME
    try:
        return split_settings(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing, so the run cannot be resumed; start a new run") from None
    except (json.JSONDecodeError, TypeError, UsageError) as exc:
        raise GptlabError(f"{path} is damaged ({exc}); start a new run with --force") from None


def resume_settings(out: Path, explicit: dict) -> tuple[RunConfig, TrainConfig]:
    """The run's saved settings with the options given now laid over them."""
    saved_run, saved_train = load_saved_settings(out)
    saved = {**saved_run.to_dict(), **saved_train.to_dict()}
    for name in FIXED_ON_RESUME:
        if name in explicit and explicit[name] != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} cannot change when resuming (the run used {saved[name]!r}); "
                "leave it out, or start a new run in another --out"
            )
    return split_settings({**saved, **explicit})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(run_cfg: RunConfig) -> GPTModel:
    """Random weights for a preset/config.json (`--model`), or the weights of `--init`."""
    if run_cfg.init:
        base = load_pretrained(run_cfg.init).train()
        config = base.config.replace(drop_rate=run_cfg.drop_rate)
        if config == base.config:
            return base
        model = GPTModel(config)
        model.load_state_dict(base.state_dict())
        return model
    config = resolve_config(run_cfg.model)
    context = run_cfg.context_length or config.context_length
    check_context(context, config.context_length)
    # A fresh model gets exactly the training context: positions it never trains on would be noise.
    return GPTModel(config.replace(context_length=context, drop_rate=run_cfg.drop_rate,
                                   vocab_multiple=run_cfg.vocab_multiple))


def check_context(context: int, maximum: int) -> None:
    if context > maximum:
        raise UsageError(f"--context-length {context} is above the model's maximum of {maximum}; lower it "
                         "(or use a config.json with a larger context_length)")


def prepare_data(run_cfg: RunConfig, seed: int, model_config: GPTConfig,
                 device: torch.device | None = None) -> DataSplit:
    """Train and validation loaders: a prepared folder's token files, or text files tokenized now."""
    context = run_cfg.context_length or model_config.context_length
    check_context(context, model_config.context_length)
    folder = prepared_folder(run_cfg.data)
    if folder is not None:  # memory-mapped token files; each rank reads its own share of every global batch
        return prepared_split(folder, context_length=context, stride=run_cfg.stride, batch_size=run_cfg.batch_size,
                              seed=seed, vocab_size=model_config.vocab_size, rank=D.get_rank(),
                              world_size=D.get_world_size(), device=device)
    if D.get_world_size() > 1:
        raise UsageError("training on several ranks reads a prepared folder (each rank its own windows); "
                         "run gptlab prepare --data ... --out DIR, then train with --data DIR")
    ids = tokenize_documents(load_documents(run_cfg.data))
    if ids.numel() and int(ids.max()) >= model_config.vocab_size:
        raise UsageError(f"the model's vocabulary ({model_config.vocab_size}) is smaller than the GPT-2 "
                         "tokenizer's (50257); use vocab_size 50257")
    return make_loaders(ids, batch_size=run_cfg.batch_size, max_length=context, stride=run_cfg.stride,
                        val_fraction=run_cfg.val_fraction, seed=seed, num_workers=run_cfg.num_workers)


def context_of(split: DataSplit) -> int:
    dataset = split.train_loader.dataset
    return getattr(dataset, "max_length", None) or dataset.context_length


def remove_run_files(out: Path, names: Iterable[str]) -> None:
    """--force: clear a previous run's files (only gptlab's own, never anything else in the folder)."""
    for name in names:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
