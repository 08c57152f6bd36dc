"""A fine-tuning run on disk, as `gptlab finetune` makes it, and `finetune`, its Python form.

It takes the steps of `gptlab train` (training/run.py): check the folder and join the job
(`start_run`), read and check the examples, load the model and adapt it to the task (tasks.py),
check a resumed run against its checkpoint, fix the schedule, then lock the folder, write the run's
files and train with the same loop (`launch` -> training.loop.train -> step -> checkpoint).
Everything is validated before the folder is touched: bad data never leaves a half-made run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError, did_you_mean
from ..model import GPTModel, unwrap_model
from ..pretrained.native import CLASSIFIER_NAME
from ..training.run import RUN_FILES as TRAIN_RUN_FILES
from ..training.run import (
    absolute_paths,
    check_data,
    check_data_unchanged,
    check_model,
    fix_schedule,
    launch,
    load_init,
    open_run_folder,
    record_data,
    resume_settings,
    start_run,
)
from ..training.settings import TrainConfig, TrainResult
from .classify_data import LabelledTexts, labelled_texts, load_classification_data, stratified_split
from .instructions import check_entry, load_instruction_data
from .lora import ADAPTER_CONFIG_NAME, ADAPTER_NAME
from .records import Record
from .settings import FIXED_ON_RESUME, FinetuneConfig, train_defaults
from .tasks import RESPONSES_NAME, Task, adapter_settings, classification_task, instruction_task
from .templates import TEMPLATE_FILE

RUN_FILES = (*TRAIN_RUN_FILES, TEMPLATE_FILE, CLASSIFIER_NAME, ADAPTER_NAME, ADAPTER_CONFIG_NAME, RESPONSES_NAME)
IN_MEMORY = "records"  # how errors name examples given as Python objects


def run_finetune(ft: FinetuneConfig, cfg: TrainConfig, out: str | os.PathLike | None = None, *,
                 resume: bool = False, force: bool = False, log=print, model: GPTModel | None = None,
                 records: Sequence[dict] | None = None) -> TrainResult:
    """Fine-tune as `gptlab finetune` does. `model` / `records`: a model and examples given as Python
    objects instead of `ft.init` / `ft.data`."""
    out = open_run_folder(out, resume, force)
    if resume:
        check_data_unchanged(ft.data_files or [])
    else:  # paths absolute and the data files' hashes kept, so that the run resumes from anywhere, on the same data
        ft = absolute_paths(ft)
        ft = dataclasses.replace(ft, data_files=record_data([p for p in (ft.data, ft.val_data) if p]))
    start = start_run(out, cfg, ft.strategy, resume, log)
    ft = adapter_settings(ft)
    train_part, val_part = load_examples(ft, cfg.seed, records)  # checked before the (slow) model load
    if model is None and not ft.init:
        raise UsageError("give the model to fine-tune with --init (a GPT-2 name, a model or run folder)")
    base = unwrap_model(model).train() if model is not None else load_init(ft.init, ft.drop_rate, allow_random=True)
    task = build_task(ft, cfg, base, train_part, val_part, start.out, start.log)
    check_model(start, unwrap_model(task.model))
    check_data(start, task.fingerprint)
    cfg = fix_schedule(cfg, len(task.train_loader))
    for line in (*task.plan, f"device {start.info.device}; output {start.out}"):
        start.log(line)
    return launch(start, task.model, cfg, task.train_loader, task.val_loader,
                  settings={**ft.to_dict(), **cfg.to_dict()}, run_files=RUN_FILES,
                  compile_backend=ft.compile_backend if ft.compile else None,
                  run_info={"data_fingerprint": task.fingerprint}, write_files=task.write_files, after=task.after,
                  sample=task.sample, extra_metrics=task.extra_metrics)


def build_task(ft: FinetuneConfig, cfg: TrainConfig, base: GPTModel, train_part, val_part, out: Path,
               log=print) -> Task:
    if ft.task == "classify":
        return classification_task(ft, cfg, base, train_part, val_part, ft.data or IN_MEMORY, out, log)
    return instruction_task(ft, cfg, base, train_part, val_part, out, log=log)


def load_examples(ft: FinetuneConfig, seed: int, records: Sequence[dict] | None = None):
    """(training, validation) examples of the task: instruction dicts, or LabelledTexts."""
    if records is None and not ft.data:
        raise UsageError("give the examples to fine-tune on with --data FILE")
    if ft.task == "classify":
        return _classification_examples(ft, seed, records)
    if records is not None:
        entries = [check_entry(Record(value, i, 0), IN_MEMORY) for i, value in enumerate(records, start=1)]
        if not entries:
            raise UsageError("no examples given; pass at least one record")
    else:
        entries = load_instruction_data(ft.data)
    if ft.val_data:
        return entries, load_instruction_data(ft.val_data)
    n_val = max(1, round(len(entries) * ft.val_fraction))
    if n_val >= len(entries):
        raise UsageError(f"{len(entries)} example(s) are too few to hold out a validation set; give more, or "
                         "validation examples of their own with --val-data")
    # As in the book's chapter 7: the last examples of the file are the held-out ones.
    return entries[:-n_val], entries[-n_val:]


def _classification_examples(ft: FinetuneConfig, seed: int, records: Sequence[dict] | None):
    columns = (ft.text_column, ft.label_column)
    if records is not None:
        data = labelled_texts([Record(v, i, 0) for i, v in enumerate(records, start=1)], IN_MEMORY, *columns)
    else:
        data = load_classification_data(ft.data, *columns)
    if ft.val_data:
        return data, load_classification_data(ft.val_data, *columns)
    train_idx, val_idx = stratified_split(data.labels, ft.val_fraction, seed)
    if not val_idx:
        raise UsageError(f"{len(data.texts)} text(s) are too few to hold out a validation set; give more, or "
                         "validation texts of their own with --val-data")

    def part(indices: list[int]) -> LabelledTexts:
        return LabelledTexts([data.texts[i] for i in indices], [data.labels[i] for i in indices])

    return part(train_idx), part(val_idx)


def finetune(init: str | os.PathLike | torch.nn.Module, data: str | os.PathLike | Sequence[dict],
             out: str | os.PathLike | None = None, *, task: str = "instruct", method: str = "full",
             resume: bool = False, force: bool = False, log=print, **settings: Any) -> TrainResult:
    """Fine-tune a model on instructions (task="instruct") or labelled texts (task="classify").

    init: anything `gptlab finetune --init` takes, or a GPTModel (trained in place). data: a file, or
    the records themselves ({"instruction", "input", "output"} dicts, or {"text", "label"} dicts).
    settings: any field of FinetuneConfig (val_data, lora_r, batch_size, ...) or of TrainConfig
    (epochs, lr, eval_every, ...); TrainConfig's fields not given take fine-tuning defaults
    (`train_defaults`). The run folder `out` ends up as `gptlab finetune --out` leaves it.
    Returns the loop's TrainResult (losses, metrics, the run folder).
    """
    model = init if isinstance(init, torch.nn.Module) else None
    records = None if isinstance(data, (str, os.PathLike)) else list(data)
    given = {**settings, "task": task, "method": method}
    if model is None:
        given["init"] = str(init)
    if records is None:
        given["data"] = str(data)
    unknown = sorted(set(given) - set(FinetuneConfig.field_names()) - set(TrainConfig.field_names()))
    if unknown:
        hint = did_you_mean(unknown[0], [*FinetuneConfig.field_names(), *TrainConfig.field_names()])
        raise UsageError(f"unknown fine-tuning setting(s) {', '.join(unknown)}{hint}")
    if resume:
        ft, cfg = resume_settings(Path(out), given, FinetuneConfig, FIXED_ON_RESUME)  # type: ignore[arg-type]
    else:
        ft, cfg = settings_from(given)
    return run_finetune(ft, cfg, out, resume=resume, force=force, log=log, model=model, records=records)


def settings_from(given: dict[str, Any]) -> tuple[FinetuneConfig, TrainConfig]:
    """The two settings objects of a new run: the given values over the fine-tuning defaults."""
    names = set(FinetuneConfig.field_names())
    ft = FinetuneConfig(**{k: v for k, v in given.items() if k in names})
    defaults = train_defaults(ft.task, "lora" if ft.uses_lora else "full")
    if "max_steps" in given and "epochs" not in given:
        del defaults["epochs"]  # --max-steps alone runs exactly that many steps, as for gptlab train
    return ft, TrainConfig(**{**defaults, **{k: v for k, v in given.items() if k not in names}})
