#!/usr/bin/env python3
"""The cost of `comm.deterministic` on the demo's job (issue 46): the local job (a
coordinator and W CPU workers on this machine, the tiny model, the demo's data and config)
run to STEPS steps with the float reduction and with the deterministic one, alternating,
ROUNDS times each; both with `train.cpu_threads: 1` (the deterministic mode needs a pinned
count; pinning it in both leaves the reduction as the only difference). Prints each run's
step time (the median over one-second windows of the committed steps, as scripts/chaos.py
measures it) and the ratio of the medians.

    scripts/bench-deterministic.py BIN_DIR [--workers 2] [--steps 400] [--rounds 3]

scripts/bench-deterministic.sh builds the release binaries and the data, then runs this.
"""
import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import Job, step_times  # noqa: E402


def job_yaml(path, workers, steps, deterministic):
    y = open("configs/local-job.yaml").read()
    y = y.replace("../tests/", "../../tests/").replace("../out/synthetic", "synthetic")
    y = re.sub(r"out_dir: \S+", f"out_dir: {os.path.abspath(os.path.dirname(path))}/run-{os.path.basename(path)}", y)
    epochs = steps * 2 * workers // 1100 + 2
    y = re.sub(r"epochs: \d+", f"epochs: {epochs}\n  max_steps: {steps}\n  global_batch: {2 * workers}\n  cpu_threads: 1", y, count=1)
    y = re.sub(r"save_every: \d+", "save_every: 100000", y)
    y = re.sub(r"min_nodes: \d+", f"min_nodes: {workers}", y)
    y = re.sub(r"max_nodes: \d+", f"max_nodes: {workers}", y)
    if deterministic:
        y = y.replace("comm:\n", "comm:\n  deterministic: true\n", 1)
    open(path, "w").write(y)


def one_run(bin_dir, work, label, workers, steps, deterministic):
    d = os.path.join(work, label)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(work, f"{label}.yaml")
    job_yaml(path, workers, steps, deterministic)
    job = Job(bin_dir, path, d, workers, None)
    job.start()
    samples = []
    t0 = time.monotonic()
    try:
        while job.coord.poll() is None:
            c = job.committed()
            if c is not None:
                samples.append((time.monotonic(), c))
            if time.monotonic() - t0 > 600:
                sys.exit(f"{label}: not finished in 600 s (logs: {d})")
            time.sleep(0.1)
    finally:
        job.stop()
    # From the first committed step (start-up is not a step).
    per_step = step_times([x for x in samples if x[1] > 0])
    if not per_step:
        sys.exit(f"{label}: no steps measured (logs: {d})")
    return statistics.median(per_step)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="out/bench-deterministic")
    a = p.parse_args()
    os.environ.setdefault("OTTER_JOIN_TOKEN", "bench")
    times = {False: [], True: []}
    for r in range(a.rounds):
        for det in (False, True):
            label = f"{'deterministic' if det else 'float'}-{r}"
            t = one_run(a.bin, a.work, label, a.workers, a.steps, det)
            times[det].append(t)
            print(f"{label}: median step {t * 1e3:.1f} ms", flush=True)
    f, d = statistics.median(times[False]), statistics.median(times[True])
    print(f"float_step_ms={f * 1e3:.1f}")
    print(f"deterministic_step_ms={d * 1e3:.1f}")
    print(f"ratio={d / f:.3f}")


if __name__ == "__main__":
    main()
