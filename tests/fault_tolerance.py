#!/usr/bin/python3
"""Fault tolerance end to end (issue 5), through the real moe-train binary under mpirun.

A 4-rank run (tp2 x dp2 x ep2) of a tiny model saves a checkpoint every iteration. Against an
uninterrupted run of the same command (its exported weights are the reference):

  kill     kill -9 a random rank at a random iteration; every process must be gone within
           --timeout seconds with a message naming the lost rank; a restart with --load must
           end with weights byte-identical to the reference. Repeated --trials times.
  stop     SIGSTOP a rank (it stops answering without dying): the other ranks must exit within
           --distributed-timeout (5 s here) plus a margin, naming the stuck operation.
  sigterm  SIGTERM to one rank: every rank saves a checkpoint and exits 0; a restart reproduces
           the reference.
  damaged  flip a byte in the newest checkpoint: --load refuses it in one line, resumes from the
           previous one and reproduces the reference.
  nan      a NaN gradient on the last rank at one iteration: every rank skips that step (the
           root's metrics say so); three in a row with --max-skipped-iters 2: exit 1 with a
           message naming the last checkpoint, which stays loadable.

Usage: fault_tolerance.py MOE_TRAIN MPIEXEC [--trials N] [--only kill,stop,...] [--seed S]
                          [--timeout S]
Exits 1 when a check fails (each is printed), 2 on bad usage.
"""

import argparse
import filecmp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layout_check import read_metrics, write_text  # noqa: E402

RANKS = 4
ITERS = 24

failures = []


def check(condition, what):
    print(("  ok    " if condition else "  FAIL  ") + what, flush=True)
    if not condition:
        failures.append(what)
    return condition


class Job:
    """One mpirun of moe-train with the fixed tiny model; output captured to a file."""

    def __init__(self, ctx, tag, extra):
        self.log_path = os.path.join(ctx.workdir, tag + ".log")
        self.metrics = os.path.join(ctx.workdir, tag + ".jsonl")
        command = [ctx.mpiexec, "-n", str(RANKS), "--oversubscribe", "--allow-run-as-root",
                   "--bind-to", "none", "-x", "OMP_NUM_THREADS=1", ctx.moe_train,
                   "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                   "--ffn-hidden-size", "128", "--num-experts", "4", "--moe-layer-freq", "2",
                   "--seq-length", "32", "--max-position-embeddings", "32",
                   "--moe-expert-capacity-factor", "1.25", "--seed", "7",
                   "--micro-batch-size", "4", "--global-batch-size", "8",
                   "--train-iters", str(ITERS), "--lr", "1e-3", "--lr-warmup-iters", "2",
                   "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                   "--data-path", ctx.data, "--data-format", "bytes", "--valid-fraction", "0",
                   "--log-interval", "1", "--threads", "1", "--metrics-file", self.metrics,
                   ] + extra
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMP_NUM_THREADS="1")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)

    def wait(self, timeout):
        """The exit status, or None when it did not end in time (then it is killed)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return None
        finally:
            self.log.close()

    def output(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def iterations_done(self):
        try:
            return len(read_metrics(self.metrics))
        except (OSError, ValueError):
            return 0

    def wait_for_iteration(self, iteration, timeout=120):
        deadline = time.time() + timeout
        while self.iterations_done() < iteration:
            if self.process.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.02)
        return True

    def rank_pids(self):
        """{world rank: pid} of this job's moe-train processes (from their environment)."""
        pids = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                argv0 = cmdline.split(b"\0")[0]
            except OSError:
                continue
            if not argv0.endswith(b"moe-train") or self.metrics.encode() not in cmdline:
                continue
            if b"OMPI_COMM_WORLD_RANK" in env:
                pids[int(env[b"OMPI_COMM_WORLD_RANK"])] = int(entry)
        return pids


