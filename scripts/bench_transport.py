"""UploadUpdate throughput against a raw gRPC byte stream of the same size, measured in the same run.

    python scripts/bench_transport.py [--repeats 3] [--chunks 256,512,1024,2048,4032] [--out runs/bench_transport.json]

The payload is a LLaMA-7B r=8 q,v LoRA delta (32 layers x 4 tensors, 16.8 MB fp32). Both servers run in
subprocesses with the same message caps:
  raw   a stream-unary method from `grpc.method_handlers_generic_handler` that only counts the bytes (the ceiling);
  agg   the real aggregator (auth, temp file + fsync, sha256, safetensors parse, validate_update, SQLite commit).
MiB/s = payload MiB / seconds from the first chunk to the reply; ratio = agg MiB/s / raw MiB/s at the same chunk size.
Server peak RSS is VmHWM from /proc (monotonic, so it is the peak over the run so far).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6}
RAW_METHOD = "/bench.Raw/Upload"
ENROLL = "bench-enroll-token"


def serve(kind: str, workdir: Path, clients: int) -> None:
    """Subprocess body: start one server on 127.0.0.1:0, print its port, run until stdin closes."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from prufed.common.wire import MESSAGE_CAP_BYTES

    if kind == "raw":
        def upload(request_iterator, context):
            return str(sum(len(chunk) for chunk in request_iterator)).encode()

        server = grpc.server(ThreadPoolExecutor(max_workers=8),
                             options=[("grpc.max_receive_message_length", MESSAGE_CAP_BYTES),
                                      ("grpc.max_send_message_length", MESSAGE_CAP_BYTES)])
        handler = grpc.stream_unary_rpc_method_handler(upload)  # no (de)serializers: raw bytes
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw", {"Upload": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    else:
        from aggregator.config import AggregatorConfig
        from aggregator.server import configure_json_logging, create_server
        from aggregator.state import Store

        configure_json_logging()
        config = AggregatorConfig(rounds=1, min_clients=clients, deadline_s=3600, lora_r=8, lora_alpha=16,
                                  max_upload_mib=64)
        store = Store(f"sqlite:///{workdir / 'agg.db'}")
        server, port = create_server("127.0.0.1:0", store, config, enroll_tokens=[ENROLL],
                                     model_dir=workdir / "llama7b")
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def stage_timings(log_path: Path, repeats: int, points: int) -> list[dict]:
    """Median server-side stage seconds per sweep point, from the aggregator's JSON log lines (in upload order)."""
    receive, validate, commit = [], [], []
    for line in log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry["msg"] == "upload received":
            receive.append(entry["receive_s"])
        elif entry["msg"] == "accepted update":
            validate.append(entry["validate_s"])
            commit.append(entry["commit_s"])
    return [{f"{name}_ms": round(1000 * statistics.median(values[i * repeats:(i + 1) * repeats]), 1)
             for name, values in (("receive", receive), ("validate", validate), ("commit", commit))}
            for i in range(points)]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(kind: str, workdir: Path, clients: int) -> tuple[subprocess.Popen, str]:
    log = open(workdir / f"{kind}.log", "w")  # noqa: SIM115 -- the child owns it for its lifetime; the aggregator's JSON logs carry per-upload stage timings
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--workdir", str(workdir),
                             "--clients", str(clients)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True)
    port = proc.stdout.readline().strip()
    if not port.isdecimal():
        raise SystemExit(f"{kind} server failed to start")
    return proc, f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", default="256,512,1024,2048,4032", help="chunk sizes to sweep, KiB (max 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="uploads per chunk size and path (median reported)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_transport.json"), help="JSON output path")
    parser.add_argument("--serve", choices=("raw", "agg"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.workdir, args.clients)
        return 0
    chunks_kib = [int(c) for c in args.chunks.split(",")]
    if args.repeats < 1 or any(not 1 <= c <= 4096 for c in chunks_kib):
        parser.error("--repeats must be >= 1 and --chunks within 1..4096 KiB")

    import grpc
    import torch

    from aggregator.core.init_adapter import initial_global_adapter
    from edge_client.transport import AggregatorClient
    from prufed.common.adapter_format import DELTA_FORMAT, AdapterMeta
    from prufed.common.wire import MESSAGE_CAP_BYTES, canonical_safetensors, iter_chunks

    layers = list(range(LLAMA7B["num_hidden_layers"]))
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        workdir = Path(tmp)
        (workdir / "llama7b").mkdir()
        (workdir / "llama7b" / "config.json").write_text(json.dumps(LLAMA7B))
        gen = torch.Generator().manual_seed(0)
        delta = {k: torch.randn(v.shape, generator=gen) * 1e-3
                 for k, v in initial_global_adapter(LLAMA7B, 8, 16, ("q_proj", "v_proj"), 0).items()}
        update = workdir / "update.safetensors"
        update.write_bytes(canonical_safetensors(delta, AdapterMeta(DELTA_FORMAT, tuple(layers), "", 1, 10)
                                                 .to_strings()))
        payload_mib = update.stat().st_size / 2**20
        uploads = len(chunks_kib) * args.repeats
        raw_proc, raw_addr = start("raw", workdir, 1)
        agg_proc, agg_addr = start("agg", workdir, uploads)
        rows = []
        try:
            channel = grpc.insecure_channel(raw_addr, options=[("grpc.max_send_message_length", MESSAGE_CAP_BYTES)])
            raw_upload = channel.stream_unary(RAW_METHOD)
            clients = [AggregatorClient(agg_addr, timeout_s=600) for _ in range(uploads)]
            for client in clients:
                client.register(ENROLL, layers)
            while clients[0].pull_task().kind != "task":
                time.sleep(0.2)
            rss_before = {"raw": peak_rss_mib(raw_proc.pid), "agg": peak_rss_mib(agg_proc.pid)}
            for i, kib in enumerate(chunks_kib):
                size = kib * 1024
                raw_s, agg_s = [], []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    got = int(raw_upload(iter_chunks(update, size), timeout=600))
                    raw_s.append(time.perf_counter() - t0)
                    assert got == update.stat().st_size
                    client = clients[i * args.repeats + r]
                    client.chunk_size = size
                    t0 = time.perf_counter()
                    receipt = client.upload_update(update, 1, 10, layers)
                    agg_s.append(time.perf_counter() - t0)
                    assert receipt.accepted and not receipt.duplicate
                raw_mibs = payload_mib / statistics.median(raw_s)
                agg_mibs = payload_mib / statistics.median(agg_s)
                rows.append({"chunk_kib": kib, "raw_mib_s": round(raw_mibs, 1), "agg_mib_s": round(agg_mibs, 1),
                             "ratio": round(agg_mibs / raw_mibs, 3),
                             "raw_peak_rss_mib": round(peak_rss_mib(raw_proc.pid), 1),
                             "agg_peak_rss_mib": round(peak_rss_mib(agg_proc.pid), 1)})
        finally:
            for proc in (raw_proc, agg_proc):
                proc.stdin.close()
                proc.wait(timeout=60)
        stages = stage_timings(workdir / "agg.log", args.repeats, len(chunks_kib))
    for row, stage in zip(rows, stages):
        row.update(stage)
    best = max(rows, key=lambda row: row["agg_mib_s"])
    print(f"payload {payload_mib:.1f} MiB (LLaMA-7B r=8 q,v delta), median of {args.repeats}; "
          f"server RSS before uploads: raw {rss_before['raw']:.0f} MiB, agg {rss_before['agg']:.0f} MiB")
    print("| chunk KiB | raw MiB/s | UploadUpdate MiB/s | ratio | server receive+hash+sync ms | validate ms | "
          "commit ms | raw peak RSS MiB | agg peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['chunk_kib']} | {row['raw_mib_s']} | {row['agg_mib_s']} | {row['ratio']} | {row['receive_ms']} | "
              f"{row['validate_ms']} | {row['commit_ms']} | {row['raw_peak_rss_mib']} | {row['agg_peak_rss_mib']} |")
    print(f"fastest UploadUpdate chunk: {best['chunk_kib']} KiB ({best['ratio']}x raw; target >= 0.7x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"payload_mib": round(payload_mib, 2), "repeats": args.repeats,
                                    "rss_before_mib": rss_before, "rows": rows, "best_chunk_kib": best["chunk_kib"]},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
