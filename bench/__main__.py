"""python -m bench [--quick] [--jobs a,b] [--contestants ...] [--out DIR]: gptlab beside its peers.

Each (job, contestant, dtype) runs in a fresh subprocess (bench/child.py), so the reported peak RSS
is that job's own. Results: OUT/results.json, OUT/results.md, OUT/results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .jobs import CONTESTANT_NAMES, DEFAULT_JOBS, JOBS, build_specs

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "src" / "gptlab").is_dir() or str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing gptlab


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="headline rows only, fewer repeats (~5 min on 2 cores)")
    p.add_argument("--jobs", default=",".join(DEFAULT_JOBS),
                   help=f"comma-separated job ids (default: all): {', '.join(JOBS)}")
    p.add_argument("--contestants", default=",".join(CONTESTANT_NAMES), help="comma-separated contestants")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output folder")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per job")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the job processes (e.g. allocator settings); repeatable")
    p.add_argument("--no-limits", action="store_true", help="skip measuring the machine's limits")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a job process is killed")
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat: checks the harness itself")
    p.add_argument("--tiny", action="store_true",
                   help="every selected job at a tiny model size, 1 repeat: checks each contestant's code path")
    p.add_argument("--note", default="", help="a note for the table's header (e.g. 'shared, loaded machine')")
    args = p.parse_args(argv)
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in args.jobs if j not in JOBS]
    if unknown:
        p.error(f"unknown job(s) {', '.join(unknown)}; choose from {', '.join(JOBS)}")
    args.contestants = [c.strip() for c in args.contestants.split(",") if c.strip()]
    bad = [c for c in args.contestants if c not in CONTESTANT_NAMES]
    if bad:
        p.error(f"unknown contestant(s) {', '.join(bad)}; choose from {', '.join(CONTESTANT_NAMES)}")
    return args


def child_env(extra: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def run_child(spec: dict, env: dict, timeout: float) -> dict:
    """Run one spec in a fresh interpreter; a crash or timeout becomes an 'error' result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.child", json.dumps(spec), str(out)], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(status="error", reason=f"timed out after {timeout:.0f} s")
        if not out.exists():
            return dict(status="error", reason=f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return json.loads(out.read_text())


def machine_info() -> dict:
    cpu, flags = platform.processor() or "unknown CPU", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    import torch

    wanted = [f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))]
    return dict(cpu=cpu, flags=wanted, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.jobs, args.contestants = ["tiny_train"], ["gptlab"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(args.env)
    data_dir = out / "_data"
    started = time.time()
    limits: dict = {}
    if not args.no_limits:
        log("measuring machine limits ...")
        res = run_child(dict(kind="limits", threads=args.threads, smoke=args.smoke or args.tiny), env, args.timeout)
        limits = res.get("limits", {})
        if res.get("status") != "ok":
            log(f"  limits failed: {res.get('reason')}")
    specs = build_specs(args.jobs, args.contestants, args.quick, args.smoke, args.tiny)
    results = []
    for i, spec in enumerate(specs, 1):
        spec.update(threads=args.threads, data_dir=str(data_dir), quick=args.quick)
        label = f"[{i}/{len(specs)}] {spec['id']} {spec['dtype']} {spec['contestant']}"
        if spec["kind"] == "load" and not (data_dir / f"{spec['contestant']}-{spec['shape']}").exists():
            saved = run_child({**spec, "kind": "save"}, env, args.timeout)
            if saved["status"] != "ok":
                log(f"{label}: could not write its input: {saved.get('reason')}")
        res = run_child(spec, env, args.timeout)
        res["spec"] = spec
        results.append(res)
        if res["status"] == "ok":
            vals = sorted(res["values"])
            log(f"{label}: median {vals[len(vals) // 2]:.3g} {res['unit']}, peak RSS {res['peak_rss_mb']:.0f} MB, "
                f"{res['wall_s']:.0f} s")
        else:
            log(f"{label}: {res['status']}: {res.get('reason')}")
        write_outputs(out, results, limits, args, time.time() - started)  # partial results survive a kill
    write_outputs(out, results, limits, args, time.time() - started)
    log(f"done in {time.time() - started:.0f} s: {out / 'results.md'}")
    return 0


def write_outputs(out: Path, results: list[dict], limits: dict, args, seconds: float) -> None:
    from gptlab.storage.files import atomic_open, atomic_path, write_json

    from .report import chart, group_rows, markdown

    meta = machine_info()
    meta.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=args.threads, quick=args.quick,
                seconds=round(seconds, 1), note=args.note, env=args.env)
    rows = group_rows(results, limits)
    write_json(out / "results.json", dict(meta=meta, limits=limits, results=results,
                                          rows=[{k: v for k, v in r.items() if k != "spec"} for r in rows]))
    with atomic_open(out / "results.md", "w") as f:
        f.write(markdown(rows, limits, meta))
    with atomic_path(out / "results.png") as tmp:
        chart(rows, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
