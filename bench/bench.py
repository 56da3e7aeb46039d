#!/usr/bin/env python3
"""adesync benchmark: whole-process measurements of `adesync run --once` (release build)
against the bundled Apple simulator running as a separate process on 127.0.0.1.

For every scenario it reports the median, min and max of wall time, user+sys CPU and peak
RSS of the adesync process, devices per second, and the simulator's CPU separately (so a
slow simulator is visible, not hidden in adesync's figures). It also measures the floor:
the same pages downloaded and parsed but not stored, and SQLite inserting the same number
of rows with a prepared statement in one transaction.

With --org-sizes it also measures the organisation inventory (Apple School/Business Manager
API, `[[org_accounts]]`, requests_per_second = 100, page size 1000) against a simulator
holding only organisation devices: the first walk into an empty store, a re-walk of the same
store with nothing changed (checked with sqlite3: org_devices max(updated_at) and the events
count must not move), and the floor (examples/org_fetch_floor.rs: the same orgDevices pages
downloaded and parsed through adesync's own client and parser, nothing stored), run
alternately with the re-walk, and the ratio re-walk / floor (issue target: <= 1.5x).

With --postgres URL it also runs the largest size's first fetch, no-op and 100,000-change
incremental with the mirror in PostgreSQL (same simulator seed, same machine, same run), and
with --org-sizes the largest organisation's first walk and unchanged re-walk.

Usage:  bench/bench.py [--quick] [--runs N] [--sizes 10000,100000,1000000]
                       [--org-sizes 10000,100000] [--postgres URL] [--markdown FILE] [--threads]
        --org-sizes is off by default, also under --quick; --sizes "" skips the ADE scenarios.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--workspace", "--bins", "--examples"],
        cwd=ROOT,
        check=True,
    )


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stat_cpu(path):
    """(name, user+sys seconds) from a /proc/.../stat file of a live process or thread."""
    with open(path) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu(pid):
    """user+sys seconds a live process has used so far."""
    return stat_cpu(f"/proc/{pid}/stat")[1]


class Simulator:
    def __init__(self, devices, workdir, org_devices=None):
        self.port = free_port()
        self.token = os.path.join(workdir, "token.json")
        argv = [
            os.path.join(RELEASE, "adesync-mock"),
            "--devices", str(devices),
            "--port", str(self.port),
            "--seed", "7",
            "--write-token", self.token,
        ]
        if org_devices is not None:
            # Writes org-account.pem and org-account.json next to the token.
            argv += ["--org-devices", str(org_devices)]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/_mock/stats", timeout=1).read()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("simulator did not start")

    def admin(self, path, body):
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return urllib.request.urlopen(req, timeout=600).read()

    def cpu(self):
        return proc_cpu(self.proc.pid)

    def devices(self):
        """How many devices the simulator has assigned now (what a full fetch returns)."""
        return json.loads(urllib.request.urlopen(self.url + "/_mock/stats", timeout=10).read())["devices"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def write_config(workdir, sim, db="adesync.db"):
    path = os.path.join(workdir, "config.toml")
    with open(path, "w") as f:
        f.write(
            f'database = "{db}"\n'
            f'[[tokens]]\nname = "bench"\ntoken_file = "{sim.token}"\n'
            f'api_url = "{sim.url}"\npage_size = 1000\n'
        )
    return path


def write_org_config(workdir, sim, db="adesync.db"):
    """A config with one [[org_accounts]] entry and no [[tokens]]."""
    ids_file = os.path.join(workdir, "org-account.json")
    deadline = time.time() + 30
    while True:  # the simulator writes the account's files just after it starts listening
        try:
            with open(ids_file) as f:
                ids = json.load(f)
            if os.path.exists(os.path.join(workdir, "org-account.pem")):
                break
        except (OSError, ValueError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the simulator did not write {ids_file}")
        time.sleep(0.1)
    path = os.path.join(workdir, "org-config.toml")
    with open(path, "w") as f:
        f.write(
            f'database = "{db}"\n'
            f'[[org_accounts]]\nname = "org"\n'
            f'client_id = "{ids["client_id"]}"\nkey_id = "{ids["key_id"]}"\n'
            f'private_key_file = "{os.path.join(workdir, "org-account.pem")}"\n'
            f'api_url = "{sim.url}"\ntoken_url = "{sim.url}/auth/oauth2/token"\n'
            f"requests_per_second = 100\npage_size = 1000\n"
        )
    return path


# With --threads: each measured run also carries the CPU of each of its process's threads.
THREADS = False


class Measured(tuple):
    """(wall s, cpu s, peak RSS MiB), with .threads: [(name, cpu s)] busiest first, or None."""
    threads = None


def thread_cpu(pid):
    """{tid: (name, cpu s)} of a running process, from /proc."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out[tid] = stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
    return out


