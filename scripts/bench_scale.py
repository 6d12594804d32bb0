"""One round with many clients over real gRPC: per-RPC latency, server CPU per upload, peak RSS per replica, errors.

    python scripts/bench_scale.py [--clients 1000] [--sweep 250,500,1000] [--workers 32] [--out runs/bench_scale.json]

Each client registers, polls PullTask until its task, downloads its global slice and uploads a synthetic update of
a real shape (SmolLM2-135M, LoRA r=8 on q,v; depths 30/20/10 round-robin, so 1.8/1.2/0.6 MB; fresh random values
per client, so no two blobs are alike), over its own gRPC channel, `--workers` clients at a time. No training.
Servers are real `prufed aggregator serve` processes:
  sqlite        1 replica, SQLite file + blob directory (the default deployment), at every N of --sweep;
  pg-1, pg-2    1 and 2 replicas on one throwaway PostgreSQL 15 cluster, --blob-store db, at N = --clients;
                clients list every replica and balance over them (gRPC round_robin).
An upload refused because the replica is at max_concurrent_uploads (UNAVAILABLE) is retried after 50 ms, as the
agent's backoff would: counted as `busy_retries`, not as an error. `errors` counts calls that failed for good.
CPU-s per upload = server (user+sys) seconds over the whole run / accepted uploads, all replicas together (from
/proc/PID/stat). Peak RSS per replica = VmHWM. The round closes with HeteAgg once every upload is in; `close_s` is
the time from the last upload to global version 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the throwaway PostgreSQL cluster helper

SMOLLM2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
DEPTHS = (30, 20, 10)
ENROLL = "bench-scale-enroll"
RPCS = ("Register", "PullTask", "DownloadGlobal", "UploadUpdate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_replicas(db: str, blob_args: list[str], count: int, clients: int, workdir: Path) -> list[tuple]:
    import yaml

    config = {"rounds": 1, "min_clients": clients, "deadline_s": 3600, "lora_r": 8, "lora_alpha": 16,
              "retry_after_s": 0.2, "register_burst": clients + 10, "register_per_min": 1e6,
              "max_concurrent_uploads": 16, "close_lease_s": 120}
    (workdir / "agg.yaml").write_text(yaml.safe_dump(config))
    procs = []
    for i in range(count):
        port = free_port()
        log = (workdir / f"replica-{i}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "prufed", "aggregator", "serve", "--listen",
                                 f"127.0.0.1:{port}", "--db", db, *blob_args, "--model", str(workdir / "model"),
                                 "--config", str(workdir / "agg.yaml"), "--enroll-token", ENROLL], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
        procs.append((proc, port, log))
    for proc, port, _log in procs:  # serially: replicas initialise one database
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    logs = "".join(p.read_text()[-1500:] for p in sorted(workdir.glob("replica-*.log")))
                    raise RuntimeError(f"replica on {port} did not start:\n{logs}") from None
                time.sleep(0.2)
    return procs


def synthetic_update(global_shapes: dict[str, tuple[int, ...]], kept: list[int], seed: int, examples: int,
                     path: Path) -> None:
    """A delta file of the real shapes for `kept` layers: small random values, unique per client."""
    import numpy as np
    import torch

    from prufed.common.adapter_format import DELTA_FORMAT, AdapterMeta
    from prufed.common.adapter_keys import keys_for_layers
    from prufed.common.wire import canonical_safetensors

    rng = np.random.default_rng(seed)
    tensors = {k: torch.from_numpy(rng.standard_normal(global_shapes[k], dtype=np.float32) * 1e-3)
               for k in keys_for_layers(global_shapes, kept)}
    path.write_bytes(canonical_safetensors(tensors, AdapterMeta(DELTA_FORMAT, tuple(kept), "", 1, examples).to_strings()))


def run_case(name: str, db: str, blob_args: list[str], replicas: int, clients: int, workers: int,
             workdir: Path) -> dict:
    import grpc

    from edge_client.transport import AggregatorClient, TransientError

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "model").mkdir(exist_ok=True)
    (workdir / "model" / "config.json").write_text(json.dumps(SMOLLM2))
    # the aggregator only reads the config and fingerprints the weight files: a stand-in file keeps this light
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"stand_in": np.zeros(1, dtype=np.float32)}, str(workdir / "model" / "model.safetensors"))
    procs = start_replicas(db, blob_args, replicas, clients, workdir)
    address = ",".join(f"127.0.0.1:{port}" for _p, port, _l in procs)
    cpu0 = sum(proc_cpu_s(p.pid) for p, _port, _log in procs)
    latency: dict[str, list[float]] = {rpc: [] for rpc in RPCS}
    errors: list[str] = []
    busy = [0]
    lock = threading.Lock()
    updates = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=workdir))

    def timed(rpc: str, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        with lock:
            latency[rpc].append(time.perf_counter() - started)
        return result

    def register(index: int):
        client = AggregatorClient(address, chunk_size=1 << 20)
        try:
            timed("Register", client.register, ENROLL, list(range(DEPTHS[index % 3])), name=f"bench-{index}")
        except Exception as exc:
            with lock:
                errors.append(f"Register: {exc}")
        return client

    def one_round(index: int, client) -> None:
        kept = list(range(DEPTHS[index % 3]))
        try:
            deadline = time.monotonic() + 1800
            while (task := timed("PullTask", client.pull_task)).kind != "task":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no task: {task.reason}")
                time.sleep(task.retry_after_s)
            tensors, _meta, _version = timed("DownloadGlobal", client.download_global)
            path = updates / f"{index}.safetensors"
            examples = 1 + index % 5
            synthetic_update({k: tuple(v.shape) for k, v in tensors.items()}, kept, index, examples, path)
            while True:
                try:
                    timed("UploadUpdate", client.upload_update, path, task.round, examples, kept)
                    break
                except TransientError as exc:
                    if exc.code != grpc.StatusCode.UNAVAILABLE or "max_concurrent_uploads" not in exc.details:
                        raise
                    with lock:
                        busy[0] += 1
                    time.sleep(0.05)
            path.unlink()
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        handles = list(pool.map(register, range(clients)))
        list(pool.map(lambda ic: one_round(*ic), enumerate(handles)))
    uploads_done = time.perf_counter()
    status = {}
    deadline = time.monotonic() + (600 if not errors else 0)  # a failed upload means the round cannot close
    while time.monotonic() < deadline:
        try:
            status = handles[0].status()
        except Exception:  # a busy replica: ask again
            status = {}
        if status.get("global_version") == 1:
            break
        time.sleep(0.5)
    closed = time.perf_counter()
    cpu = sum(proc_cpu_s(p.pid) for p, _port, _log in procs) - cpu0
    rss = [round(proc_hwm_mib(p.pid), 1) for p, _port, _log in procs]
    for client in handles:
        client.close()
    for proc, _port, log in procs:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    accepted = status.get("last_metrics", {}).get("updates", 0)
    return {
        "case": name, "clients": clients, "replicas": replicas, "errors": len(errors), "error_samples": errors[:5],
        "busy_retries": busy[0], "accepted_uploads": accepted, "global_version": status.get("global_version"),
        "round_s": round(uploads_done - started, 2), "close_s": round(closed - uploads_done, 2),
        "server_cpu_s_per_upload": round(cpu / max(1, accepted), 4), "peak_rss_mib_per_replica": rss,
        "latency_ms": {rpc: {"p50": round(1e3 * statistics.median(v), 2),
                             "p99": round(1e3 * statistics.quantiles(v, n=100)[98], 2) if len(v) > 1 else None,
                             "calls": len(v)} for rpc, v in latency.items() if v},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000, help="clients per round for the PostgreSQL cases")
    parser.add_argument("--sweep", default="250,500,1000", help="client counts for the SQLite memory sweep")
    parser.add_argument("--workers", type=int, default=32, help="clients in flight at once")
    parser.add_argument("--cases", default="sqlite,pg-1,pg-2", help="which cases to run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scale.json"), help="JSON output path")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        if "sqlite" in cases:
            for n in (int(x) for x in args.sweep.split(",")):
                results.append(run_case("sqlite", f"sqlite:///{work / f'sqlite-{n}' / 'agg.db'}", [], 1, n,
                                        args.workers, work / f"sqlite-{n}"))
                print(json.dumps(results[-1]), flush=True)
        if any(c.startswith("pg-") for c in cases):
            from postgres_cluster import PostgresCluster

            cluster = PostgresCluster.start()
            try:
                for case in (c for c in cases if c.startswith("pg-")):
                    replicas = int(case.split("-")[1])
                    db = cluster.create_database(f"bench_{replicas}")
                    spool = work / case / "spool"
                    results.append(run_case(case, db, ["--blob-store", "db", "--blob-dir", str(spool)], replicas,
                                            args.clients, args.workers, work / case))
                    print(json.dumps(results[-1]), flush=True)
            finally:
                cluster.stop()
    header = ["case", "N", "replicas", "errors", "busy", "round s", "close s", "CPU-s/upload", "peak RSS MiB",
              *[f"{rpc} p50/p99 ms" for rpc in RPCS]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        lat = [f"{r['latency_ms'][rpc]['p50']}/{r['latency_ms'][rpc]['p99']}" if rpc in r["latency_ms"] else "–"
               for rpc in RPCS]
        print(f"| {r['case']} | {r['clients']} | {r['replicas']} | {r['errors']} | {r['busy_retries']} | "
              f"{r['round_s']} | {r['close_s']} | {r['server_cpu_s_per_upload']} | "
              f"{', '.join(str(x) for x in r['peak_rss_mib_per_replica'])} | " + " | ".join(lat) + " |")
    sweep = [r for r in results if r["case"] == "sqlite"]
    if len(sweep) > 1:
        ratio = max(r["peak_rss_mib_per_replica"][0] for r in sweep) / min(r["peak_rss_mib_per_replica"][0]
                                                                          for r in sweep)
        print(f"SQLite peak RSS, largest / smallest N: {ratio:.2f}x over N = {[r['clients'] for r in sweep]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "workers": args.workers, "shape": "SmolLM2-135M r=8 q,v",
                                    "depths": DEPTHS}, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
