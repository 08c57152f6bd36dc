"""A training run on disk, as `gptlab train` makes it: check the folder, read the data, build the
model, lock the folder and hand everything to the loop (`training.loop.train`).

A run folder is also a model folder (config.json + model.safetensors, and the tokenizer's files when
it is not GPT-2's), so `gptlab eval` and `gptlab generate` take it as `--model`. Everything is
validated before the folder is touched, so a bad option never leaves a half-made run behind.

The steps (`open_run_folder`, `start_run`, `check_model`, `check_data`, `fix_schedule`, `launch`) are
shared with `gptlab finetune` (finetune/run.py), which differs only in how it builds the model and the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import GPTConfig
from ..data.prepared import prepared_folder, prepared_split
from ..data.text import (
    DataSplit,
    data_files,
    is_corpus_name,
    load_documents,
    make_loaders,
    tokenize_documents,
)
from ..data.tokenfile import META_NAME, TRAIN_NAME, VAL_NAME
from ..errors import GptlabError, UsageError
from ..hardware import resolve_device
from ..model import GPTModel, unwrap_model
from ..pretrained import load_pretrained, model_tokenizer
from ..pretrained.native import CONFIG_NAME, WEIGHTS_NAME
from ..pretrained.resolve import RANDOM_PREFIX, is_random_spec, load_model_arg, resolve_config
from ..storage.download import sha256_file
from ..storage.files import RunLock, remove_stale_temp_files, write_json
from ..tokenizer import (
    Tokenizer,
    as_tokenizer,
    get_tokenizer,
    has_tokenizer,
    same_tokenizer,
    tokenizer_of,
    write_tokenizer,
)
from ..tokenizer.base import describe
from ..tokenizer.folder import TOKENIZER_FILES
from ..tokenizer.gpt2 import GPT2_NAME
from . import distributed as D
from .autobatch import settle_batch
from .checkpoint import CHECKPOINT_NAME, check_same_config, read_checkpoint
from .loop import train
from .optim import make_precision, planned_steps
from .report import METRICS_NAME, PLOT_NAME
from .settings import AUTO, RunConfig, TrainConfig, TrainResult, split_settings

TRAIN_CONFIG_NAME = "train_config.json"
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, WEIGHTS_NAME, TRAIN_CONFIG_NAME, METRICS_NAME, PLOT_NAME, *TOKENIZER_FILES)
# The main job's sample after each epoch: how the built-in corpus (Python's docs) often begins a sentence.
BUILTIN_SAMPLE_PROMPT = "A function"
# Settings that fix the data order and the model: a resumed run must keep them.
FIXED_ON_RESUME = ("data", "val_fraction", "batch_size", "global_batch", "context_length", "stride", "init",
                   "grad_accum", "seed")
# Tensor cores multiply whole tiles: a vocabulary of 50,304 rows runs faster than one of 50,257.
GPU_VOCAB_MULTIPLE = 64
# Settings that name files or folders: stored absolute (`absolute_paths`).
PATH_SETTINGS = ("data", "model", "init", "val_data", "adapter", "tokenizer")


def run_training(run_cfg: RunConfig, cfg: TrainConfig, out: str | os.PathLike | None = None, *,
                 resume: bool = False, force: bool = False, log=print) -> TrainResult:
    """Train as `gptlab train` does: check, load data, build the model, train into `out`, resume."""
    out = open_run_folder(out, resume, force)
    if resume:
        check_data_unchanged(run_cfg.data_files or [])
    else:
        run_cfg = absolute_paths(run_cfg)
        run_cfg = dataclasses.replace(run_cfg, data_files=record_data(run_cfg.data))
    tokenizer, run_cfg = run_tokenizer(run_cfg, out, resume)
    start = start_run(out, cfg, run_cfg.strategy, resume, log)
    model = build_model(run_cfg, tokenizer, start.info.device)
    check_model(start, model)
    run_cfg, cfg = settle_batch(run_cfg, cfg, model, start.info.device, start.dtype, start.info.world_size,
                                start.log)
    split = prepare_data(run_cfg, cfg.seed, model.config, start.info.device, tokenizer)
    check_data(start, split.fingerprint)
    if cfg.sample_prompt is None:
        cfg = dataclasses.replace(cfg, sample_prompt=BUILTIN_SAMPLE_PROMPT if not run_cfg.data else
                                  validation_start(split, tokenizer))
    cfg = fix_schedule(cfg, len(split.train_loader))
    _log_plan(start.log, split, run_cfg, model, start.info, start.strategy, start.out)
    return launch(start, model, cfg, split.train_loader, split.val_loader,
                  settings={**run_cfg.to_dict(), **cfg.to_dict()}, run_files=RUN_FILES,
                  compile_backend=run_cfg.compile_backend if run_cfg.compile else None,
                  run_info={"data_fingerprint": split.fingerprint})


# --- the steps every run on disk takes (`gptlab train`, `gptlab finetune`) --------------------------


def open_run_folder(out: str | os.PathLike | None, resume: bool, force: bool) -> Path:
    """The run folder (default runs/<date>-<time>), checked: nothing is written yet."""
    out = Path(out) if out is not None else default_out_dir()
    check_out_dir(out, resume, force)
    return out


@dataclass
class RunStart:
    """A run folder checked and this process joined to its job, before any model or data is read."""

    out: Path
    info: D.DistInfo
    strategy: str
    checkpoint: dict | None  # the run's checkpoint when resuming
    log: Callable[..., None]  # print on rank 0, silent elsewhere
    dtype: torch.dtype  # the autocast dtype --dtype resolves to on this device


def start_run(out: Path, cfg: TrainConfig, strategy: str | None, resume: bool, log=print) -> RunStart:
    """Settle the strategy, join the torchrun job (if any), read the checkpoint, seed the RNGs."""
    # Settled before joining the job, so a wrong --strategy fails at once on every rank.
    strategy = D.pick_strategy(strategy, log if os.environ.get("RANK", "0") == "0" else _quiet)
    info = D.setup(resolve_device(cfg.device))
    if not info.is_main:
        log = _quiet  # only rank 0 of a torchrun job talks
    dtype = make_precision(cfg.dtype, info.device).dtype  # an unsupported --dtype fails now, not after loading data
    checkpoint = read_checkpoint(out / CHECKPOINT_NAME) if resume else None
    seed_everything(cfg.seed)
    return RunStart(out, info, strategy, checkpoint, log, dtype)


def check_model(start: RunStart, model: GPTModel) -> None:
    """A resumed run must have the checkpoint's model, tokenizer and number of ranks."""
    if start.checkpoint is not None:
        check_same_config(start.checkpoint, model.config, f"checkpoint in {start.out}")
        D.check_world_size(start.checkpoint["extra"].get("world_size", 1))
        check_run_tokenizer(start.checkpoint["extra"].get("tokenizer"), tokenizer_of(model), start.out)


