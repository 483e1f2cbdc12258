#!/usr/bin/env python3
"""The chaos run behind scripts/chaos.sh (which builds the binaries and the data first).

Runs the local job (a coordinator and W CPU workers on this machine, the tiny model) twice
with the same job file:

1. failure-free, for DURATION seconds after its first committed step: the reference
   per-step losses and the median step time;
2. under failures, for the same DURATION: on a seeded schedule, every EVERY seconds, one
   victim gets `kill -9`: a random worker (its node agent and rank process, as a lost
   node) that is restarted on the same node id a second later (as Kubernetes would), or,
   every COORD_EVERY-th failure, the coordinator, restarted a second later on its state
   dir and the same addresses.

Both runs use the same job file (same max_steps, so the same LR schedule) and a constant
global batch (train.global_batch), so a step computes the same thing at any world size:
the per-step losses of the two runs must agree. At the end it prints one line each:
failures=, recoveries=, steps=, goodput=, exactly_once=, loss_diff_max=, and a few more.
With --steps N both runs go on past DURATION (without failures) to the job's end at step
N, and final_weights_identical= compares their final weights files byte for byte (with
comm.deterministic, chaos.sh --deterministic: yes, and loss_diff_max=0).

goodput = committed steps x the failure-free run's median step time / wall time, both
runs timed from their first committed step.
"""
import argparse
import hashlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Job:
    """One run of the local job: a coordinator and `workers` CPU workers, each in its own
    process group (so a kill takes the agent and its rank process together)."""

    def __init__(self, bin_dir, job_yaml, work, workers, log):
        self.bin, self.job_yaml, self.work, self.log = bin_dir, job_yaml, work, log
        self.grpc, self.http = free_port(), free_port()
        self.coord = None
        self.workers = {}
        self.names = [f"w{i}" for i in range(workers)]
        os.makedirs(work, exist_ok=True)

    def _spawn(self, args, logname):
        out = open(os.path.join(self.work, logname), "ab")
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_coord(self):
        self.coord = self._spawn(
            [f"{self.bin}/otter-coord", "start", "--config", self.job_yaml, "--listen", f"127.0.0.1:{self.grpc}",
             "--http-listen", f"127.0.0.1:{self.http}", "--state-dir", os.path.join(self.work, "coord")],
            "coord.log")

    def start_worker(self, name):
        self.workers[name] = self._spawn(
            [f"{self.bin}/otter-worker", "join", "--coord", f"127.0.0.1:{self.grpc}", "--node-id", name,
             "--cpu-ranks", "1", "--advertise-host", "127.0.0.1"],
            f"{name}.log")

    def start(self):
        self.start_coord()
        for n in self.names:
            self.start_worker(n)

    @staticmethod
    def kill9(p):
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop(self):
        for p in self.workers.values():
            self.kill9(p)
        self.kill9(self.coord)

    def progress(self):
        """(committed steps, generation), or None while the coordinator does not answer."""
        try:
            got = {}
            for line in http_get(f"http://127.0.0.1:{self.http}/metrics", 1.0).splitlines():
                for name in ("otter_committed_step", "otter_generation"):
                    if line.startswith(name + " "):
                        got[name] = int(float(line.split()[1]))
            return got["otter_committed_step"], got["otter_generation"]
        except Exception:
            return None

    def committed(self):
        p = self.progress()
        return None if p is None else p[0]

    def status(self, since=None):
        q = f"?since={since}" if since is not None else ""
        try:
            return json.loads(http_get(f"http://127.0.0.1:{self.http}/status.json{q}", 5.0))
        except Exception:
            return None

    def losses(self, into, generations, s=None):
        """Adds step -> loss (and step -> generation) from the coordinator's step window
        (`s`, else asked for) and its history file."""
        s = s if s is not None else self.status(since=0)
        if s is None:
            return None
        for st in s.get("steps", []):
            if st.get("loss") is not None:
                into[st["step"]] = st["loss"]
                generations[st["step"]] = st["generation"]
        hist = os.path.join(self.work, "coord", "history.jsonl")
        if os.path.exists(hist):
            for line in open(hist):
                line = line.strip()
                if line:
                    st = json.loads(line)
                    if st.get("mean_loss") is not None:
                        into[st["step"]] = st["mean_loss"]
                        generations[st["step"]] = st["generation"]
        return s


def step_times(samples):
    """Step times from (time, committed steps) samples: in windows of about a second,
    window length / steps committed in it, for the windows that committed something."""
    per_step = []
    i = 0
    while i < len(samples) - 1:
        j = i + 1
        while j < len(samples) - 1 and samples[j][0] - samples[i][0] < 1.0:
            j += 1
        dt, dc = samples[j][0] - samples[i][0], samples[j][1] - samples[i][1]
        if dc > 0:
            per_step.append(dt / dc)
        i = j
    return per_step


def final_weights(work):
    return os.path.join(work, "run", "final_weights.safetensors")


def wait_first_step(job, limit):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        c = job.committed()
        if c is not None and c > 0:
            return time.monotonic(), c
        time.sleep(0.05)
    sys.exit(f"no step committed within {limit} s (logs: {job.work})")