def run_measured(argv, env=None):
    """Runs a command; returns (wall s, cpu s, peak RSS MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if THREADS:
        # Polled every 20 ms until the process exits: each thread's last reading.
        seen = {}
        while True:
            seen.update(thread_cpu(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        threads = sorted(seen.values(), key=lambda t: -t[1])
    else:
        threads = None
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed: {err[-2000:]}")
    m = Measured((wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0))
    m.threads = threads
    return m


def sync_once(config):
    env = dict(os.environ, RUST_LOG="warn")
    return run_measured([os.path.join(RELEASE, "adesync"), "--config", config, "run", "--once"], env)


def summarize(name, devices, samples, sim_cpu):
    walls = [s[0] for s in samples]
    cpus = [s[1] for s in samples]
    rss = [s[2] for s in samples]
    med = statistics.median(walls)
    return {
        "scenario": name,
        "devices": devices,
        "runs": len(samples),
        "wall_median": med,
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu_median": statistics.median(cpus),
        "rss_median": statistics.median(rss),
        "rss_max": max(rss),
        "devices_per_s": devices / med if med > 0 else 0,
        "cpu_us_per_device": statistics.median(cpus) / devices * 1e6 if devices else 0,
        "sim_cpu_median": statistics.median(sim_cpu),
        "threads": busiest_threads(samples),
    }


def busiest_threads(samples):
    """The median CPU of the runs' busiest, second busiest, ... thread, named as in the
    first run ("" without --threads)."""
    runs = [s.threads for s in samples if getattr(s, "threads", None)]
    if not runs:
        return ""
    ranks = min(len(r) for r in runs)
    parts = []
    for i in range(min(ranks, 4)):
        cpu = statistics.median(r[i][1] for r in runs)
        if cpu >= 0.05:
            parts.append(f"{runs[0][i][0]} {cpu:.2f} s")
    return ", ".join(parts)


def scenario_full_fetch(n, runs):
    work = tempfile.mkdtemp(prefix="adesync-bench-")
    sim = Simulator(n, work)
    try:
        config = write_config(work, sim)
        samples, sim_cpu = [], []
        for _ in range(runs):
            for f in ("adesync.db", "adesync.db-wal", "adesync.db-shm"):
                if os.path.exists(os.path.join(work, f)):
                    os.remove(os.path.join(work, f))
            c0 = sim.cpu()
            samples.append(sync_once(config))
            sim_cpu.append(sim.cpu() - c0)
        r = summarize(f"full fetch, fresh database", n, samples, sim_cpu)
        r["db_bytes"] = db_bytes(os.path.join(work, "adesync.db"))
        return r, (sim, work, config)
    except Exception:
        sim.stop()
        raise


def db_bytes(db):
    """Size of the database file with its WAL, as a run leaves it."""
    return sum(os.path.getsize(db + ext) for ext in ("", "-wal") if os.path.exists(db + ext))


def run_cli(config, args):
    env = dict(os.environ, RUST_LOG="warn")
    return run_measured([os.path.join(RELEASE, "adesync"), "--config", config] + args, env)


def scenario_queries(config, runs, store_size):
    """The read side on the store the full fetch left: a whole export, one device with its
    history, and the newest 100,000 events (the same commands an admin runs)."""
    db = os.path.join(os.path.dirname(config), "adesync.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (serial,) = con.execute(
            "SELECT serial_number FROM devices ORDER BY id LIMIT 1 OFFSET ?", (store_size // 2,)
        ).fetchone()
        (max_id,) = con.execute("SELECT max(id) FROM events").fetchone()
    finally:
        con.close()
    queries = [
        (f"query: devices --format csv (all {store_size:,})", ["devices", "--format", "csv"], store_size),
        ("query: device SERIAL (fields and history)", ["device", serial], 1),
        ("query: events --after (the newest 100,000, json)",
         ["events", "--after", str(max(0, max_id - 100_000)), "--format", "json", "--limit", "100000"],
         min(100_000, max_id)),
    ]
    out = []
    for name, args, n in queries:
        samples = [run_cli(config, args) for _ in range(runs)]
        out.append(summarize(name, n, samples, [0.0]))
    return out


def scenario_incremental(sim, config, runs):
    samples, sim_cpu = [], []
    for _ in range(runs):
        sim.admin("/_mock/devices", {"count": 60000})
        sim.admin("/_mock/devices/modify", {"count": 30000})
        sim.admin("/_mock/devices/delete", {"count": 10000})
        c0 = sim.cpu()
        samples.append(sync_once(config))
        sim_cpu.append(sim.cpu() - c0)
    return summarize("incremental: 60k added, 30k modified, 10k deleted", 100_000, samples, sim_cpu)


def scenario_noop(sim, config, runs, store_size):
    samples, sim_cpu = [], []
    for _ in range(runs):
        c0 = sim.cpu()
        samples.append(sync_once(config))
        sim_cpu.append(sim.cpu() - c0)
    r = summarize(f"no-op sync, store of {store_size:,}", 0, samples, sim_cpu)
    r["devices"] = store_size
    r["devices_per_s"] = 0
    return r


def scenario_reconcile(sim, config, runs):
    """The expired cursor's full re-fetch, and the floor of the same number of devices run
    alternately with it. After the incrementals the simulator holds more devices than the
    first fetch did (each adds 60,000 and deletes 10,000), so the re-fetch is read against a
    floor that downloads and parses as many as it does, not the first fetch's."""
    n = sim.devices()
    samples, sim_cpu, floor, floor_cpu = [], [], [], []
    exe = os.path.join(RELEASE, "examples", "fetch_floor")
    for _ in range(runs):
        sim.admin("/_mock/clock/advance", {"seconds": 8 * 86400})
        c0 = sim.cpu()
        samples.append(sync_once(config))
        sim_cpu.append(sim.cpu() - c0)
        c0 = sim.cpu()
        floor.append(run_measured([exe, sim.url, sim.token, str(n)]))
        floor_cpu.append(sim.cpu() - c0)
    return [
        summarize("expired cursor: full re-fetch + reconcile", n, samples, sim_cpu),
        summarize(f"floor: download + parse only, nothing stored (the re-fetch's {n:,})", n, floor, floor_cpu),
    ]


