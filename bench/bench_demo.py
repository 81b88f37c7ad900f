"""How long `gpuctl demo` takes, as a user runs it, and where the time goes.

Runs the README's demo command (`gpuctl demo`, from nothing: local mode up with the GPU box off, the cold
start, two jobs, the results, local mode down) several times in a fresh state and config folder, and reports
the wall time of the whole command and the demo's own breakdown (its `--output json`): local mode up, the GPU
box's boot, each job's queue wait / boot / execution / publish, and local mode down. The machine's load average
before each run is reported too: the machine is shared, and load inflates every figure.

    .venv/bin/python bench/bench_demo.py            # 5 runs; --runs N
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def one_run(folder: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GPUCTL_"))}
    env.update(GPUCTL_LOCAL_DIR=str(folder / "state"), GPUCTL_CONFIG_DIR=str(folder / "config"), NO_COLOR="1")
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gpuctl", "demo", "--output-dir", str(folder / "out"),
                           "--output", "json"], env=env, capture_output=True, text=True, timeout=300, check=False)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    return {"load": load, "wall": wall, "doc": doc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="gpuctl-bench-demo-") as tmp:
            run = one_run(Path(tmp))
        doc = run["doc"]
        jobs = {j["job_type"]: j["seconds"] for j in doc["jobs"]}
        print(f"run {i + 1}: load {run['load']:.2f}, wall {run['wall']:.1f} s, demo total "
              f"{doc['seconds']['total']:.1f} s (up {doc['seconds']['up']:.1f}, boot "
              f"{doc['gpu_box']['boot_seconds']:.1f}, down {doc['seconds']['down']:.1f}); "
              + "; ".join(f"{k}: " + ", ".join(f"{s} {v}" for s, v in secs.items()) for k, secs in jobs.items()),
              flush=True)
        runs.append(run)

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})"

    docs = [r["doc"] for r in runs]
    print("\nmedian over", len(runs), "runs, load", ", ".join(f"{r['load']:.2f}" for r in runs))
    print("  gpuctl demo, wall time:  ", med([float(r["wall"]) for r in runs]))
    print("  local mode up:           ", med([d["seconds"]["up"] for d in docs]))
    print("  GPU box boot:            ", med([d["gpu_box"]["boot_seconds"] for d in docs]))
    print("  local mode down:         ", med([d["seconds"]["down"] for d in docs]))
    for i, kind in enumerate(("camera-angle", "qwen-image-edit")):
        for stage in ("submit", "queue_wait", "boot", "execution", "publish", "download"):
            print(f"  {kind:<16} {stage:<11}", med([d["jobs"][i]["seconds"][stage] for d in docs]))


if __name__ == "__main__":
    main()