def check_data(start: RunStart, fingerprint: str) -> None:
    """A resumed run must read the data it started with."""
    if start.checkpoint is not None and start.checkpoint["extra"].get("data_fingerprint") not in (None, fingerprint):
        raise UsageError(f"the training data changed since the run in {start.out} started; resume needs the same data")


def fix_schedule(cfg: TrainConfig, n_batches: int) -> TrainConfig:
    """Fix the cosine length now (from the batches per epoch), so a later --max-steps does not reshape it."""
    if cfg.decay_steps is not None:
        return cfg
    return dataclasses.replace(cfg, decay_steps=planned_steps(cfg, math.ceil(n_batches / cfg.grad_accum)))


def launch(start: RunStart, model: torch.nn.Module, cfg: TrainConfig, train_loader, val_loader, *, settings: dict,
           run_files: tuple[str, ...], compile_backend: str | None = None, run_info: dict | None = None,
           write_files: Callable[[Path], None] | None = None,
           after: Callable[[torch.nn.Module, TrainResult], None] | None = None, **hooks) -> TrainResult:
    """Wrap/compile the model, lock the folder, write the run's files and train (then `after`, still locked).

    `settings` go to train_config.json, `write_files(out)` writes any further file of the run, and
    `hooks` (sample, extra_metrics) go to the loop.
    """
    info = start.info
    model = D.prepare_model(model, start.strategy, info.device, compile_backend)
    D.barrier()  # every rank has checked --out before rank 0 writes into it
    with RunLock(start.out) if info.is_main else contextlib.nullcontext():
        if info.is_main:
            _write_run_files(start.out, start.checkpoint is not None, model, settings, run_files)
            if write_files is not None:
                write_files(start.out)
        with D.translate_errors(info.rank):
            tokenizer = tokenizer_of(unwrap_model(model))
            run_info = {**(run_info or {}), "world_size": info.world_size,
                        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256}}
            result = train(model, train_loader, val_loader, cfg, device=info.device, out_dir=start.out,
                           resume=start.checkpoint is not None, run_info=run_info, **hooks)
            if after is not None:
                after(model, result)
    return result