def run(args, label, chaos):
    work = os.path.join(args.work, label)
    subprocess.run(["rm", "-rf", work], check=True)
    # The same job file with this run's own output directory (checkpoints, final weights),
    # written beside the original so that its relative paths still hold.
    job_yaml = os.path.join(os.path.dirname(args.job), f"job-{label}.yaml")
    text = re.sub(r"out_dir: \S+", f"out_dir: {os.path.abspath(work)}/run", open(args.job).read())
    open(job_yaml, "w").write(text)
    job = Job(args.bin, job_yaml, work, args.workers, None)
    job.start()
    samples = []  # (monotonic time, committed steps)
    losses, generations = {}, {}
    failures, coord_kills, worker_kills = [], 0, 0
    rng = random.Random(args.seed)
    try:
        t_first, c_first = wait_first_step(job, 300)
        samples.append((t_first, c_first))
        generation = (job.progress() or (0, 0))[1]
        end = t_first + args.duration
        next_failure = t_first + args.every if chaos else float("inf")
        pending_restart = []  # (at, what)
        last_loss_poll = 0.0
        while True:
            now = time.monotonic()
            finished = False
            if args.steps:
                # To the end of the job (failures only within the duration): its last step
                # committed and the final weights written.
                done = max(c for _, c in samples)
                # Rank 0 writes them only once every step is trained (durably, or not at all).
                finished = os.path.exists(final_weights(work))
                if finished and not pending_restart:
                    break
                if now >= end:
                    next_failure = float("inf")
                if now >= end + args.finish_limit:
                    sys.exit(f"{label}: {done} of {args.steps} steps {args.finish_limit:.0f} s after the duration (logs: {work})")
            elif now >= end:
                break
            if job.coord.poll() is not None and not finished and not any(w == "coord" for _, w in pending_restart):
                sys.exit(f"the coordinator exited by itself (code {job.coord.returncode}); see {work}/coord.log")
            if now >= next_failure:
                n = len(failures) + 1
                if args.coord_every > 0 and n % args.coord_every == 0:
                    job.kill9(job.coord)
                    coord_kills += 1
                    pending_restart.append((now + 1.0, "coord"))
                    victim = "coord"
                else:
                    victim = rng.choice(job.names)
                    job.kill9(job.workers[victim])
                    worker_kills += 1
                    pending_restart.append((now + 1.0, victim))
                before = max(c for _, c in samples)
                # Recovered: for a lost worker, a step committed by a new generation (the
                # survivors re-formed); for the coordinator, a step committed after it
                # answers again. (Measured by polling every 0.1 s.)
                failures.append({"at": now, "victim": victim, "committed": before, "generation": generation, "recovered_at": None})
                print(f"  t={now - t_first:6.1f}s kill -9 {victim} at step {before}", flush=True)
                next_failure += args.every
            for at, what in list(pending_restart):
                if now >= at:
                    pending_restart.remove((at, what))
                    if what == "coord":
                        job.start_coord()
                    else:
                        job.start_worker(what)
            p = job.progress()
            if p is not None:
                c, generation = p
                samples.append((now, c))
                for f in failures:
                    if f["recovered_at"] is not None:
                        continue
                    # The committed count when the new generation (or the restarted
                    # coordinator) was first seen; recovered at the next step after it.
                    if "mark" not in f and (f["victim"] == "coord" or generation > f["generation"]):
                        f["mark"] = c
                    if "mark" in f and c > f["mark"]:
                        f["recovered_at"] = now
            if now - last_loss_poll > 5.0:
                job.losses(losses, generations)
                last_loss_poll = now
            time.sleep(0.1)
        # The steps committed within the duration (later ones are not counted).
        c_end = max(c for t, c in samples if t <= end)
        status = None
        for _ in range(50):
            status = job.losses(losses, generations)
            if status is not None or (args.steps and job.coord.poll() is not None):
                break
            time.sleep(0.2)  # the coordinator may be restarting
        if status is None and args.steps:
            # The job ended and its coordinator with it, leaving its final status in its
            # state dir.
            final = os.path.join(work, "coord", "status.json")
            if os.path.exists(final):
                status = job.losses(losses, generations, json.load(open(final)))
    finally:
        job.stop()
    if status is None:
        sys.exit(f"{label}: the coordinator did not answer at the end (logs: {work})")
    per_step = step_times(samples)
    rec = [f["recovered_at"] - f["at"] for f in failures if f["recovered_at"] is not None]
    weights = None
    if args.steps and os.path.exists(final_weights(work)):
        weights = hashlib.sha256(open(final_weights(work), "rb").read()).hexdigest()
    return {
        "final_weights_sha256": weights,
        "steps": c_end - c_first,
        "last_step": c_end,
        "wall": args.duration,
        "median_step_s": statistics.median(per_step) if per_step else None,
        "losses": losses,
        "generations": generations,
        "failures": len(failures),
        "worker_kills": worker_kills,
        "coord_kills": coord_kills,
        "recoveries": len(rec),
        "recovery_s": rec,
        "exactly_once": status.get("exactly_once", {}),
        "recoveries_reported": status.get("summary", {}).get("recoveries"),
    }