def alive(pid):
    """Whether a process runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_gone(job, pids, timeout):
    """Seconds until mpirun and every rank process had ended, or None past the timeout."""
    start = time.time()
    status = job.wait(timeout)
    while any(alive(p) for p in pids.values()) and time.time() - start < timeout:
        time.sleep(0.05)
    if status is None or any(alive(p) for p in pids.values()):
        for p in pids.values():
            if alive(p):
                os.kill(p, signal.SIGKILL)
        return None
    return time.time() - start


def freeze_at(job, at):
    """Waits for iteration `at` and freezes every rank there (SIGSTOP), so that the fault the
    test injects next lands while the run is still training, however fast its iterations are
    (a few ms here: without the freeze the run could end between seeing `at` and the fault).
    Returns ({world rank: pid}, iterations done when frozen), or (None, 0) when the run ended
    first or its rank processes were not all found."""
    if not job.wait_for_iteration(1):
        return None, 0
    pids = job.rank_pids()  # found before `at`: scanning /proc takes longer than an iteration
    if len(pids) != RANKS or not job.wait_for_iteration(at):
        return None, 0
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    return pids, job.iterations_done()


def start_frozen(ctx, tag, extra, attempts=3):
    """Starts a job (extra(attempt) gives its flags and its save directory or None) and freezes
    it at a random iteration (freeze_at). The last iterations take a few ms, so a loaded
    machine can keep this script asleep until the run has ended: such a run, which says
    nothing about the trainer, is started again, up to `attempts` times.
    Returns (job, at, pids, done, save); pids is None when no attempt froze in time."""
    for attempt in range(attempts):
        flags, save = extra(attempt)
        job = Job(ctx, f"{tag}-{attempt}", flags)
        at = ctx.rng.randint(2, ITERS - 4)
        pids, done = freeze_at(job, at)
        if pids is not None and done < ITERS:
            return job, at, pids, done, save
        print(f"  retry {tag}: the run was at iteration {done} of {ITERS} when frozen")
        if pids is not None:
            thaw(pids)
        job.wait(30)
    return job, at, None, done, save


def thaw(pids, skip=None):
    """SIGCONT to every frozen rank but `skip`."""
    for rank, pid in pids.items():
        if rank != skip and alive(pid):
            os.kill(pid, signal.SIGCONT)


class Context:
    def __init__(self, args, workdir):
        self.moe_train, self.mpiexec, self.workdir = args.moe_train, args.mpiexec, workdir
        self.timeout = args.timeout
        self.rng = random.Random(args.seed)
        self.data = os.path.join(workdir, "data.txt")
        write_text(self.data, 60000)
        self.reference = os.path.join(workdir, "reference.safetensors")

    def run_to_end(self, tag, extra):
        job = Job(self, tag, extra)
        status = job.wait(600)
        if status != 0:
            print(job.output()[-3000:])
        return status

    def resume_matches_reference(self, tag, save_dir):
        export = os.path.join(self.workdir, tag + ".safetensors")
        status = self.run_to_end(tag + "-resume", ["--load", save_dir, "--save", save_dir,
                                                   "--save-interval", "1",
                                                   "--export-safetensors", export])
        check(status == 0, f"{tag}: the restarted run ends with exit 0")
        check(status == 0 and filecmp.cmp(export, self.reference, shallow=False),
              f"{tag}: final weights byte-identical to the uninterrupted run")


def test_kill(ctx, trial):
    def extra(attempt):
        save = os.path.join(ctx.workdir, f"kill{trial}-{attempt}")
        return ["--save", save, "--save-interval", "1", "--keep-checkpoints", "3"], save
    job, at, pids, done, save = start_frozen(ctx, f"kill{trial}", extra)
    if not check(pids is not None and done < ITERS,
                 f"kill #{trial}: run reached iteration {at} with its {RANKS} rank processes, "
                 f"frozen still training (iteration {done} of {ITERS})"):
        job.wait(5)
        return
    victim = ctx.rng.randrange(RANKS)
    os.kill(pids[victim], signal.SIGKILL)
    thaw(pids, skip=victim)
    seconds = all_gone(job, pids, ctx.timeout)
    output = job.output()
    check(seconds is not None,
          f"kill #{trial}: rank {victim} killed at iteration {at}: every process gone in "
          f"{seconds if seconds is None else round(seconds, 1)} s (limit {ctx.timeout} s)")
    named = [line for line in output.splitlines() if f"rank {victim}" in line]
    check(bool(named), f"kill #{trial}: a message names rank {victim}: "
          f"{named[0].strip() if named else output[-500:]!r}")
    ctx.resume_matches_reference(f"kill{trial}", save)


def test_stop(ctx):
    job, at, pids, done, _ = start_frozen(ctx, "stop",
                                          lambda attempt: (["--distributed-timeout", "5"], None))
    if not check(pids is not None and done < ITERS,
                 f"stop: run reached iteration {at} with its {RANKS} rank processes, frozen "
                 f"still training (iteration {done} of {ITERS})"):
        job.wait(5)
        return
    victim = ctx.rng.randrange(RANKS)
    thaw(pids, skip=victim)  # the victim stays stopped: alive, but answering nobody
    seconds = all_gone(job, pids, 5 + 25)
    for p in pids.values():  # a stopped rank left behind must not outlive the test
        if alive(p):
            os.kill(p, signal.SIGKILL)
    output = job.output()
    check(seconds is not None, f"stop: rank {victim} stopped at iteration {at}: every process "
          f"gone in {seconds if seconds is None else round(seconds, 1)} s "
          f"(--distributed-timeout 5)")
    lines = [line for line in output.splitlines() if "did not finish within 5 s" in line]
    check(bool(lines), "stop: a rank names the stuck collective: "
          f"{lines[0].strip() if lines else output[-500:]!r}")


def test_sigterm(ctx):
    def extra(attempt):
        save = os.path.join(ctx.workdir, f"sigterm-{attempt}")
        return ["--save", save], save  # no --save-interval: only the stop saves
    job, at, pids, done, save = start_frozen(ctx, "sigterm", extra)
    if not check(pids is not None and done < ITERS,
                 f"sigterm: run reached iteration {at} with its {RANKS} rank processes, frozen "
                 f"still training (iteration {done} of {ITERS})"):
        job.wait(5)
        return
    victim = ctx.rng.randrange(RANKS)
    os.kill(pids[victim], signal.SIGTERM)  # pending until the victim runs again
    thaw(pids)
    status = job.wait(ctx.timeout)
    output = job.output()
    stopped = [line for line in output.splitlines() if f"SIGTERM on rank {victim}" in line]
    check(status == 0, f"sigterm: rank {victim} signalled at iteration {at}: mpirun exit {status}")
    check(bool(stopped), "sigterm: the message: "
          f"{stopped[0].strip() if stopped else output[-500:]!r}")
    checkpoints = [d for d in os.listdir(save) if d.startswith("iter_")] if os.path.isdir(save) else []
    check(len(checkpoints) == 1 and os.path.exists(os.path.join(save, checkpoints[0], "COMPLETE")),
          f"sigterm: one complete checkpoint written on the way out: {checkpoints}")
    ctx.resume_matches_reference("sigterm", save)


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))


def test_damaged(ctx):
    save = os.path.join(ctx.workdir, "damaged")
    status = ctx.run_to_end("damaged", ["--save", save, "--save-interval", "4",
                                        "--exit-interval", "12"])
    check(status == 0, "damaged: the first run saved iterations 4, 8 and 12")
    victim = ctx.rng.randrange(RANKS)
    flip_byte(os.path.join(save, "iter_0000012", f"rank_{victim:05d}.safetensors"))
    export = os.path.join(ctx.workdir, "damaged.safetensors")
    job = Job(ctx, "damaged-resume", ["--load", save, "--export-safetensors", export])
    status = job.wait(600)
    output = job.output()
    refusals = [line for line in output.splitlines() if "iter_0000012" in line]
    check(status == 0, f"damaged: resumed run exit {status}")
    check(len(refusals) == 1 and "damaged" in refusals[0] and "iter_0000008" in refusals[0],
          f"damaged: one line refuses iteration 12 and names 8: {refusals}")
    check(status == 0 and filecmp.cmp(export, ctx.reference, shallow=False),
          "damaged: final weights byte-identical to the uninterrupted run")


def test_nan(ctx):
    status = ctx.run_to_end("nan", ["--inject-nan-at", "5"])
    metrics = read_metrics(os.path.join(ctx.workdir, "nan.jsonl"))
    check(status == 0, "nan: a run with one NaN gradient (last rank, iteration 5) ends with exit 0")
    check(metrics.get(5, {}).get("skipped") is True and
          not any(m["skipped"] for i, m in metrics.items() if i != 5),
          "nan: rank 0's metrics mark exactly iteration 5 as skipped (agreed with rank 3)")
    save = os.path.join(ctx.workdir, "nan")
    job = Job(ctx, "nan-stop", ["--inject-nan-at", "5", "6", "7", "--max-skipped-iters", "2",
                                "--save", save, "--save-interval", "2"])
    status = job.wait(600)
    output = job.output()
    lines = [line for line in output.splitlines() if "in a row had a non-finite" in line]
    check(status == 1, f"nan: three skipped in a row with --max-skipped-iters 2: exit {status}")
    check(bool(lines) and "iter_0000006" in lines[0],
          f"nan: the message names the last checkpoint: {lines[0].strip() if lines else output[-500:]!r}")
    check(os.path.exists(os.path.join(save, "iter_0000006", "COMPLETE")) and
          not os.path.exists(os.path.join(save, "iter_0000008")),
          "nan: the last checkpoint (iteration 6) is complete and nothing later was written")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("moe_train")
    parser.add_argument("mpiexec")
    parser.add_argument("--trials", type=int, default=5, help="kill -9 trials")
    parser.add_argument("--only", default="kill,stop,sigterm,damaged,nan")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    tests = args.only.split(",")
    unknown = set(tests) - {"kill", "stop", "sigterm", "damaged", "nan"}
    if unknown:
        parser.error(f"unknown test(s) {sorted(unknown)}")
    print(f"fault_tolerance.py: seed {args.seed}", flush=True)
    workdir = tempfile.mkdtemp(prefix="moe_faults_")
    try:
        ctx = Context(args, workdir)
        if any(t in tests for t in ("kill", "sigterm", "damaged")):
            status = ctx.run_to_end("reference", ["--export-safetensors", ctx.reference])
            if not check(status == 0, "the uninterrupted reference run ends with exit 0"):
                return 1
        if "kill" in tests:
            for trial in range(1, args.trials + 1):
                test_kill(ctx, trial)
        for name in ("stop", "sigterm", "damaged", "nan"):
            if name in tests:
                globals()["test_" + name](ctx)
    finally:
        if args.keep:
            print("work directory kept:", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"fault_tolerance.py: {len(failures)} failed check(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