def _log_plan(log, split: DataSplit, run_cfg: RunConfig, model: GPTModel, info: D.DistInfo, strategy: str,
              out: Path) -> None:
    log(f"data: {split.total_tokens:,} tokens ({split.train_tokens:,} train, {split.val_tokens:,} validation); "
        f"{len(split.train_loader)} batches of {run_cfg.batch_size} x {context_of(split)} per epoch"
        + (f" on each of {info.world_size} ranks ({strategy})" if info.world_size > 1 else ""))
    origin = "random weights" if not run_cfg.init and is_random_spec(run_cfg.model) else \
        f"the weights of {run_cfg.init or run_cfg.model}"
    log(f"model: {model.num_parameters():,} parameters, from {origin}; tokenizer {describe(tokenizer_of(model))}; "
        f"device {info.device}; output {out}")


def _write_run_files(out: Path, resume: bool, model: torch.nn.Module, settings: dict,
                     run_files: tuple[str, ...]) -> None:
    """Under the lock: clear a replaced run, drop a killed writer's leftovers, write config and settings."""
    if not resume:
        remove_run_files(out, run_files)
    remove_stale_temp_files(out)
    unwrap_model(model).config.save(out / CONFIG_NAME)
    write_tokenizer(tokenizer_of(unwrap_model(model)), out)
    write_json(out / TRAIN_CONFIG_NAME, settings)


def validation_start(split: DataSplit, tokenizer: Tokenizer | None = None, words: int = 4) -> str:
    """The first few words of the validation text: a sample prompt that belongs to the user's own corpus."""
    dataset = split.val_loader.dataset
    ids = dataset.token_ids if hasattr(dataset, "token_ids") else dataset.tokens
    tok = as_tokenizer(tokenizer)
    text = tok.decode([int(i) for i in ids[:32]]).replace(tok.eot_token, " ").replace("\ufffd", "")
    start = " ".join(text.split()[:words])
    return start if len(start) <= 40 else start[:12]  # scripts written without spaces: a few characters


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


def load_saved_settings(out: Path, run_cls: type = RunConfig) -> tuple[Any, TrainConfig]:
    """The settings in the run's train_config.json: (run_cls, TrainConfig)."""
    path = out / TRAIN_CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing, so the run cannot be resumed; start a new run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptlabError(f"{path} is damaged ({exc}); start a new run with --force") from None
    if isinstance(data, dict):  # "task" is a setting of fine-tuning runs only (finetune/settings.py)
        made_by, wanted = ("finetune" if "task" in names else "train" for names in (data, run_cls.field_names()))
        if made_by != wanted:
            raise UsageError(f"{out} is a run of gptlab {made_by}; continue it with gptlab {made_by} --out {out} "
                             "--resume")
    try:
        return split_settings(data, run_cls)
    except (TypeError, UsageError) as exc:
        raise GptlabError(f"{path} is damaged ({exc}); start a new run with --force") from None


def resume_settings(out: Path, explicit: dict, run_cls: type = RunConfig,
                    fixed: tuple[str, ...] = FIXED_ON_RESUME) -> tuple[Any, TrainConfig]:
    """The run's saved settings with the options given now laid over them (paths compared as absolute;
    `fixed` ones may not change)."""
    if explicit.get("batch_size") == AUTO:  # the run's micro-batch, found when it started
        explicit = {k: v for k, v in explicit.items() if k != "batch_size"}
    given_paths = {k: explicit[k] for k in PATH_SETTINGS if k in explicit}
    explicit = {**explicit, **{k: _absolute_if_path(v) for k, v in given_paths.items()}}
    saved_run, saved_train = load_saved_settings(out, run_cls)
    saved = {**saved_run.to_dict(), **saved_train.to_dict()}
    for name in fixed:
        if name in explicit and explicit[name] != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} cannot change when resuming (the run used {saved[name]!r}); "
                "leave it out, or start a new run in another --out"
            )
    if "tokenizer" in explicit:
        check_same_tokenizer(explicit.pop("tokenizer"), out)
    return split_settings({**saved, **explicit}, run_cls)


