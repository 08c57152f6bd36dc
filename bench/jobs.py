"""The benchmark's jobs: what each one runs and how many times.

A job spec is a plain dict (it travels to the child process as JSON). Fields:
  id, kind (generate|train|eval|load|load_tf|prepare|limits), contestant, dtype, shape,
  plus the kind's own sizes, `warmup` and `repeats`.
"""

from __future__ import annotations

CONTESTANT_NAMES = ("gptlab", "transformers", "llms-from-scratch")

# id -> (title, kind, shape, dtypes, sizes): every job the benchmark knows.
JOBS: dict[str, tuple[str, str, str, tuple[str, ...], dict]] = {
    "gen_b1_kv": ("generate b1, KV cache, 16+128", "generate", "gpt2-small", ("float32", "bfloat16"),
                  dict(batch=1, prompt=16, new_tokens=128, cache=True)),
    "gen_b1_nocache": ("generate b1, no cache, 16+128", "generate", "gpt2-small", ("float32", "bfloat16"),
                       dict(batch=1, prompt=16, new_tokens=128, cache=False)),
    "gen_b8_kv": ("generate b8, KV cache, 16+128", "generate", "gpt2-small", ("float32", "bfloat16"),
                  dict(batch=8, prompt=16, new_tokens=128, cache=True)),
    "train_124m": ("train 4x256, gpt2-small shapes", "train", "gpt2-small", ("float32", "bfloat16"),
                   dict(batch=4, seq=256)),
    "train_small": ("train 4x256, 4 layers/4 heads/256 wide", "train", "small", ("float32", "bfloat16"),
                    dict(batch=4, seq=256)),
    "eval_124m": ("eval 8x256, gpt2-small", "eval", "gpt2-small", ("float32", "bfloat16"),
                  dict(batch=8, seq=256)),
    "load_safetensors": ("load gpt2-small from safetensors", "load", "gpt2-small", ("float32",), {}),
    "load_tf": ("load gpt2-small from an OpenAI TF checkpoint", "load_tf", "gpt2-small", ("float32",), {}),
    "prepare": ("prepare (tokenize a corpus)", "prepare", "gpt2-small", ("float32",), {}),
    "tiny_train": ("smoke: train a tiny model", "train", "tiny", ("float32",), dict(batch=2, seq=32)),
}

# jobs whose only contestant is gptlab (the peers have no counterpart we can run here)
GPTLAB_ONLY = {"load_tf", "prepare", "tiny_train"}

DEFAULT_JOBS = [j for j in JOBS if j != "tiny_train"]

# --quick: the headline rows only, fewer repeats (about 5 minutes on 2 idle cores)
QUICK = {
    "gen_b1_kv": ("float32", "bfloat16"),
    "gen_b1_nocache": ("float32",),
    "train_124m": ("float32", "bfloat16"),
    "train_small": ("float32",),
    "eval_124m": ("float32", "bfloat16"),
    "load_safetensors": ("float32",),
    "load_tf": ("float32",),
    "prepare": ("float32",),
}


def repeats_for(kind: str, job_id: str, quick: bool, smoke: bool) -> tuple[int, int]:
    """(warm-up, timed repeats) per job; generation's warm-up is a short 8-token run."""
    if smoke:
        return 0, 1
    if kind == "generate":
        if job_id == "gen_b1_nocache":
            return 1, 1 if quick else 3
        return 1, 2 if quick else 5
    if kind in ("train", "eval"):
        return (1, 2) if quick else (2, 8)
    return (1, 2) if quick else (1, 5)


TINY_SIZES = dict(prompt=4, new_tokens=8, seq=32)


def build_specs(job_ids: list[str], contestants: list[str], quick: bool, smoke: bool = False,
                tiny: bool = False) -> list[dict]:
    """One spec per (job, contestant, dtype), in a stable order.

    smoke: 1 repeat, no warm-up; tiny: additionally every model at the 'tiny' shape (checks code paths).
    """
    specs = []
    for job_id in job_ids:
        title, kind, shape, dtypes, sizes = JOBS[job_id]
        if quick and not (smoke or tiny):
            dtypes = QUICK.get(job_id, ())
        warmup, repeats = repeats_for(kind, job_id, quick, smoke or tiny)
        if tiny:
            shape = "tiny"
            sizes = {**sizes, **{k: v for k, v in TINY_SIZES.items() if k in sizes}}
        names = ("gptlab",) if job_id in GPTLAB_ONLY else CONTESTANT_NAMES
        for dtype in dtypes:
            for name in names:
                if name not in contestants:
                    continue
                specs.append(dict(id=job_id, title=title, kind=kind, shape=shape, dtype=dtype, contestant=name,
                                  warmup=warmup, repeats=repeats, **sizes))
    return specs
