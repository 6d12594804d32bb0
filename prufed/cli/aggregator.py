"""`prufed aggregator serve | status`: run the federation server, or read its state straight from the database."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prufed.cli.help import HelpFormatter
from prufed.cli.modes import add_mode_arguments
from prufed.common.errors import ConfigError

SERVE_EPILOG = """example:
  prufed aggregator serve --listen 127.0.0.1:50051 --db sqlite:///runs/agg.db --model smollm2-135m \\
      --enroll-token "$(cat enroll.txt)" --rounds 3 --metrics-port 9100
  # one global per depth group, blended with every holder's mean per layer:
  prufed aggregator serve --db sqlite:///runs/agg.db --enroll-token "$(cat enroll.txt)" --mode mixed --mix auto
  # on a VM: --listen 0.0.0.0:50051 --tls-cert server.crt --tls-key server.key [--tls-client-ca ca.crt]
"""
STATUS_EPILOG = """example:
  prufed aggregator status --db sqlite:///runs/agg.db --json
"""

TOKEN_SUFFIX = ".enroll-token"  #: beside the SQLite file: <db file>.enroll-token

# CLI flags that override a field of the same name in --config (None = keep the YAML/default value).
OVERRIDES = ("rounds", "min_clients", "clients_fraction", "quorum_fraction", "min_updates", "deadline_s",
             "max_extensions", "seed", "max_upload_mib", "chunk_size", "active_window_s", "max_num_examples",
             "max_clients", "max_concurrent_uploads", "stream_idle_s", "upload_deadline_s")
FLOAT_OVERRIDES = frozenset({"clients_fraction", "quorum_fraction", "deadline_s", "max_upload_mib", "active_window_s",
                             "stream_idle_s", "upload_deadline_s"})


def register(subparsers) -> None:
    parser = subparsers.add_parser("aggregator", help="run the aggregator server or inspect its database",
                                   description="The PruFed aggregator: gRPC server over a SQL database.")
    sub = parser.add_subparsers(dest="aggregator_command", metavar="SUBCOMMAND", required=True)

    fmt = HelpFormatter
    serve = sub.add_parser("serve", help="serve the federation over gRPC", formatter_class=fmt, epilog=SERVE_EPILOG,
                           description="Serve Register/PullTask/DownloadGlobal/UploadUpdate/Status until SIGTERM.")
    serve.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to bind (port 0 picks a free one)")
    serve.add_argument("--db", required=True, help="database URL: sqlite:///path.db or postgresql+psycopg://...")
    serve.add_argument("--blob-store", choices=("dir", "db"), default="dir",
                       help="where uploads and global versions live: dir = files in --blob-dir (default); db = ~1 MiB "
                            "chunk rows in the database itself, so replicas on several hosts share nothing else")
    serve.add_argument("--blob-dir", default=None, help="blob directory (default: <db file>.blobs; required for "
                                                        "non-SQLite databases with --blob-store dir); with "
                                                        "--blob-store db only partial uploads spool here "
                                                        "(default: the system temp dir)")
    serve.add_argument("--model", default=None, help="base model: an alias (smollm2-135m) or a local HF directory "
                                                     "(default: smollm2-135m)")
    serve.add_argument("--config", default=None, help="aggregator.yaml with AggregatorConfig fields")
    serve.add_argument("--tls-cert", default=None, help="PEM server certificate (enables TLS)")
    serve.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    serve.add_argument("--tls-client-ca", default=None, help="PEM CA; clients must present a cert it signed (mTLS)")
    serve.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address")
    serve.add_argument("--enroll-token", default=None,
                       help="token that gates Register (on a loopback --listen, one is generated when no token is "
                       "given: printed once and written with mode 0600 to <db file>.enroll-token)")
    serve.add_argument("--tokens-file", default=None, help="file with one enrolment token per line")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    serve.add_argument("--dashboard", default=None, metavar="HOST:PORT",
                       help="serve a live page of rounds, depths, losses, traffic and refusals (e.g. 127.0.0.1:8080); "
                            "off loopback it needs --tls-cert/--tls-key and an enrolment token")
    for name in OVERRIDES:
        kind = float if name in FLOAT_OVERRIDES else int
        serve.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                           help=f"override the config field {name} (docs/deployment.md lists the defaults)")
    add_mode_arguments(serve, default=None)
    serve.set_defaults(func=serve_command)

    status = sub.add_parser("status", help="print the federation state from the database", formatter_class=fmt,
                            epilog=STATUS_EPILOG, description="Read rounds, clients and metrics without a server.")
    status.add_argument("--db", required=True, help="database URL, as given to serve")
    status.add_argument("--blob-dir", default=None, help="blob directory (non-SQLite databases)")
    status.add_argument("--blob-store", choices=("dir", "db"), default="dir", help="as given to serve")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    status.set_defaults(func=status_command)


def _loopback_token(args) -> str:
    """A generated enrolment token for a local trial: printed once, kept with mode 0600 beside the database.

    Reused on a restart (the file already holds one), so agents enrolled before keep working.
    """
    import secrets

    from prufed.common.fsio import atomic_write_text

    db = args.db
    if not db.startswith("sqlite:///"):
        raise ConfigError("--enroll-token", "a generated token is kept beside a SQLite database file; with "
                                            f"{db.split(':', 1)[0]} give --enroll-token or --tokens-file")
    path = Path(f"{Path(db[len('sqlite:///'):]).expanduser()}{TOKEN_SUFFIX}")
    if path.is_file() and (token := path.read_text().strip()):
        print(f"enrolment token (loopback only) read from {path}", file=sys.stderr, flush=True)
        return token
    token = secrets.token_urlsafe(24)
    atomic_write_text(path, token + "\n", mode=0o600)
    print(f"enrolment token (loopback only, also in {path}): {token}", file=sys.stderr, flush=True)
    return token


def _enroll_tokens(args) -> list[str]:
    tokens = []
    if args.enroll_token is not None:
        if len(args.enroll_token) < 8:
            raise ConfigError("--enroll-token", "must be at least 8 characters")
        tokens.append(args.enroll_token)
    if args.tokens_file is not None:
        path = Path(args.tokens_file)
        if not path.is_file():
            raise ConfigError("--tokens-file", f"{path}: no such file")
        lines = [line.strip() for line in path.read_text().splitlines()]
        tokens += [line for line in lines if line and not line.startswith("#")]
        if not tokens:
            raise ConfigError("--tokens-file", f"{path}: holds no tokens")
    if not tokens:
        from aggregator.server import is_loopback, split_address

        # The same loopback test the server applies to plaintext: off loopback a token stays mandatory.
        if is_loopback(split_address(args.listen)[0]):
            return [_loopback_token(args)]
        raise ConfigError("--enroll-token", "Register must be gated off loopback: give --enroll-token or --tokens-file")
    return tokens


def announce(line: str) -> None:
    """One whole line on stderr in a single write: the round ticker's JSON log lines go to the same stream from
    another thread, and `print` writes the text and its newline separately, so they could interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def serve_command(args) -> int:
    import signal
    import threading

    from aggregator.config import load_config
    from aggregator.server import TLSConfig, configure_json_logging, create_server
    from aggregator.state import Store
    from prufed.common.models import resolve_model

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert", "--tls-cert and --tls-key must be given together")
    if args.tls_client_ca and not args.tls_cert:
        raise ConfigError("--tls-client-ca", "needs --tls-cert/--tls-key (mTLS is on top of TLS)")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise ConfigError("--metrics-port", f"must be in 1..65535, got {args.metrics_port}")
    tokens = _enroll_tokens(args)
    config = load_config(args.config, {name: getattr(args, name) for name in (*OVERRIDES, "mode", "mix")})
    tls = TLSConfig(Path(args.tls_cert), Path(args.tls_key),
                    Path(args.tls_client_ca) if args.tls_client_ca else None) if args.tls_cert else None
    configure_json_logging()
    dashboard = None
    if args.dashboard is not None:
        from aggregator.dashboard import DashboardConfig, parse_address

        dash_host, dash_port = parse_address(args.dashboard)
        from prufed.common.net import is_loopback_host

        # Open on loopback; elsewhere the page asks for the enrolment token, as Status does.
        dashboard = DashboardConfig(dash_host, dash_port, token=None if is_loopback_host(dash_host) else tokens[0],
                                    tls_cert=args.tls_cert, tls_key=args.tls_key)
    model_dir = resolve_model(args.model)
    store = Store(args.db, args.blob_dir, args.blob_store)
    server, port = create_server(args.listen, store, config, tls, enroll_tokens=tokens, insecure=args.insecure,
                                 model_dir=model_dir, metrics_port=args.metrics_port, dashboard=dashboard)
    host = args.listen.rpartition(":")[0]
    announce(f"listening on {host}:{port}")
    if server.dashboard is not None:
        announce(f"dashboard on {server.dashboard.url}")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5.0)
    store.dispose()
    print("stopped", file=sys.stderr, flush=True)
    return 0