def check_same_tokenizer(spec: str, out: Path) -> None:
    """--tokenizer given again on --resume must be the run's own (compared by identity, not by path)."""
    given, own = get_tokenizer(spec), get_tokenizer(out)
    if not same_tokenizer(given, own):
        raise UsageError(f"--tokenizer cannot change when resuming (the run used {own.name}, not {given.name}); "
                         "leave it out, or start a new run in another --out")


def absolute_paths(run_cfg: Any) -> Any:
    """Data, --model and --init paths (and any other in PATH_SETTINGS the settings have) made absolute, so
    that a run resumes from any working folder. Corpus and model names stay names."""
    names = [n for n in PATH_SETTINGS if hasattr(run_cfg, n)]
    changes = {n: _absolute_if_path(getattr(run_cfg, n)) for n in names
               if not (n == "tokenizer" and getattr(run_cfg, n) == GPT2_NAME)}  # GPT-2's tokenizer, not a folder
    return dataclasses.replace(run_cfg, **changes)


def _absolute_if_path(spec: Any) -> Any:
    """A path that exists, made absolute (random:PATH too); a list of them, each; anything else as it is."""
    if isinstance(spec, list):
        return [_absolute_if_path(s) for s in spec]
    if spec is None or is_corpus_name(spec):
        return spec
    prefix = RANDOM_PREFIX if spec.startswith(RANDOM_PREFIX) else ""
    path = Path(spec[len(prefix):])
    return f"{prefix}{path.resolve()}" if path.exists() else spec


def record_data(data: list[str] | None) -> list[dict]:
    """Path, size and sha256 of every file the run reads (a prepared folder: meta.json, and the token files'
    sizes, since meta.json already holds the sha256 of every source)."""
    folder = prepared_folder(data)
    if folder is not None:
        files = [(folder / META_NAME, True), (folder / TRAIN_NAME, False), (folder / VAL_NAME, False)]
    else:
        files = [(path, True) for path in data_files(data)]
    return [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size,
             "sha256": sha256_file(p) if hashed else None} for p, hashed in files]


def check_data_unchanged(records: list[dict]) -> None:
    """Refuse to resume when a file the run read is gone or changed (by size or sha256)."""
    for record in records:
        path = Path(record["path"])
        if not path.is_file():
            raise UsageError(f"data file {path} is gone since the run started; put it back to resume, or start "
                             "a new run")
        size = path.stat().st_size
        if size != record["bytes"] or (record["sha256"] and sha256_file(path) != record["sha256"]):
            raise UsageError(f"data file {path} changed since the run started ({record['bytes']:,} bytes then, "
                             f"{size:,} now{'' if size != record['bytes'] else ', other content'}); resume "
                             "needs the same data: restore it, or start a new run")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(run_cfg: RunConfig, tokenizer: Tokenizer | None = None,
                device: torch.device | None = None) -> GPTModel:
    """The model to train: random weights for an architecture (a preset, a config.json, random:NAME), or
    the weights --init (or --model) names, as every verb reads --model (pretrained/resolve.py). A fresh
    model's vocabulary is the tokenizer's (GPT-2's by default), padded to a multiple of 64 on a GPU unless
    --vocab-multiple says otherwise; existing weights must share its tokenizer."""
    tok = as_tokenizer(tokenizer)
    spec = run_cfg.init or run_cfg.model
    if run_cfg.init or not is_random_spec(spec):
        base = load_init(spec, run_cfg.drop_rate)
        if not same_tokenizer(tokenizer_of(base), tok):
            raise UsageError(f"{spec} was trained with tokenizer {tokenizer_of(base).name}, not {tok.name}; leave "
                             "--tokenizer out to continue with the model's own")
        return base
    config = resolve_config(spec)
    context = run_cfg.context_length or config.context_length
    check_context(context, config.context_length)
    # A fresh model gets exactly the training context: positions it never trains on would be noise.
    on_gpu = device is not None and device.type == "cuda"
    multiple = run_cfg.vocab_multiple or (GPU_VOCAB_MULTIPLE if on_gpu and config.vocab_multiple == 1 else None)
    model = GPTModel(config.replace(context_length=context, drop_rate=run_cfg.drop_rate, vocab_multiple=multiple,
                                    vocab_size=tok.n_vocab))
    model.tokenizer = None if tok.name == GPT2_NAME else tok
    return model