def target_notes(results):
    """The issue's targets read from one run: each ratio against the floor of the same size."""
    def find(prefix, devices=None):
        for r in results:
            if r["scenario"].startswith(prefix) and (devices is None or r["devices"] == devices):
                return r
        return None
    notes = []
    def ratio(name, a, b, target):
        if a and b:
            x = a["wall_median"] / b["wall_median"]
            notes.append(f"target: {name} = {a['wall_median']:.3f} s / {b['wall_median']:.3f} s = {x:.2f}x "
                         f"(<= {target}x: {'met' if x <= target else 'NOT met'})")
    largest = max((r["devices"] for r in results if r["scenario"] == "full fetch, fresh database"), default=None)
    if largest is None:
        return notes
    ratio(f"first fetch of {largest:,} / its download + parse", find("full fetch, fresh database", largest),
          find("floor: download + parse only, nothing stored", largest), 1.5)
    refetch = find("expired cursor")
    if refetch:
        ratio(f"full re-fetch of {refetch['devices']:,}, nothing changed / its download + parse", refetch,
              find("floor: download + parse only, nothing stored (the re-fetch's"), 1.3)
    ratio("100,000 changes / their download + parse", find("incremental"),
          find("floor: download + parse only, nothing stored (the incremental's", 100_000), 3)
    noop = find("no-op sync")
    if noop:
        notes.append(f"target: no-op sync {noop['wall_median'] * 1000:.0f} ms "
                     f"(<= 100 ms: {'met' if noop['wall_median'] <= 0.1 else 'NOT met'})")
    return notes