def status_command(args) -> int:
    from aggregator.federation import read_status
    from aggregator.state import Store
    from prufed.cli.export_adapter import export_command

    db = args.db
    if db.startswith("sqlite:///"):
        path = Path(db[len("sqlite:///"):]).expanduser()
        if not path.is_file():
            raise ConfigError("--db", f"{path}: no such database file")
    status = read_status(Store(db, args.blob_dir, args.blob_store))
    version = int(status["global_version"])
    # Version 0 is the initial adapter (lora_B = 0), nothing to export yet.
    status["export_command"] = export_command(db, version) if version > 0 else None
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or log file is no 80-column terminal: keep the table readable
    console.print(f"base model {status['base_model']}  layers {status['num_layers']}  global version "
                  f"{status['global_version']}  rounds {status['rounds_closed']}/{status['rounds_total']} closed"
                  f"{'  (done)' if status['done'] else ''}")
    depths = ", ".join(f"{d} layers: {n}" for d, n in status["clients_per_depth"].items()) or "none"
    console.print(f"clients per depth: {depths}")
    console.print(f"aggregation mode: {status['mode']}")
    # federated evaluation: the clients' own held-out loss of the global each round started from
    eval_depths = sorted({int(d) for r in status["rounds"] for d in r["eval"]}, reverse=True)
    table = Table("round", "state", "sampled", "uploads", "examples", "version", *[f"fed-eval d{d}" for d in eval_depths],
                  "reason")
    for r in status["rounds"]:
        m = r["metrics"]
        evals = [f"{r['eval'][str(d)]['loss']:.4f} ({r['eval'][str(d)]['examples']})" if str(d) in r["eval"] else ""
                 for d in eval_depths]
        table.add_row(str(r["round"]), r["state"], str(r["sampled"]), str(r["uploads"]), str(m.get("examples", "")),
                      str(m.get("global_version", "")), *evals, r["reason"])
    console.print(table)
    if eval_depths:
        console.print("fed-eval: example-weighted mean of the clients' held-out loss (nats/token; examples scored) of "
                      "the global the round started from, measured on the devices before training")
    if status["groups"]:
        groups = Table("depth", "kept layers", "version", "clients", "examples", "sha256",
                       title="per-group globals (latest version)")
        for g in status["groups"]:
            groups.add_row(str(g["depth"]), ",".join(map(str, g["kept_layers"])), str(g["version"]),
                           str(g["clients"]), str(g["examples"]), g["sha256"][:12])
        console.print(groups)
    if status["export_command"]:
        latest = next((r for r in status["rounds"] if r["metrics"].get("global_version") == version), None)
        made = f" (round {latest['round']}, sha256 {latest['metrics'].get('sha256', '')[:12]})" if latest else ""
        console.print(f"latest global: version {version}{made}; export it for PEFT with:")
        console.print(status["export_command"], markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("latest global: version 0, the initial adapter (no round closed yet)")
    return 0

