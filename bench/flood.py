#!/usr/bin/env python3
"""The /metrics listener under a flood: the release daemon syncs from the bundled simulator
(both on 127.0.0.1) while 2,000 idle connections and 1,000 concurrent /metrics requests hit
its listener. Reports the daemon's peak RSS and open file descriptors during the flood,
how the requests ended, and whether a sync requested during the flood (SIGHUP, 500 new
devices) completed, and how long it took.

Usage:  bench/flood.py [--no-build] [--devices 100000] [--idle 2000] [--concurrent 1000]
"""

import argparse
import asyncio
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import RELEASE, Simulator, build, free_port  # noqa: E402


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def devices_stored(db):
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute(
                "SELECT COUNT(*) FROM devices WHERE deleted_at IS NULL"
            ).fetchone()[0]
    except sqlite3.Error:
        return -1


async def scrape(port, timeout):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        w.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await w.drain()
        head = await asyncio.wait_for(r.read(64), timeout)
        await asyncio.wait_for(r.read(), timeout)
        w.close()
        return "200" if b" 200 " in head else ("closed" if not head else "other")
    except (asyncio.TimeoutError, OSError):
        return "closed"


async def flood(port, idle_n, concurrent_n, pid, db, want, sample):
    idle = []
    for _ in range(idle_n):
        try:
            idle.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            break
    started = time.perf_counter()
    os.kill(pid, signal.SIGHUP)  # sync now, during the flood
    tasks = [asyncio.create_task(scrape(port, 30)) for _ in range(concurrent_n)]
    synced_after = None
    while not all(t.done() for t in tasks) or synced_after is None:
        sample()
        if synced_after is None and devices_stored(db) == want:
            synced_after = time.perf_counter() - started
        if time.perf_counter() - started > 120:
            break
        await asyncio.sleep(0.05)
    results = [t.result() for t in tasks if t.done()]
    for _, w in idle:
        w.close()
    return len(idle), results, synced_after


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--concurrent", type=int, default=1000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if not args.no_build:
        build()
    with tempfile.TemporaryDirectory() as work:
        sim = Simulator(args.devices, work)
        port = free_port()
        db = os.path.join(work, "adesync.db")
        config = os.path.join(work, "config.toml")
        with open(config, "w") as f:
            f.write(
                f'database = "{db}"\nschedule = "1h"\n[http]\nlisten = "127.0.0.1:{port}"\n'
                f'[[tokens]]\nname = "bench"\ntoken_file = "{sim.token}"\n'
                f'api_url = "{sim.url}"\npage_size = 1000\n'
            )
        daemon = subprocess.Popen(
            [os.path.join(RELEASE, "adesync"), "--config", config, "run"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, RUST_LOG="warn"),
            # systemd's default soft limit, as in the unit before LimitNOFILE.
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
        )
        try:
            deadline = time.time() + 600
            while devices_stored(db) != args.devices and time.time() < deadline:
                time.sleep(0.2)
            base_rss, base_fds = rss_mib(daemon.pid), fds(daemon.pid)
            sim.admin("/_mock/devices", {"count": 500})
            peak = {"rss": base_rss, "fds": base_fds}

            def sample():
                peak["rss"] = max(peak["rss"], rss_mib(daemon.pid))
                peak["fds"] = max(peak["fds"], fds(daemon.pid))

            opened, results, synced_after = asyncio.run(
                flood(port, args.idle, args.concurrent, daemon.pid, db, args.devices + 500, sample)
            )
            counts = {k: results.count(k) for k in sorted(set(results))}
            print(f"devices: {args.devices:,}; idle connections opened: {opened:,}; "
                  f"concurrent /metrics requests: {args.concurrent:,}")
            print(f"daemon RSS: {base_rss:.1f} MiB before, {peak['rss']:.1f} MiB peak during the flood")
            print(f"daemon open fds: {base_fds} before, {peak['fds']} peak during the flood")
            print(f"request outcomes: {counts}")
            if synced_after is None:
                print("sync requested during the flood: DID NOT COMPLETE")
            else:
                print(f"sync requested during the flood: completed after {synced_after:.2f} s")
        finally:
            daemon.terminate()
            daemon.wait()
            sim.stop()


if __name__ == "__main__":
    main()