def psql(url, sql):
    """Runs SQL with psql against `url`; returns its unaligned output."""
    out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", url, "-c", sql],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def pg_fresh_schema(url, schema):
    psql(url, f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-c%20search_path%3D{schema}"


def pg_bytes(url, schema):
    """Size of the schema's tables with their indexes and TOAST."""
    return int(psql(url, f"SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c "
                         f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{schema}' "
                         f"AND c.relkind IN ('r', 'm')"))


def first_runs_postgres(url, schema, sim, work, runs, name, n, config_for):
    """`runs` first syncs, each into a fresh schema with the config `config_for(work, sim,
    db)` writes; returns (summary with the schema's size, the last db URL, its config)."""
    samples, sim_cpu = [], []
    for _ in range(runs):
        db = pg_fresh_schema(url, schema)
        config = config_for(work, sim, db)
        c0 = sim.cpu()
        samples.append(sync_once(config))
        sim_cpu.append(sim.cpu() - c0)
    r = summarize(name, n, samples, sim_cpu)
    r["pg_bytes"] = pg_bytes(url, schema)
    return r, db, config


def scenarios_postgres(url, n, runs):
    """The 1M first fetch, the no-op and the 100,000-change incremental on PostgreSQL, each
    into a schema of its own (dropped afterwards), against the same simulator seed."""
    schema = "adesync_bench"
    work = tempfile.mkdtemp(prefix="adesync-bench-pg-")
    sim = Simulator(n, work)
    out = []
    try:
        r, _, config = first_runs_postgres(url, schema, sim, work, runs,
                                           "postgres: full fetch, fresh database", n, write_config)
        out.append(r)
        print(table([r]).splitlines()[-1], flush=True)
        for r in [scenario_noop(sim, config, runs, n), scenario_incremental(sim, config, runs)]:
            r["scenario"] = "postgres: " + r["scenario"]
            out.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)
        psql(url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return out


def scenarios_org_postgres(url, n, runs):
    """The organisation's first walk into an empty PostgreSQL schema and an unchanged
    re-walk (checked: no row rewritten, no event), as `scenarios_org` does on SQLite."""
    schema = "adesync_bench_org"
    work = tempfile.mkdtemp(prefix="adesync-bench-pg-org-")
    sim = Simulator(0, work, org_devices=n)
    out = []
    state = ("SELECT (SELECT count(*) FROM org_devices) || '|' || "
             "COALESCE((SELECT max(updated_at) FROM org_devices), '') || '|' || "
             "(SELECT count(*) FROM events)")
    try:
        first, db, config = first_runs_postgres(url, schema, sim, work, runs,
                                                "postgres: org first walk, empty store", n,
                                                write_org_config)
        stored, newest, events = psql(db, state).split("|")
        if int(stored) != n or int(events) != n:
            raise RuntimeError(f"org first walk on PostgreSQL stored {stored} devices and {events} events, expected {n}")
        samples, sim_cpu = [], []
        for _ in range(runs):
            c0 = sim.cpu()
            samples.append(sync_once(config))
            sim_cpu.append(sim.cpu() - c0)
            if psql(db, state) != f"{stored}|{newest}|{events}":
                raise RuntimeError("an unchanged org re-walk on PostgreSQL wrote rows or events")
        rewalk = summarize("postgres: org re-walk, nothing changed", n, samples, sim_cpu)
        for r in (first, rewalk):
            out.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)
        psql(url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return out


def floor_parse(sim, n, runs):
    samples, sim_cpu = [], []
    exe = os.path.join(RELEASE, "examples", "fetch_floor")
    for _ in range(runs):
        c0 = sim.cpu()
        samples.append(run_measured([exe, sim.url, sim.token, str(n)]))
        sim_cpu.append(sim.cpu() - c0)
    return summarize("floor: download + parse only, nothing stored", n, samples, sim_cpu)


def floor_sqlite(n, runs):
    samples = []
    exe = os.path.join(RELEASE, "examples", "sqlite_floor")
    for _ in range(runs):
        work = tempfile.mkdtemp(prefix="adesync-floor-")
        samples.append(run_measured([exe, os.path.join(work, "floor.db"), str(n)]))
        shutil.rmtree(work)
    return summarize("floor: SQLite prepared inserts, one transaction", n, samples, [0.0])


def org_state(db):
    """(org devices stored, max(updated_at) of org_devices, events count), read-only."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        n, newest = con.execute("SELECT count(*), max(updated_at) FROM org_devices").fetchone()
        (events,) = con.execute("SELECT count(*) FROM events").fetchone()
        return n, newest, events
    finally:
        con.close()


def scenarios_org(n, runs):
    """First walk, then floor and unchanged re-walk alternately; returns (rows, notes)."""
    work = tempfile.mkdtemp(prefix="adesync-bench-org-")
    sim = Simulator(0, work, org_devices=n)
    try:
        config = write_org_config(work, sim)
        db = os.path.join(work, "adesync.db")
        samples, sim_cpu = [], []
        for _ in range(runs):
            for f in ("adesync.db", "adesync.db-wal", "adesync.db-shm"):
                if os.path.exists(os.path.join(work, f)):
                    os.remove(os.path.join(work, f))
            c0 = sim.cpu()
            samples.append(sync_once(config))
            sim_cpu.append(sim.cpu() - c0)
        first = summarize("org first walk, empty store", n, samples, sim_cpu)
        stored, newest, events = org_state(db)
        if stored != n or events != n:
            raise RuntimeError(f"org first walk stored {stored} devices and {events} events, expected {n}")
        print(table([first]).splitlines()[-1], flush=True)

        exe = os.path.join(RELEASE, "examples", "org_fetch_floor")
        walk, walk_cpu, floor, floor_cpu = [], [], [], []
        changed = []
        for _ in range(runs):
            c0 = sim.cpu()
            floor.append(run_measured([exe, config, str(n)]))
            floor_cpu.append(sim.cpu() - c0)
            before = org_state(db)
            c0 = sim.cpu()
            walk.append(sync_once(config))
            walk_cpu.append(sim.cpu() - c0)
            after = org_state(db)
            if after != before:
                changed.append((before, after))
        rewalk = summarize("org re-walk, nothing changed", n, walk, walk_cpu)
        base = summarize("org floor: download + parse only, nothing stored", n, floor, floor_cpu)
        for r in (rewalk, base):
            print(table([r]).splitlines()[-1], flush=True)
        ratio = rewalk["wall_median"] / base["wall_median"]
        cpu_ratio = rewalk["cpu_median"] / base["cpu_median"]
        if changed:
            written = f"CHANGED the store in {len(changed)} of {runs} re-walks: {changed}"
        else:
            written = (
                f"wrote no row and no event in {runs} of {runs} re-walks "
                f"(org_devices max(updated_at) {newest}, events {events}, unchanged)"
            )
        note = (
            f"org {n:,}: re-walk / floor = {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU "
            f"(target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'}); re-walk {written}"
        )
        print(note, flush=True)
        return [first, rewalk, base], [note]
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)


def table(results):
    lines = [
        "| scenario | devices | wall median (min–max) | CPU user+sys | peak RSS | devices/s | CPU µs/device | simulator CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['devices']:,} | {r['wall_median']:.3f} s ({r['wall_min']:.3f}–{r['wall_max']:.3f}) "
            f"| {r['cpu_median']:.3f} s | {r['rss_median']:.1f} MiB (max {r['rss_max']:.1f}) "
            f"| {r['devices_per_s']:,.0f} | {r['cpu_us_per_device']:.2f} | {r['sim_cpu_median']:.2f} s |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--org-sizes", default="",
                    help="organisation inventory sizes, e.g. 10000,100000 (default: none, also under --quick)")
    ap.add_argument("--quick", action="store_true", help="1 run each, sizes 10k and 100k")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--threads", action="store_true",
                    help="also report each measured process's busiest threads and their CPU "
                         "(/proc polled every 20 ms; in adesync the busiest tokio-rt-worker of a "
                         "sync is the page writer, the thread named adesync downloads and parses)")
    ap.add_argument("--postgres", metavar="URL",
                    help="also run the first fetch, no-op and incremental of the largest size (and, "
                         "with --org-sizes, the largest organisation's first walk and re-walk) on this "
                         "PostgreSQL database (schemas adesync_bench* are made and dropped), e.g. the "
                         "URL `ADESYNC_CI_PG_DURABLE=1 .ci/postgres start` prints")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.quick:
        args.runs, args.sizes = 1, "10000,100000"
    sizes = [int(s) for s in args.sizes.split(",") if s]
    org_sizes = [int(s) for s in args.org_sizes.split(",") if s]
    if not args.no_build:
        build()

    results, notes = [], []
    largest = None
    for n in sizes:
        r, ctx = scenario_full_fetch(n, args.runs)
        results.append(r)
        print(table([r]).splitlines()[-1], flush=True)
        if largest:
            largest[0].stop()
        largest = ctx + (n,)
    if largest:
        sim, work, config, n = largest
        try:
            queries = scenario_queries(config, args.runs, n)
            floor_small = floor_parse(sim, min(n, 100_000), args.runs)
            floor_small["scenario"] += " (the incremental's 100,000)"
            for r in queries + [
                floor_parse(sim, n, args.runs),
                floor_small,
                floor_sqlite(n, args.runs),
                scenario_noop(sim, config, args.runs, n),
                scenario_incremental(sim, config, args.runs),
            ] + scenario_reconcile(sim, config, args.runs):
                results.append(r)
                print(table([r]).splitlines()[-1], flush=True)
        finally:
            sim.stop()
            shutil.rmtree(work, ignore_errors=True)
    if args.postgres and sizes:
        results += scenarios_postgres(args.postgres, max(sizes), args.runs)
    for n in org_sizes:
        rows, note = scenarios_org(n, args.runs)
        results += rows
        notes += note
    if args.postgres and org_sizes:
        results += scenarios_org_postgres(args.postgres, max(org_sizes), args.runs)
    out = table(results)
    notes += target_notes(results)
    notes += [f"database after the {r['devices']:,}-device full fetch: {r['db_bytes'] / 1e6:.0f} MB"
              for r in results if "db_bytes" in r]
    notes += [f"threads of \"{r['scenario']}\" ({r['devices']:,}), median CPU, busiest first: {r['threads']}"
              for r in results if r.get("threads")]
    notes += [f"PostgreSQL schema after \"{r['scenario']}\" of {r['devices']:,} devices (tables, indexes, TOAST): "
              f"{r['pg_bytes'] / 1e6:.0f} MB" for r in results if "pg_bytes" in r]
    if notes:
        out += "\n\n" + "\n".join(f"- {line}" for line in notes)
    print("\n" + out)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    sys.exit(main())
