"""Control-RPC latency and server memory under the resource attacks of issue 14, against an idle baseline.

    python scripts/bench_adversarial.py [--streams 200] [--calls 200] [--out runs/bench_adversarial.json]

The real aggregator (default AggregatorConfig limits, tiny random LLaMA) runs in a subprocess on 127.0.0.1. The
attacker is given `--streams` enrolled clients (registration limits lifted for it: the worst case), all sampled
for the open round. Phases, each measured from a separate well-behaved probe client:
  baseline  no attack
  idle      every attacker opens UploadUpdate, sends its header and 4 MiB, then nothing (F3)
  slow      every attacker sends its header, then 1 byte per second (F3)
  bomb      20 uploads whose safetensors header declares 90 MiB of `[[],[],...]`, 8 MiB of it sent (F4)
Per phase: PullTask and Health latency p50/p99 over `--calls` sequential calls each; the server's peak VmRSS
(sampled every 20 ms) against its RSS before any attack (ratio; goal < 2x); how the attack streams ended (held
streams end when the attacker gives up after the probe calls: INVALID_ARGUMENT "truncated"; the server's own idle
and overall cut-offs are asserted in tests/test_adversarial.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ENROLL = "bench-enroll-token"


def serve(workdir: Path, clients: int) -> None:
    """Subprocess body: the aggregator with default limits, printing its port; runs until stdin closes."""
    from aggregator.config import AggregatorConfig
    from aggregator.server import create_server
    from aggregator.state import Store

    config = AggregatorConfig(rounds=1, min_clients=clients, deadline_s=3600, lora_r=4, lora_alpha=8,
                              register_burst=clients + 10, max_clients=clients + 10)
    store = Store(f"sqlite:///{workdir / 'agg.db'}")
    server, port = create_server("127.0.0.1:0", store, config, enroll_tokens=[ENROLL], model_dir=workdir / "model")
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def latencies(probe, calls: int) -> dict:
    out = {}
    for name, call in (("pull_task", probe.pull_task), ("health", probe.health)):
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        samples.sort()
        out[f"{name}_p50_ms"] = round(1000 * statistics.median(samples), 1)
        out[f"{name}_p99_ms"] = round(1000 * samples[min(len(samples) - 1, int(0.99 * len(samples)))], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="attack streams (one enrolled client each)")
    parser.add_argument("--calls", type=int, default=200, help="probe calls per RPC and phase")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_adversarial.json"), help="JSON output path")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.workdir, args.clients)
        return 0
    if args.streams < 1 or args.calls < 10:
        parser.error("--streams must be >= 1 and --calls >= 10")

    import grpc

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import save_tiny_model

    from edge_client.transport import AggregatorClient
    from prufed.v1 import aggregator_pb2 as pb

    layers = [0, 1]
    with tempfile.TemporaryDirectory(prefix="bench-adversarial-") as tmp:
        workdir = Path(tmp)
        save_tiny_model(workdir / "model")
        proc = subprocess.Popen([sys.executable, __file__, "--serve", "--workdir", str(workdir), "--clients",
                                 str(args.streams + 1)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        port = proc.stdout.readline().strip()
        if not port.isdecimal():
            raise SystemExit("the aggregator failed to start")
        address = f"127.0.0.1:{port}"
        results: dict = {"streams": args.streams, "calls": args.calls}
        try:
            probe = AggregatorClient(address, timeout_s=30)
            probe.register(ENROLL, layers)
            attackers = [AggregatorClient(address, timeout_s=600) for _ in range(args.streams)]
            for client in attackers:
                client.register(ENROLL, layers)
            while probe.pull_task().kind != "task":
                time.sleep(0.2)
            tensors, _meta, _v = probe.download_global()
            index = [pb.TensorInfo(name=k, shape=list(v.shape), dtype="F32") for k, v in sorted(tensors.items())]

            def header(total: int) -> pb.UploadChunk:
                return pb.UploadChunk(header=pb.UploadHeader(round=1, total_bytes=total, num_examples=1,
                                                             kept_layers=layers, tensors=index))

            idle_rss = rss_mib(proc.pid)
            results["idle_rss_mib"] = round(idle_rss, 1)

            def attack(name: str, stream_of, clients, settle_s: float) -> None:
                release = threading.Event()
                futures = [c.stub.UploadUpdate.future(stream_of(release), metadata=c._metadata(), timeout=600)
                           for c in clients]
                with RssSampler(proc.pid) as rss:
                    time.sleep(settle_s)
                    row = latencies(probe, args.calls)
                    release.set()
                    ends: Counter = Counter()
                    for future in futures:
                        try:
                            future.result(timeout=120)
                            ends["OK"] += 1
                        except grpc.RpcError as err:
                            ends[err.code().name] += 1
                row.update(peak_rss_mib=round(rss.peak, 1), rss_ratio=round(rss.peak / idle_rss, 2),
                           stream_ends=dict(ends))
                results[name] = row

            def idle(release):
                yield header(8 << 20)
                for _ in range(4):
                    yield pb.UploadChunk(data=b"\x00" * (1 << 20))
                release.wait(600)

            def slow(release):
                yield header(8 << 20)
                while not release.wait(1.0):
                    yield pb.UploadChunk(data=b"\x00")

            def bomb(release):
                body = b"[" + b"[]," * ((8 << 20) // 3) + b"[]]"
                yield header(len(body) + 8)
                data = struct.pack("<Q", 90 << 20) + body
                for start in range(0, len(data), 1 << 20):
                    yield pb.UploadChunk(data=data[start:start + (1 << 20)])
                release.wait(600)

            with RssSampler(proc.pid) as rss:
                results["baseline"] = latencies(probe, args.calls) | {"peak_rss_mib": round(rss.peak, 1)}
            attack("idle", idle, attackers, settle_s=3.0)
            attack("slow", slow, attackers, settle_s=3.0)
            attack("bomb", bomb, attackers[:20], settle_s=3.0)
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)
    base = results["baseline"]
    print(f"aggregator RSS before any attack: {results['idle_rss_mib']} MiB; {args.streams} attack streams; "
          f"{args.calls} probe calls per RPC")
    print("| phase | PullTask p50 / p99 ms | Health p50 / p99 ms | p99 vs baseline | peak RSS MiB | RSS / idle | "
          "attack streams ended |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for phase in ("baseline", "idle", "slow", "bomb"):
        row = results[phase]
        ratio = max(row["pull_task_p99_ms"] / base["pull_task_p99_ms"], row["health_p99_ms"] / base["health_p99_ms"])
        print(f"| {phase} | {row['pull_task_p50_ms']} / {row['pull_task_p99_ms']} | {row['health_p50_ms']} / "
              f"{row['health_p99_ms']} | {ratio:.2f}x | {row['peak_rss_mib']} | {row.get('rss_ratio', '')} | "
              f"{row.get('stream_ends', '')} |")
    worst_p99 = max(results[p][k] for p in ("idle", "slow", "bomb") for k in ("pull_task_p99_ms", "health_p99_ms"))
    worst_rss = max(results[p]["rss_ratio"] for p in ("idle", "slow", "bomb"))
    print(f"worst control p99 under attack: {worst_p99} ms (goal < 1000); worst peak RSS {worst_rss}x idle (goal < 2x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
