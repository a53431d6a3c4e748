#!/usr/bin/env python3
"""Pauses of this machine's CPUs under a load that keeps every CPU busy.

On a virtual machine the host can stop a vCPU; the guest's clock runs on, and every
thread on that vCPU sees time jump (so does a thread whose CPU handles interrupts for
that long). This runs one process per CPU, pinned, each reading CLOCK_MONOTONIC in a
loop for SECONDS, and reports the jumps longer than --min-ms: how many, the longest,
their total, and how many happened on every CPU at once. Run it on an otherwise idle
machine: it takes every CPU for the whole time, and a host that limits the machine's
CPU time may pause it more under this load than under a lighter one.

Usage: python3 bench/vm-pauses.py [SECONDS] [--min-ms 0.5]
"""
import argparse
import multiprocessing as mp
import os
import time


def watch(cpu, seconds, min_ns, out):
    os.sched_setaffinity(0, {cpu})
    now = time.clock_gettime_ns
    clock = time.CLOCK_MONOTONIC
    end = now(clock) + int(seconds * 1e9)
    last = now(clock)
    gaps = []
    while last < end:
        t = now(clock)
        if t - last > min_ns:
            gaps.append((last, t))
        last = t
    out.put((cpu, gaps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seconds", nargs="?", type=float, default=10.0)
    ap.add_argument("--min-ms", type=float, default=0.5, help="shortest jump reported (ms)")
    a = ap.parse_args()
    if a.seconds <= 0 or a.min_ms <= 0:
        ap.error("SECONDS and --min-ms must be positive")
    cpus = sorted(os.sched_getaffinity(0))
    out = mp.Queue()
    procs = [mp.Process(target=watch, args=(c, a.seconds, int(a.min_ms * 1e6), out)) for c in cpus]
    for p in procs:
        p.start()
    found = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    print(f"{a.seconds:g} s on {len(cpus)} CPUs, jumps of the clock over {a.min_ms:g} ms:")
    for c in cpus:
        g = [(b - s) / 1e6 for s, b in found[c]]
        longest = max(g, default=0.0)
        print(f"  cpu {c}: {len(g)} jumps, longest {longest:.2f} ms, total {sum(g):.1f} ms"
              f" ({sum(g) / (a.seconds * 10):.2f}% of the time)")
    # Jumps that overlap on every CPU: the whole machine stood still.
    spans = [found[c] for c in cpus]
    together = 0
    for s, e in spans[0]:
        if all(any(s2 < e and s < e2 for s2, e2 in other) for other in spans[1:]):
            together += 1
    print(f"  on every CPU at once: {together}")


if __name__ == "__main__":
    main()