def run_tokenizer(run_cfg: RunConfig, out: Path, resume: bool) -> tuple[Tokenizer, RunConfig]:
    """The run's tokenizer, and the settings with the choice recorded (a resumed run: its own copy in `out`).

    New run: --tokenizer; else the tokenizer of --init's (or --model's) weights; else the one stored in a
    prepared --data folder; else GPT-2's.
    """
    if resume:
        return get_tokenizer(out), run_cfg
    spec = run_cfg.tokenizer
    weights = run_cfg.init or (None if is_random_spec(run_cfg.model) else run_cfg.model)
    folder = prepared_folder(run_cfg.data)
    if spec is None and weights is not None:
        tok = model_tokenizer(weights)
        spec = weights
    else:
        if spec is None and folder is not None and has_tokenizer(folder):
            spec = str(folder)
        tok = get_tokenizer(spec)
    return tok, dataclasses.replace(run_cfg, tokenizer=GPT2_NAME if tok.name == GPT2_NAME else spec)


def check_run_tokenizer(saved: dict | None, tokenizer: Tokenizer, out: Path) -> None:
    """The tokenizer files of a run folder must still be those the run started with."""
    if saved and (saved.get("name"), saved.get("sha256")) != (tokenizer.name, tokenizer.sha256):
        raise UsageError(f"the tokenizer in {out} ({tokenizer.name}) is not the one the run was trained with "
                         f"({saved.get('name')}); restore its tokenizer.json and tokenizer_config.json")


def load_init(spec: str, drop_rate: float | None = None, allow_random: bool = False) -> GPTModel:
    """The weights `spec` names (a GPT-2 name, a model or run folder, a weights file) in training mode, with
    `drop_rate` if given. allow_random: a preset or config.json gives random weights, with a warning."""
    base = (load_model_arg(spec, purpose="finetune") if allow_random else load_pretrained(spec)).train()
    config = base.config.replace(drop_rate=drop_rate)
    if config == base.config:
        return base
    model = GPTModel(config)
    model.load_state_dict(base.state_dict())
    model.tokenizer = base.tokenizer
    return model


def check_context(context: int, maximum: int) -> None:
    if context > maximum:
        raise UsageError(f"--context-length {context} is above the model's maximum of {maximum}; lower it "
                         "(or use a config.json with a larger context_length)")


def prepare_data(run_cfg: RunConfig, seed: int, model_config: GPTConfig,
                 device: torch.device | None = None, tokenizer: Tokenizer | None = None) -> DataSplit:
    """Train and validation loaders: a prepared folder's token files, or text files tokenized now."""
    context = run_cfg.context_length or model_config.context_length
    check_context(context, model_config.context_length)
    tok = as_tokenizer(tokenizer)
    folder = prepared_folder(run_cfg.data)
    if folder is not None:  # memory-mapped token files; each rank reads its own share of every global batch
        return prepared_split(folder, context_length=context, stride=run_cfg.stride, batch_size=run_cfg.batch_size,
                              seed=seed, vocab_size=model_config.vocab_size, rank=D.get_rank(),
                              world_size=D.get_world_size(), device=device, tokenizer=tok)
    if D.get_world_size() > 1:
        raise UsageError("training on several ranks reads a prepared folder (each rank its own windows); "
                         "run gptlab prepare --data ... --out DIR, then train with --data DIR")
    ids = tokenize_documents(load_documents(run_cfg.data), tok)
    if ids.numel() and int(ids.max()) >= model_config.vocab_size:
        raise UsageError(f"the model's vocabulary ({model_config.vocab_size}) is smaller than its tokenizer's "
                         f"({tok.name}, {tok.n_vocab}); use vocab_size {tok.n_vocab}")
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