def fingerprint(a):
    """What a failure-free run's results depend on: the job file, the binaries, the
    number of workers."""
    h = hashlib.sha256(open(a.job, "rb").read())
    for b in ("otter-coord", "otter-worker"):
        st = os.stat(os.path.join(a.bin, b))
        h.update(f"{b}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"workers:{a.workers}:steps:{a.steps}".encode())
    return h.hexdigest()


def baseline(a):
    """The failure-free run: measured, or reused from --baseline-cache when that holds a
    run of the same job, binaries and workers at least as long (its losses are a superset,
    its median step time the same job's)."""
    key = fingerprint(a)
    if a.baseline_cache and os.path.exists(a.baseline_cache):
        c = json.load(open(a.baseline_cache))
        if c.get("key") == key and c["wall"] >= a.duration:
            c["losses"] = {int(k): v for k, v in c["losses"].items()}
            print(f"== failure-free run: reused from {a.baseline_cache} ({c['wall']:.0f} s, measured {c['measured_at']})", flush=True)
            return c
    print(f"== failure-free run ({a.workers} workers, {a.duration:.0f} s)", flush=True)
    base = run(a, "baseline", chaos=False)
    base["key"] = key
    base["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if a.baseline_cache:
        json.dump(base, open(a.baseline_cache, "w"))
    return base


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--every", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coord-every", type=int, default=5)
    p.add_argument("--baseline-cache", default=None)
    p.add_argument("--steps", type=int, default=0, help="run each job to this many steps (its max_steps) and compare the final weights")
    p.add_argument("--finish-limit", type=float, default=900.0)
    a = p.parse_args()

    base = baseline(a)
    print(f"   {base['steps']} steps, median step {base['median_step_s'] * 1e3:.1f} ms", flush=True)
    print(f"== chaos run (kill -9 every {a.every:.0f} s, seed {a.seed})", flush=True)
    ch = run(a, "chaos", chaos=True)
    json.dump({"baseline": base["losses"], "chaos": ch["losses"], "chaos_generations": ch["generations"]},
              open(os.path.join(a.work, "losses.json"), "w"))

    common = sorted(set(base["losses"]) & set(ch["losses"]))
    diff = {s: abs(base["losses"][s] - ch["losses"][s]) for s in common}
    missing = [s for s in range(ch["last_step"]) if s not in ch["losses"]]
    goodput = ch["steps"] * base["median_step_s"] / ch["wall"]
    once = ch["exactly_once"]
    once_ok = isinstance(once, dict) and "Ok" in once
    rec = ch["recovery_s"]
    print(f"failures={ch['failures']}")
    print(f"worker_kills={ch['worker_kills']}")
    print(f"coordinator_kills={ch['coord_kills']}")
    print(f"recoveries={ch['recoveries']}")
    if rec:
        print(f"recovery_s_median={statistics.median(rec):.2f}")
        print(f"recovery_s_max={max(rec):.2f}")
    print(f"steps={ch['steps']}")
    print(f"steps_failure_free={base['steps']}")
    print(f"median_step_ms={base['median_step_s'] * 1e3:.1f}")
    print(f"goodput={goodput:.3f}")
    # The same formula applied to the failure-free run itself (its median step vs its mean:
    # how far from 1.0 a run without failures lands), and the plain ratio of steps.
    print(f"goodput_failure_free={base['steps'] * base['median_step_s'] / base['wall']:.3f}")
    print(f"steps_ratio={ch['steps'] / max(base['steps'], 1) * base['wall'] / ch['wall']:.3f}")
    print(f"exactly_once={'ok' if once_ok else 'FAIL'}")
    if not once_ok:
        print(f"exactly_once_detail={once}")
    print(f"loss_steps_compared={len(common)}")
    if missing:
        print(f"loss_steps_missing={len(missing)}")
    print(f"loss_diff_max={max(diff.values()) if diff else float('nan'):.3e}")
    # Where the two runs part: the first step of each new generation (a world change: the
    # same samples summed in another order) and the first step past 1e-5 (rounding
    # differences amplified by training; see BENCHMARKS.md).
    gens = ch["generations"]
    firsts = [s for s in common if s > 0 and s - 1 in gens and gens.get(s) != gens[s - 1]]
    if firsts:
        print(f"loss_diff_max_at_world_changes={max(diff[s] for s in firsts):.3e}")
    above = [s for s in common if diff[s] > 1e-5]
    if above and firsts:
        print(f"loss_diff_first_step_above_1e-5={above[0]} ({above[0] - firsts[0]} steps after the first world change at {firsts[0]})")
    identical = None
    if a.steps:
        identical = base.get("final_weights_sha256") is not None and base.get("final_weights_sha256") == ch["final_weights_sha256"]
        print(f"final_weights_identical={'yes' if identical else 'no'}")
        print(f"final_weights_sha256={ch['final_weights_sha256']} (failure-free: {base.get('final_weights_sha256')})")
    ok = once_ok and diff and not missing and identical is not False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
