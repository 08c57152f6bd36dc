"""The CUDA paths: forward, KV-cache decoding, autocast training, resume, torch.compile, torchrun (nccl).

Skipped where torch sees no CUDA GPU (CI has none); run on a GPU machine with
`pytest tests/test_cuda.py`. CPU results are the reference wherever the two should agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab import GPTModel
from gptlab.generation.generate import generate
from gptlab.pretrained.native import load_model
from gptlab.training.optim import build_optimizer, make_precision
from gptlab.training.settings import TrainConfig
from tests.helpers import SRC, run_cli, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
WORDS = "the a function returns value list of data python class method module string number file object".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("cuda_data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)) + "\n")
    return path


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cuda_model") / "tiny.json"
    path.write_text(json.dumps(tiny_config(emb_dim=64, context_length=32).to_dict()))
    return path


def make_pair(seed: int = 0) -> tuple[GPTModel, GPTModel]:
    torch.manual_seed(seed)
    cpu = GPTModel(tiny_config()).eval()
    gpu = GPTModel(tiny_config()).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(CUDA)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_args(corpus: Path, model_json: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus), "--model", str(model_json), "--out", str(out), "--device", "cuda",
            "--batch-size", "4", "--eval-every", "5", "--eval-iters", "2", "--quiet", "--sample-prompt", "the",
            *extra]


def test_forward_matches_cpu():
    cpu, gpu = make_pair()
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(ids)
        got = gpu(ids.to(CUDA)).cpu()
    assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4), (ref - got).abs().max()


def test_cache_equals_no_cache_across_the_window():
    _, gpu = make_pair(2)
    prompt = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(3)).to(CUDA)
    cached = generate(gpu, prompt, max_new_tokens=40, use_cache=True)  # 50 > context 32: the window slides
    plain = generate(gpu, prompt, max_new_tokens=40, use_cache=False)
    assert torch.equal(cached, plain)


def test_batched_prompts_equal_one_by_one():
    _, gpu = make_pair(4)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    batched = generate(gpu, prompts, max_new_tokens=8, pad_id=0)
    for row, prompt in zip(batched, prompts, strict=True):
        alone = generate(gpu, torch.tensor([prompt], device=CUDA), max_new_tokens=8)[0]
        assert row[-len(alone):].tolist() == alone.tolist()


def test_seeded_sampling_repeats_on_cuda():
    _, gpu = make_pair(5)
    prompt = torch.tensor([[1, 2, 3]], device=CUDA)
    a = generate(gpu, prompt, max_new_tokens=12, temperature=1.0, top_k=50, seed=9)
    b = generate(gpu, prompt, max_new_tokens=12, temperature=1.0, top_k=50, seed=9)
    assert torch.equal(a, b)


def test_bf16_weights_decode():
    cpu, _ = make_pair(6)
    gpu = GPTModel(tiny_config()).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(CUDA, torch.bfloat16)
    out = generate(gpu, torch.tensor([[1, 2, 3]], device=CUDA), max_new_tokens=20)
    assert out.shape == (1, 23) and int(out.max()) < 50257
    with torch.no_grad():
        logits = gpu(out)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_fused_adamw_and_bf16_autocast_by_default():
    model = GPTModel(tiny_config()).to(CUDA)
    optimizer = build_optimizer(model, TrainConfig(), CUDA)
    assert optimizer.defaults.get("fused") is True
    precision = make_precision("auto", CUDA)
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()
    assert make_precision("float16", CUDA).scaler.is_enabled()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_training_lowers_the_loss(tmp_path, corpus, model_json, dtype):
    out = tmp_path / "run"
    proc = run_cli(*train_args(corpus, model_json, out, "--max-steps", "40", "--dtype", dtype))
    assert proc.returncode == 0, proc.stderr
    records = metrics(out)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 3.0, records
    model = load_model(out, device=CUDA)
    assert next(model.parameters()).device.type == "cuda"


def test_cuda_resume_matches_an_uninterrupted_run(tmp_path, corpus, model_json):
    common = ("--max-steps", "20", "--dtype", "float32", "--lr-schedule", "constant", "--warmup-steps", "0")
    straight = tmp_path / "straight"
    assert run_cli(*train_args(corpus, model_json, straight, *common)).returncode == 0
    split = tmp_path / "split"
    first = train_args(corpus, model_json, split, *common)
    first[first.index("--max-steps") + 1] = "10"
    assert run_cli(*first).returncode == 0
    proc = run_cli("train", "--out", str(split), "--resume", "--max-steps", "20", "--device", "cuda", "--quiet")
    assert proc.returncode == 0, proc.stderr
    # The interrupted run also evaluates where it stopped (step 10); compare the steps both have.
    a = {r["step"]: r for r in metrics(straight)}
    b = {r["step"]: r for r in metrics(split)}
    assert set(a) <= set(b) and max(a) == 20
    for ra, rb in ((a[s], b[s]) for s in a):
        # Exact on an H200, but CUDA kernels (atomics in embedding backward) may not be bit-deterministic.
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4 and abs(ra["val_loss"] - rb["val_loss"]) < 1e-4


def test_compiled_training(tmp_path, corpus, model_json):
    out = tmp_path / "compiled"
    proc = run_cli(*train_args(corpus, model_json, out, "--max-steps", "20", "--compile"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = metrics(out)
    assert records[-1]["val_loss"] < records[0]["val_loss"], records


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_nccl_one_gpu(tmp_path, corpus, model_json, strategy):
    out = tmp_path / strategy
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "gptlab", *train_args(corpus, model_json, out, "--max-steps", "10", "--strategy", strategy)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nccl" in (proc.stdout + proc.stderr).lower() or (out / "checkpoint.pt").exists()
    assert metrics(out)[-1]["step"] == 10


def test_eval_and_generate_cli_on_cuda(tmp_path, corpus, model_json):
    out = tmp_path / "run"
    assert run_cli(*train_args(corpus, model_json, out, "--max-steps", "5")).returncode == 0
    text = "the function returns a list of data"
    results = {}
    for device in ("cpu", "cuda"):
        proc = run_cli("eval", "--model", str(out), "--text", text, "--device", device, "--json")
        assert proc.returncode == 0, proc.stderr
        results[device] = json.loads(proc.stdout)
    assert results["cpu"]["tokens"] == results["cuda"]["tokens"]
    assert abs(results["cpu"]["loss"] - results["cuda"]["loss"]) < 1e-3
    proc = run_cli("generate", "--model", str(out), "--prompt", "the", "--device", "cuda", "--json",
                   "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "1", "--num-samples", "2")
    assert proc.returncode == 0, proc.stderr
    completions = json.loads(proc.stdout)["completions"]
    assert len(completions) == 2 and all(len(c["token_ids"]) <= 10 for c in completions)


def test_hf_weights_match_transformers_on_cuda(tmp_path):
    from gptlab.pretrained.hf import load_hf
    from tests.gpt2_refs import random_hf_model

    hf = random_hf_model(1, vocab_size=300, n_positions=24, n_embd=32, n_layer=2, n_head=4)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", device=CUDA).eval()
    hf = hf.to(CUDA)
    ids = torch.randint(0, 300, (2, 12), device=CUDA)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4), (expected - got).abs().max()


def test_compiled_decoding_in_a_cuda_graph_matches_eager():
    """inductor + CUDA graphs over static caches: the same greedy tokens as the eager path, batch 1 and 8."""
    from gptlab import prepare_for_decoding

    _, eager = make_pair(seed=9)
    _, fast = make_pair(seed=9)
    prepare_for_decoding(fast, compile=True, max_batch=8)
    assert fast.compiled_decoder.mode == "reduce-overhead"
    one = torch.tensor([[5, 17, 300]], device=CUDA)
    assert torch.equal(generate(fast, one, 40), generate(eager, one, 40))  # crosses the 32-token window
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12], [13], [14, 15, 16], [17], [18, 19]]
    ours, theirs = generate(fast, prompts, 20), generate(eager, prompts, 20)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_cli_generate_compile_on_cuda(tmp_path):
    from gptlab import save_model

    torch.manual_seed(3)
    save_model(GPTModel(tiny_config()), tmp_path / "m")
    args = ("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12",
            "--temperature", "0", "--json", "--device", "cuda")
    plain, fast = run_cli(*args), run_cli(*args, "--compile", timeout=900)
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert [json.loads(p.stdout)["completions"][0]["token_ids"] for p in (plain, fast)][0] == \
        json.loads(fast.stdout)["completions"][0]["token_ids"]


def test_batch_size_auto_and_padded_vocabulary_on_cuda(tmp_path, corpus, model_json):
    """On a GPU the micro-batch is found by real probes (far above the CPU's 8 for this tiny model) and
    recorded; a fresh model's vocabulary is padded to 64 while the logits keep the tokenizer's size."""
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(corpus), "--model", str(model_json), "--out", str(out), "--device", "cuda",
                   "--batch-size", "auto", "--max-steps", "2", "--eval-iters", "1",
                   "--quiet", "--sample-prompt", "", timeout=900)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((out / "train_config.json").read_text())
    assert settings["batch_size"] > 8 and "--batch-size auto" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_multiple"] == 64 and config["vocab_size"] == 50257
    model = load_model(out, device=CUDA)
    assert model(torch.zeros(1, 4, dtype=torch.long, device=CUDA)).shape[-1] == 50257
