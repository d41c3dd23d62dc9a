#!/usr/bin/python3
"""The control plane under load: SQLite, PostgreSQL with one replica, PostgreSQL with two.

Starts its own PostgreSQL (Debian's, from /usr/lib/postgresql/*/bin; as the postgres user when
run as root, since PostgreSQL refuses root) in a temporary folder with the default durability
(fsync on, like SQLite's synchronous=FULL), and pare-server processes with no workers (nothing
is compressed). For each store and client count, bench/control_plane.cc's load mode prints
calls per second and p50/p99 per call (GetJob, ListJobs, SubmitJob, a WatchJob's first
message); then its hand-off mode: --jobs jobs handed to --workers worker-protocol clients
through the replicas (Lease, Complete), every job leased exactly once.

Then the blob stores: --blob-files distinct 45 MB models uploaded and fetched back (as a worker
fetches a job's input) on SQLite + a blob folder, PostgreSQL + a blob folder, and PostgreSQL with
the blobs in the database (--blob-store postgresql), with the database's growth.

Usage: bench/control_plane.py [--bin-dir build] [--seconds 10] [--clients 16,64]
                              [--jobs 1000] [--workers 8] [--only sqlite,pg1,pg2,blobs]
                              [--blob-files 3]
Prints Markdown (the machine first); exits 1 when a run had errors or duplicate leases.
"""
import argparse
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import machine  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    @staticmethod
    def bin_dir():
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if not bins:
            raise SystemExit("control_plane.py: no PostgreSQL (apt install postgresql)")
        return os.path.dirname(bins[-1])

    def __init__(self):
        self.bin = Postgres.bin_dir()
        self.root = tempfile.mkdtemp(prefix="pare-cp-pg-", dir="/tmp")
        os.chmod(self.root, 0o755)
        self.as_user = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "pare", "-E", "UTF8", "--locale=C")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                    "max_connections = 300\n")
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-w", "-o", f"-p {self.port}",
                 "start")
        self.databases = 0

    def run(self, tool, *args):
        subprocess.run(self.as_user + [os.path.join(self.bin, tool), *args], check=True, cwd=self.root,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def new_database(self):
        self.databases += 1
        name = f"bench{self.databases}"
        subprocess.run([os.path.join(self.bin, "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "pare",
                        name], check=True)
        return f"postgresql://pare@127.0.0.1:{self.port}/{name}"

    def database_mb(self, url):
        name = url.rsplit("/", 1)[1]
        out = subprocess.run([os.path.join(self.bin, "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "pare",
                              "-d", name, "-Atc", "SELECT pg_database_size(current_database())"],
                             check=True, capture_output=True, text=True).stdout
        return int(out.strip()) / 1e6

    def stop(self):
        subprocess.run(self.as_user + [os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "fast", "stop"],
                       cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)


def model_files(work, n):
    """n distinct TorchScript ResNet-18s (random weights, 45 MB each) for the blob runs."""
    import torch
    import torchvision
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        path = os.path.join(work, f"resnet18-{i}.pt")
        torch.jit.script(torchvision.models.resnet18().eval()).save(path)
        paths.append(path)
    return paths


def blob_runs(a, pg, work):
    """Uploads and worker fetches of large models, on each blob store; returns whether one failed."""
    print(f"### Blob stores: {a.blob_files} distinct 45 MB models uploaded, then fetched by a worker, 1 server\n")
    files = model_files(work, a.blob_files)
    failed = False
    for title, store_kind, extra in [("SQLite + blob folder", "sqlite", []),
                                     ("PostgreSQL + blob folder", "pg", []),
                                     ("PostgreSQL + --blob-store postgresql", "pg", ["--blob-store", "postgresql"])]:
        store = "sqlite" if store_kind == "sqlite" else pg.new_database()
        before = pg.database_mb(store) if store_kind == "pg" else None
        servers = Servers(a.bin_dir, 1, store, work, extra)
        try:
            rc, lines = drive(a.bin_dir, servers, "--blobs", ",".join(files), "--worker-token", "bench-worker-token")
        finally:
            servers.stop()
        failed |= rc != 0
        print(f"#### {title}{'' if rc == 0 else ' (ERRORS: see stderr)'}\n")
        print("\n".join(lines))
        if before is not None:
            print(f"\nDatabase size: {before:.0f} MB before, {pg.database_mb(store):.0f} MB after")
        print(flush=True)
    return failed


class Servers:
    """n pare-server replicas on one store and one data folder, no workers."""

    def __init__(self, bin_dir, n, store, work, extra=()):
        self.procs, self.addresses = [], []
        data = tempfile.mkdtemp(prefix="data-", dir=work)
        token = os.path.join(work, "worker-token")
        with open(token, "w") as f:
            f.write("bench-worker-token\n")
        for _ in range(n):
            p = subprocess.Popen([os.path.join(bin_dir, "server", "pare-server"), "--listen", "127.0.0.1:0",
                                  "--metrics-listen", "127.0.0.1:0", "--data-dir", data, "--store", store,
                                  "--local-workers", "0", "--worker-token-file", token, "--max-queued-jobs",
                                  "100000000", "--tenant-max-active-jobs", "100000000", *extra],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            line = p.stdout.readline()
            if "listening on" not in line:
                raise SystemExit(f"pare-server did not start: {line}")
            self.addresses.append(line.split("listening on ")[1].split()[0])
            self.procs.append(p)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)


def cpu_seconds(pids):
    """User + system CPU seconds of these processes so far."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def postgres_pids():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "postgres":
                        out.append(int(d))
            except OSError:
                pass
    return out


def drive(bin_dir, servers, *args):
    cmd = [os.path.join(bin_dir, "bench", "pare-control-plane"), "--servers", ",".join(servers.addresses),
           "--model", os.path.join(bin_dir, "tests", "fixtures", "small_cnn.pt"), *args]
    server_pids = [p.pid for p in servers.procs]
    before_servers, before_pg = cpu_seconds(server_pids), cpu_seconds(postgres_pids())
    before_driver = os.times().children_user + os.times().children_system
    r = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(r.stderr)
    # Where the CPU went during the run (backends that ended meanwhile are not counted).
    used = (cpu_seconds(server_pids) - before_servers, cpu_seconds(postgres_pids()) - before_pg,
            os.times().children_user + os.times().children_system - before_driver)
    lines = r.stdout.strip().splitlines()
    lines.append(f"\nCPU seconds during the run: pare-server {used[0]:.1f}, PostgreSQL {used[1]:.1f}, "
                 f"driver {used[2]:.1f} ({os.cpu_count()} CPUs)")
    return r.returncode, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", default="16,64")
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--only", default="sqlite,pg1,pg2,blobs")
    ap.add_argument("--blob-files", type=int, default=3, help="models uploaded and fetched per blob store")
    ap.add_argument("--no-machine", action="store_true", help="leave out the machine header (run_all.sh prints it)")
    a = ap.parse_args()
    if not a.no_machine:
        machine.main()
    print(f"- PostgreSQL: {os.path.basename(os.path.dirname(Postgres.bin_dir()))} from Debian, started by the script "
          "(fsync and synchronous_commit on); replicas, database and driver share this machine's CPUs")
    print(f"\n## Control plane (bench/control_plane.py, {a.seconds:g} s per run, servers without workers)\n")
    pg = Postgres()
    work = tempfile.mkdtemp(prefix="pare-cp-")
    failed = False
    configs = [("sqlite", "SQLite, 1 server", 1), ("pg1", "PostgreSQL, 1 replica", 1),
               ("pg2", "PostgreSQL, 2 replicas", 2)]
    try:
        for key, title, n in configs:
            if key not in a.only.split(","):
                continue
            for clients in [int(c) for c in a.clients.split(",")]:
                store = "sqlite" if key == "sqlite" else pg.new_database()
                servers = Servers(a.bin_dir, n, store, work)
                try:
                    rc, lines = drive(a.bin_dir, servers, "--clients", str(clients), "--seconds", str(a.seconds))
                finally:
                    servers.stop()
                failed |= rc != 0
                print(f"### {title}, {clients} clients{'' if rc == 0 else ' (ERRORS: see stderr)'}\n")
                print("\n".join(lines) + "\n", flush=True)
        if any(key in a.only.split(",") for key, _, _ in configs):
            print(f"### Hand-off: {a.jobs} jobs to {a.workers} worker-protocol clients (Lease + Complete)\n")
        header_done = False
        notes = []
        for key, title, n in configs:
            if key not in a.only.split(","):
                continue
            store = "sqlite" if key == "sqlite" else pg.new_database()
            servers = Servers(a.bin_dir, n, store, work)
            try:
                rc, lines = drive(a.bin_dir, servers, "--jobs", str(a.jobs), "--workers", str(a.workers),
                                  "--worker-token", "bench-worker-token")
            finally:
                servers.stop()
            failed |= rc != 0
            rows = [l for l in lines if l.startswith("|")]
            cpu = [l.strip() for l in lines if "CPU seconds" in l]
            if not header_done:
                print("| store | " + rows[0][2:] + "\n|---" + rows[1])
                header_done = True
            print(f"| {title} | " + rows[2][2:], flush=True)
            notes.append(f"- {title}: {cpu[0]}")
        if notes:
            print("\n" + "\n".join(notes) + "\n")
        if "blobs" in a.only.split(","):
            failed |= blob_runs(a, pg, work)
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
