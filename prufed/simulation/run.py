"""`prufed simulate`: a whole heterogeneous federation on loopback, with real processes.

One `prufed aggregator serve` process (SQLite in OUT/, port 0) and N `prufed edge run` processes, each with its
private shard (a Dirichlet non-IID split over the examples' categories, written to OUT/clients/<i>/data.jsonl) and
emulated hardware (a fixed depth from --depths round-robin, or a profile whose memory budget the planner turns into
a depth). After every round close, this process reads the new global adapter from the aggregator's database and
scores its slice for every depth on a common held-out set (masked next-token loss over response tokens).

Per round it reports: clients per depth, mean train loss (mean of the clients' per-step losses), held-out loss per
depth, bytes up/down (the agents' payload bytes; the aggregator's Prometheus counters are cross-checked at the end),
round seconds (open -> close, from the database), the slowest client's local training time and the federation
overhead (round seconds − slowest training) / round seconds. Outputs: report.json, report.md, loss_per_depth.png.

`--baseline homogeneous` then runs one FedAvg federation per depth group over the same clients and data (groups one
after another, each with its own aggregator) and adds their held-out losses as extra columns.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_client.core.memory import QUANT_CHOICES
from edge_client.core.pruning import DEFAULT_STRATEGY
from prufed.common.errors import ConfigError, PrufedError
from prufed.simulation.replicas import ReplicaSet

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("prufed", "flower")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a run needs; the CLI maps flags 1:1 onto these fields."""

    out: Path
    clients: int = 6
    rounds: int = 3
    depths: tuple[int, ...] | None = (30, 20, 10)
    profiles: tuple[str, ...] | None = None
    strategy: str = DEFAULT_STRATEGY
    data: str | None = None  #: instruction file; None = built-in demo data
    examples: int = 360  #: demo examples in all (split over clients); with --data: cap on records used
    heldout: int = 8  #: held-out examples scored per depth after every round
    alpha: float = 0.5  #: Dirichlet concentration of the non-IID split
    local_steps: int = 6
    batch_size: int = 1
    seq_len: int = 160
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    quant: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    model: str | None = None
    baseline: str | None = None  #: None | "homogeneous"
    mode: str = "heteagg"  #: aggregation mode of the federation (aggregator/core/modes.py)
    mix: float | str | None = None  #: --mix for mixed/additive (None: auto)
    eval_examples: int = 4  #: examples each agent holds out for federated evaluation (0: none)
    engine: str = "prufed"  #: "prufed" (aggregator + agent processes) | "flower" (Flower's Ray simulation engine)
    deadline_s: float = 900.0
    timeout_s: float = 3600.0  #: give up (and clean up) after this long
    child_threads: int = 1  #: torch threads per agent process (N agents share the cores)
    db: str | None = None  #: database URL shared by the replicas (None: SQLite OUT/agg.db); its tables are reset
    replicas: int = 1  #: aggregator processes on the one database
    blob_store: str = "dir"  #: dir | db (aggregator serve --blob-store)
    chaos: int = 0  #: SIGKILLs to a random replica at random (seeded) moments, each one restarted

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError("--clients", f"must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise ConfigError("--rounds", f"must be >= 1, got {self.rounds}")
        if (self.depths is None) == (self.profiles is None):
            raise ConfigError("--depths", "give exactly one of --depths and --profiles")
        if self.depths is not None and (not self.depths or min(self.depths) < 1):
            raise ConfigError("--depths", f"must be positive layer counts, got {self.depths}")
        if self.profiles is not None and not self.profiles:
            raise ConfigError("--profiles", "must name at least one profile")
        for flag, value in (("--local-steps", self.local_steps), ("--examples", self.examples),
                            ("--heldout", self.heldout), ("--batch-size", self.batch_size)):
            if value < 1:
                raise ConfigError(flag, f"must be >= 1, got {value}")
        if self.examples < self.clients:
            raise ConfigError("--examples", f"{self.clients} clients need at least {self.clients} examples")
        if self.seq_len < 8:
            raise ConfigError("--seq-len", f"must be >= 8, got {self.seq_len}")
        if not self.alpha > 0:
            raise ConfigError("--alpha", f"must be > 0, got {self.alpha}")
        if not self.lr > 0:
            raise ConfigError("--lr", f"must be > 0, got {self.lr}")
        if self.baseline not in (None, "homogeneous"):
            raise ConfigError("--baseline", f"must be 'homogeneous', got {self.baseline!r}")
        if self.quant not in QUANT_CHOICES:
            raise ConfigError("--quant", f"must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")
        from aggregator.core.modes import SINGLE_MODES, check_mode

        object.__setattr__(self, "mix", check_mode(self.mode, self.mix))
        if self.eval_examples < 0:
            raise ConfigError("--eval-examples", f"must be >= 0, got {self.eval_examples}")
        if self.replicas < 1:
            raise ConfigError("--replicas", f"must be >= 1, got {self.replicas}")
        if self.chaos < 0:
            raise ConfigError("--chaos", f"must be >= 0, got {self.chaos}")
        if self.blob_store not in ("dir", "db"):
            raise ConfigError("--blob-store", f"must be dir or db, got {self.blob_store!r}")
        if self.db is not None and self.baseline is not None:
            raise ConfigError("--baseline", "runs one federation per depth group, each on its own SQLite file: "
                                            "not with --db")
        if self.engine not in ENGINES:
            raise ConfigError("--engine", f"must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "flower" and self.mode not in SINGLE_MODES:
            raise ConfigError("--engine", f"flower runs the single-global modes ({', '.join(SINGLE_MODES)}); "
                                          f"--mode {self.mode} keeps per-group globals: use --engine prufed")


@dataclass
class ClientSpec:
    index: int
    args: list[str]  #: hardware emulation flags for `prufed edge run` (--depth N, or --profile P --depth auto)
    data_path: Path
    num_examples: int
    categories: dict[str, int]
    state_dir: Path | None = None
    plan: dict | None = None


@dataclass
class FederationRun:
    """The result of one federation: per-round rows plus the clients' plans and the aggregator's totals."""

    name: str
    rows: list[dict] = field(default_factory=list)
    eval_round0: dict[int, float] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)  #: per-group modes: the last version's group globals
    clients: list[dict] = field(default_factory=list)
    aggregator_totals: dict = field(default_factory=dict)
    wall_s: float = 0.0
    final_global: dict = field(default_factory=dict)  #: final_global_sha256, final_global_path
    replicas: dict = field(default_factory=dict)  #: replica_kills, replica_requests (prufed.simulation.replicas)


# ---- data -------------------------------------------------------------------------------------------------------
def load_dataset(config: SimulationConfig):
    """(train examples, held-out examples): demo KJV tasks (train / held-out chapters) or a file split 90/10."""
    if config.data is None:
        from edge_client.demo_data import build_demo_examples

        return (build_demo_examples(config.examples, seed=config.seed, split="train"),
                build_demo_examples(config.heldout, seed=config.seed, split="heldout"))
    from edge_client.data import load_examples, split_heldout

    examples = load_examples(config.data)[: config.examples + config.heldout]
    train, heldout = split_heldout(examples, max(0.05, min(0.5, config.heldout / max(1, len(examples)))), config.seed)
    if len(train) < config.clients:
        raise ConfigError("--data", f"{config.data}: {len(train)} training records for {config.clients} clients")
    return train, heldout[: config.heldout]


def write_shards(config: SimulationConfig, train: Sequence, out: Path) -> list[ClientSpec]:
    """Dirichlet-split `train` by category and write each client's private shard (alpaca JSONL)."""
    from edge_client.core.partition import dirichlet_split

    categories = [example.category or "uncategorised" for example in train]
    shards = dirichlet_split(categories, config.clients, config.alpha, config.seed)
    specs = []
    for index, shard in enumerate(shards):
        path = out / "clients" / str(index) / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for i in shard:
                e = train[i]
                handle.write(json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output,
                                         "category": e.category}) + "\n")
        counts: dict[str, int] = {}
        for i in shard:
            counts[categories[i]] = counts.get(categories[i], 0) + 1
        if config.depths is not None:
            args = ["--depth", str(config.depths[index % len(config.depths)])]
        else:
            args = ["--depth", "auto", "--profile", config.profiles[index % len(config.profiles)]]
        specs.append(ClientSpec(index, args, path, len(shard), dict(sorted(counts.items(), key=lambda kv: -kv[1]))))
    return specs


def agent_args(config: SimulationConfig, spec: ClientSpec, address: str, token: str, model: str, name: str) -> list[str]:
    """The `prufed edge run ...` arguments of one client: its depth (or profile, planned by the agent itself
    through edge_client.planning, like `prufed plan`) and the federation's settings."""
    args = ["edge", "run", "--aggregator", address, f"--token={token}", "--data", str(spec.data_path),
            "--strategy", config.strategy, "--state-dir", str(spec.state_dir), "--quant", config.quant,
            "--model", model, "--seed", str(config.seed + spec.index), "--name", f"{name}-client-{spec.index}",
            "--retry-attempts", "20", "--eval-examples", str(config.eval_examples), *spec.args]
    return args if config.gradient_checkpointing else [*args, "--no-gradient-checkpointing"]


# ---- processes --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the forked child (Linux): get SIGTERM when the simulation dies, even by SIGKILL, so that no aggregator or
    agent outlives it holding a port and the database (prctl PR_SET_PDEATHSIG = 1)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Children:
    """Every child process of the run; `close()` (also on Ctrl-C) terminates them all, then kills stragglers."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._files: list = []

    def spawn(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        env = dict(os.environ, **CHILD_ENV)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        log = log_path.open("w")
        self._files.append(log)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.procs.append(proc)
        return proc

    def close(self, grace_s: float = 15.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._files:
            log.close()
        self.procs.clear()
        self._files.clear()


def wait_listening(log_path: Path, proc: subprocess.Popen, timeout_s: float = 180.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("listening on "):
                return line.split()[-1]
        if proc.poll() is not None:
            raise PrufedError(f"the aggregator exited ({proc.returncode}) before listening; see {log_path}:\n"
                              + log_path.read_text(errors="replace")[-2000:])
        time.sleep(0.1)
    raise PrufedError(f"the aggregator did not start within {timeout_s:.0f} s; see {log_path}")


def scrape_totals(port: int) -> dict:
    """prufed_upload_bytes_total / prufed_download_bytes_total from the aggregator's Prometheus endpoint."""
    wanted = {"prufed_upload_bytes_total": "bytes_up", "prufed_download_bytes_total": "bytes_down"}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    totals = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            totals[wanted[name]] = int(float(value))
    return totals


def write_final_global(federation, path: Path) -> dict:
    """Copy the latest global version's blob to `path`; returns final_global_sha256 / final_global_path."""
    from prufed.common.fsio import atomic_write_bytes

    row = federation.globals.version_row(None)
    atomic_write_bytes(path, federation.store.blobs.read_bytes(row.blob))
    return {"final_global_sha256": row.sha256, "final_global_path": str(path)}


# ---- evaluation -------------------------------------------------------------------------------------------------
class DepthEvaluator:
    """Scores a global adapter's slice on each depth's pruned model (fp32, LoRA dropout off) on fixed held-out rows."""

    def __init__(self, model: str, heldout: Sequence, seq_len: int, lora: dict):
        self.model, self.heldout, self.seq_len, self.lora = model, list(heldout), seq_len, lora
        self._models: dict[tuple[int, ...], tuple] = {}

    def _get(self, plan_dict: dict):
        from edge_client.core.pruning import PruningPlan
        from edge_client.data import tokenize_examples
        from edge_client.model import attach_lora, load_model_dir, materialize_pruned

        plan = PruningPlan.from_json_dict(plan_dict)
        key = tuple(plan.kept_layers)
        if key not in self._models:
            model, tokenizer = load_model_dir(materialize_pruned(self.model, plan), "fp32")
            peft = attach_lora(model, r=int(self.lora["r"]), alpha=self.lora["alpha"],
                               targets=tuple(self.lora["targets"]), dropout=0.0)
            peft.eval()
            rows = tokenize_examples(self.heldout, tokenizer, self.seq_len)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self._models[key] = (peft, rows, pad)
        return key, self._models[key]

    def loss(self, plan_dict: dict, global_state) -> float:
        import torch

        from edge_client.evaluate import batched, masked_loss
        from prufed.common.peft_bridge import load_adapter_state

        key, (peft, rows, pad) = self._get(plan_dict)
        load_adapter_state(peft, global_state, key)
        with torch.inference_mode():
            return masked_loss(peft, batched(rows, pad, 8)).loss


# ---- one federation ---------------------------------------------------------------------------------------------
def aggregator_yaml(config: SimulationConfig, num_clients: int, mode: str) -> dict:
    return {"rounds": config.rounds, "min_clients": num_clients, "clients_fraction": 1.0, "quorum_fraction": 1.0,
            "deadline_s": config.deadline_s, "retry_after_s": 0.25, "seed": config.seed, "mode": mode,
            "mix": config.mix if mode == config.mode else None,
            "lora_r": config.lora_r, "lora_alpha": config.lora_alpha, "max_steps": config.local_steps,
            "lr": config.lr, "batch_size": config.batch_size, "seq_len": config.seq_len,
            # every agent enrols from 127.0.0.1 with one token: let all of them through the Register rate limit
            "register_burst": max(20, num_clients),
            # a replica killed while closing a round holds its claim this long before another one re-runs the close
            **({"close_lease_s": 10.0} if config.replicas > 1 or config.chaos else {})}


def run_federation(name: str, config: SimulationConfig, model: str, clients: Sequence[ClientSpec], out: Path,
                   evaluator: DepthEvaluator, *, mode: str,
                   on_row: Callable[[dict], None] | None = None) -> FederationRun:
    """Start an aggregator and one agent per client, follow the rounds to the end, evaluate every global version."""
    import yaml

    from aggregator.config import AggregatorConfig
    from aggregator.federation import Federation, read_status
    from aggregator.state import Store

    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(18)  # may start with "-": passed as --flag=value
    fed_yaml = aggregator_yaml(config, len(clients), mode)
    (out / "aggregator.yaml").write_text(yaml.safe_dump(fed_yaml))
    db_path = out / "agg.db"
    db_url = config.db or f"sqlite:///{db_path}"
    blob_dir = out / ("spool" if config.blob_store == "db" else "blobs") if config.db or config.blob_store == "db" \
        else None
    # A previous run into the same --out left a finished federation behind: its agents' state dirs would resume
    # as "done" against this fresh aggregator and never register, and a killed run's SQLite -wal file would be
    # replayed into the new database, so every piece of run state goes (agg.db, -wal, -shm, .blobs).
    for spec in clients:
        spec.state_dir = out / "clients" / str(spec.index) / "state"
    for stale in (*out.glob(f"{db_path.name}*"), *(spec.state_dir for spec in clients), out / "globals"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    if config.db:  # a fresh federation: the previous run's rows (and blobs) go
        Store(db_url, blob_dir, config.blob_store).reset()
    children = Children()
    run = FederationRun(name)
    started = time.perf_counter()
    serve = [sys.executable, "-m", "prufed", "aggregator", "serve", "--db", db_url, "--model", model, "--config",
             str(out / "aggregator.yaml"), f"--enroll-token={token}", "--blob-store", config.blob_store,
             *(["--blob-dir", str(blob_dir)] if blob_dir else [])]
    replicas = ReplicaSet(children, serve, [(free_port(), free_port()) for _ in range(config.replicas)], out,
                          chaos=config.chaos, seed=config.seed)
    try:
        address = replicas.start()
        agents = []
        for spec in clients:
            cmd = [sys.executable, "-m", "prufed", *agent_args(config, spec, address, token, model, name)]
            spec.state_dir.parent.mkdir(parents=True, exist_ok=True)
            agents.append(children.spawn(cmd, spec.state_dir.parent / "agent.log"))

        store = Store(db_url, blob_dir, config.blob_store)
        federation = Federation(store, AggregatorConfig(**{k: v for k, v in fed_yaml.items()}))
        evaluated = 0
        deadline = time.monotonic() + config.timeout_s
        while True:
            for spec, proc in zip(clients, agents):
                if proc.poll() not in (None, 0):
                    raise PrufedError(f"agent {spec.index} exited with {proc.returncode}; see "
                                      f"{spec.state_dir.parent / 'agent.log'}:\n"
                                      + (spec.state_dir.parent / "agent.log").read_text(errors="replace")[-2000:])
            replicas.check()
            replicas.scrape()
            if any(spec.plan is None for spec in clients):
                for spec in clients:
                    state = _read_json(spec.state_dir / "state.json")
                    if state:
                        spec.plan = state["plan"]
                if all(spec.plan is not None for spec in clients) and not run.eval_round0:
                    run.eval_round0 = _evaluate(evaluator, clients, global_of(federation, out, 0, 0))
                    if on_row:
                        on_row({"round": 0, "heldout_loss": run.eval_round0})
            status = read_status(store)
            closed = [r for r in status["rounds"] if r["state"] == "closed"]
            while evaluated < len(closed):
                r = closed[evaluated]
                losses = _evaluate(evaluator, clients, global_of(federation, out, r["metrics"]["global_version"],
                                                                      r["round"]))
                row = round_row(r, clients, losses)
                run.rows.append(row)
                evaluated += 1
                if on_row:
                    on_row(row)
            if status["done"] and evaluated >= len(closed) and all(p.poll() is not None for p in agents):
                break
            if any(r["state"] == "failed" for r in status["rounds"]):
                raise PrufedError(f"a round failed: {[r for r in status['rounds'] if r['state'] == 'failed']}")
            if time.monotonic() > deadline:
                raise PrufedError(f"the federation did not finish within {config.timeout_s:.0f} s")
            time.sleep(0.3)
        replicas.stop()
        totals = [scrape_totals(r.metrics_port) for r in replicas.replicas]
        run.aggregator_totals = {key: sum(t.get(key, 0) for t in totals) for key in ("bytes_up", "bytes_down")
                                 if any(key in t for t in totals)}
        run.replicas = replicas.report()
        run.final_global = write_final_global(federation, out / "final_global.safetensors")
        store.dispose()
    finally:
        children.close()
    run.wall_s = time.perf_counter() - started
    # the agents' histories are final now: rebuild the rows with every client's record present
    status = read_status(Store(f"sqlite:///{db_path}"))
    closed = [r for r in status["rounds"] if r["state"] == "closed"]
    run.rows = [round_row(r, clients, row["heldout_loss"]) for r, row in zip(closed, run.rows)]
    run.groups = status["groups"]
    run.clients = [{"index": s.index, "depth": len(s.plan["kept_layers"]), "kept_layers": s.plan["kept_layers"],
                    "emulation": " ".join(s.args), "num_examples": s.num_examples, "categories": s.categories}
                   for s in clients]
    return run


def save_global(out: Path, round_id: int, state: dict) -> dict:
    """OUT/globals/round-<r>.safetensors: the global adapter after round r (0 = initial), ORIGINAL keys. Returns
    `state`. Both engines write these, so their runs compare tensor by tensor."""
    from safetensors.torch import save_file

    from prufed.common.fsio import atomic_path

    with atomic_path(out / "globals" / f"round-{round_id}.safetensors") as tmp:
        save_file({key: value.contiguous() for key, value in state.items()}, str(tmp))
    return state


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def global_of(federation, out: Path, version: int, round_id: int) -> Callable[[Sequence[int]], dict]:
    """group (kept-layer list) -> the global of `version` it evaluates; in a per-group mode its own group's.
    Saves the version's (shared) global, the one round `round_id` closed into, as OUT/globals/round-<r> first."""
    save_global(out, round_id, federation.globals.state(version))
    return lambda group: federation.globals.state(version, group=group)


def _evaluate(evaluator: DepthEvaluator, clients: Sequence[ClientSpec],
              global_for: Callable[[Sequence[int]], dict]) -> dict[int, float]:
    """Held-out loss per depth of the global `global_for(kept layers)` gives that depth."""
    plans = {len(s.plan["kept_layers"]): s.plan for s in clients}
    return {depth: evaluator.loss(plans[depth], global_for(plans[depth]["kept_layers"]))
            for depth in sorted(plans, reverse=True)}


def round_row(status_round: dict, clients: Sequence[ClientSpec], heldout: dict[int, float]) -> dict:
    """One round of the report: aggregator facts (DB) + the agents' own records (state.json history)."""
    round_id = status_round["round"]
    records = []
    for spec in clients:
        state = _read_json(spec.state_dir / "state.json") or {}
        for entry in state.get("history", []):
            if entry.get("round") == round_id and "discarded" not in entry:
                records.append((len(spec.plan["kept_layers"]), entry))
    per_depth: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for depth, entry in records:
        per_depth.setdefault(depth, []).append(entry["train_loss"])
        counts[depth] = counts.get(depth, 0) + 1
    seconds = float(status_round["metrics"].get("duration_s", 0.0))
    slowest = max((entry.get("train_wall_s", 0.0) for _, entry in records), default=0.0)
    return {
        "round": round_id, "clients_per_depth": dict(sorted(counts.items(), reverse=True)),
        "train_loss": sum(e["train_loss"] for _, e in records) / len(records) if records else None,
        "train_loss_per_depth": {d: sum(v) / len(v) for d, v in sorted(per_depth.items(), reverse=True)},
        "heldout_loss": dict(heldout),
        "bytes_up": sum(int(e.get("upload_bytes", 0)) for _, e in records),
        "bytes_down": sum(int(e.get("download_bytes", 0)) for _, e in records),
        "seconds": seconds, "slowest_train_s": slowest,
        "slowest_step_s": max((e.get("train_seconds", 0.0) for _, e in records), default=0.0),
        "overhead": (seconds - slowest) / seconds if seconds > 0 else None,
        "updates": status_round["metrics"].get("updates"), "examples": status_round["metrics"].get("examples"),
        # the clients' own held-out loss of the global this round started from (version round − 1), before training
        "federated_eval": {int(d): e["loss"] for d, e in status_round.get("eval", {}).items()},
        "federated_eval_examples": {int(d): e["examples"] for d, e in status_round.get("eval", {}).items()},
        "groups": [{key: g[key] for key in ("group", "clients", "examples", "sha256")}
                   for g in status_round["metrics"].get("report", {}).get("groups", [])],
    }


# ---- the whole simulation ---------------------------------------------------------------------------------------
def simulate(config: SimulationConfig, *, on_row: Callable[[str, dict], None] | None = None) -> dict:
    """Run the heterogeneous federation (and the baseline), write the report files, return the report dict."""
    from prufed.common.models import resolve_model

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(config.model))
    train, heldout = load_dataset(config)
    clients = write_shards(config, train, out)
    evaluator = DepthEvaluator(model, heldout, config.seq_len, {"r": config.lora_r, "alpha": config.lora_alpha,
                                                                 "targets": ["q_proj", "v_proj"]})
    emit = (lambda name: (lambda row: on_row(name, row))) if on_row else (lambda name: None)
    federate = run_federation
    if config.engine == "flower":
        from prufed.simulation.flower_engine import run_flower_federation as federate
    hetero = federate(config.mode, config, model, clients, out, evaluator, mode=config.mode,
                      on_row=emit(config.mode))
    baseline: dict[int, FederationRun] = {}
    if config.baseline == "homogeneous":
        groups: dict[int, list[ClientSpec]] = {}
        for spec in clients:
            groups.setdefault(len(spec.plan["kept_layers"]), []).append(spec)
        for depth, members in sorted(groups.items(), reverse=True):
            copies = [ClientSpec(s.index, ["--depth", str(depth)], s.data_path, s.num_examples, s.categories)
                      for s in members]
            # FedAvg needs 2+ clients to mean anything, but a lone client still gives the "train alone" curve.
            baseline[depth] = federate(f"fedavg-{depth}", config, model, copies,
                                             out / "baseline" / f"depth-{depth}", evaluator, mode="fedavg",
                                             on_row=emit(f"fedavg-{depth}"))
    report = build_report(config, hetero, baseline, time.perf_counter() - started, len(train), len(heldout))
    write_report(out, report)
    return report


def build_report(config: SimulationConfig, hetero: FederationRun, baseline: dict[int, FederationRun],
                 wall_s: float, num_train: int, num_heldout: int) -> dict:
    rounds = [dict(row) for row in hetero.rows]
    for row in rounds:
        row["baseline_heldout_loss"] = {
            depth: run.rows[row["round"] - 1]["heldout_loss"].get(depth)
            for depth, run in baseline.items() if len(run.rows) >= row["round"]}
    overheads = [r["overhead"] for r in rounds if r["overhead"] is not None]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return {
        "config": settings, "mode": config.mode, "mix": config.mix, "groups": hetero.groups,
        "wall_s": round(wall_s, 2), "federation_wall_s": round(hetero.wall_s, 2),
        "num_train_examples": num_train, "num_heldout_examples": num_heldout,
        "clients": hetero.clients, "heldout_loss_round0": hetero.eval_round0, "rounds": rounds,
        "aggregator_totals": hetero.aggregator_totals,
        **hetero.final_global, **hetero.replicas,
        "agent_totals": {"bytes_up": sum(r["bytes_up"] for r in rounds),
                         "bytes_down": sum(r["bytes_down"] for r in rounds)},
        "mean_overhead": sum(overheads) / len(overheads) if overheads else None,
        "baseline": {str(d): {"rows": run.rows, "round0": run.eval_round0, "wall_s": round(run.wall_s, 2)}
                     for d, run in baseline.items()},
    }


def _fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-round table (shared by the live console table and report.md)."""
    report = json.loads(json.dumps(report, default=str))  # one key type (str), in memory or from report.json
    depths = sorted((int(d) for d in report["heldout_loss_round0"]), reverse=True)
    base = sorted((int(d) for d in report["baseline"]), reverse=True)
    header = (["round", "clients/depth", "train loss"] + [f"held-out d{d}" for d in depths]
              + [f"fed-eval d{d}" for d in depths]
              + [f"FedAvg-only d{d}" for d in base] + ["KiB up", "KiB down", "seconds", "overhead"])
    lines = [["0", "", "–"] + [_fmt(report["heldout_loss_round0"].get(str(d))) for d in depths] + ["–"] * len(depths)
             + [_fmt(report["baseline"][str(d)]["round0"].get(str(d))) for d in base] + ["–", "–", "–", "–"]]
    for row in report["rounds"]:
        fed = row.get("federated_eval", {})
        lines.append([str(row["round"]), " ".join(f"{d}:{n}" for d, n in row["clients_per_depth"].items()),
                      _fmt(row["train_loss"])] + [_fmt(row["heldout_loss"].get(str(d))) for d in depths]
                     + [_fmt(fed.get(str(d))) for d in depths]
                     + [_fmt(row["baseline_heldout_loss"].get(str(d))) for d in base]
                     + [f"{row['bytes_up'] / 1024:.0f}", f"{row['bytes_down'] / 1024:.0f}", f"{row['seconds']:.1f}",
                        _fmt(row["overhead"], ".1%")])
    return header, lines


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    header, lines = table_rows(report)
    mix = f" (--mix {report['mix']})" if report.get("mix") is not None else ""
    md = ["# PruFed simulation report", "",
          f"Aggregation mode `{report.get('mode', 'heteagg')}`{mix}. "
          f"{len(report['clients'])} clients, {len(report['rounds'])} rounds, model `{report['config']['model']}`, "
          f"quant {report['config']['quant']}, {report['config']['local_steps']} local steps of batch "
          f"{report['config']['batch_size']}, seq-len {report['config']['seq_len']}, Dirichlet α "
          f"{report['config']['alpha']}. Wall time {report['wall_s']:.1f} s (federation {report['federation_wall_s']:.1f} s).",
          "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(line) + " |" for line in lines]
    md += ["", "Held-out loss: masked next-token loss over response tokens of the common held-out set, for the new "
               "global adapter's slice on each depth's pruned model (in a per-group mode, each depth's own group "
               "global). Fed-eval (federated evaluation): the clients' example-weighted mean loss on their own "
               "held-out examples of the global the round started from (version round − 1), scored on the device "
               "before training. Overhead = (round seconds − slowest client's local training) / round seconds.", ""]
    if report.get("groups"):
        md += ["## Depth groups (per-group globals)", "", "| kept layers | depth | version | clients | examples | "
               "sha256 |", "|---|---|---|---|---|---|"]
        md += [f"| {g['kept_layers']} | {g['depth']} | {g['version']} | {g['clients']} | {g['examples']} | "
               f"{g['sha256'][:12]} |" for g in report["groups"]]
        md += ["", "Clients and examples: those of the group folded into the last version.", ""]
    md += ["## Clients", "",
           "| client | depth | kept layers | examples | top categories |", "|---|---|---|---|---|"]
    for c in report["clients"]:
        top = ", ".join(f"{k} {v}" for k, v in list(c["categories"].items())[:3])
        md.append(f"| {c['index']} | {c['depth']} | {c['kept_layers']} | {c['num_examples']} | {top} |")
    totals = report["aggregator_totals"]
    md += ["", f"Bytes (agents' payloads): up {report['agent_totals']['bytes_up']}, down "
               f"{report['agent_totals']['bytes_down']}; aggregator counters: up {totals.get('bytes_up', '–')}, "
               f"down {totals.get('bytes_down', '–')}.", ""]
    (out / "report.md").write_text("\n".join(md))
    plot_losses(report, out / "loss_per_depth.png")


def plot_losses(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(json.dumps(report, default=str))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    depths = sorted((int(d) for d in report["heldout_loss_round0"]), reverse=True)
    rounds = [0] + [r["round"] for r in report["rounds"]]
    for i, depth in enumerate(depths):
        color = f"C{i}"
        key = str(depth)
        ys = [report["heldout_loss_round0"].get(key)] + [r["heldout_loss"].get(key) for r in report["rounds"]]
        ax.plot(rounds, ys, marker="o", color=color, label=f"{report.get('mode', 'heteagg')}, depth {depth}")
        fed = [(r["round"] - 1, r.get("federated_eval", {}).get(key)) for r in report["rounds"]]
        fed = [(x, y) for x, y in fed if y is not None]
        if fed:  # the clients' own held-out loss of version r−1, plotted at that version
            ax.plot([x for x, _ in fed], [y for _, y in fed], marker=".", linestyle=":", color=color,
                    label=f"federated eval, depth {depth}")
        if key in report["baseline"]:
            b = report["baseline"][key]
            ys = [b["round0"].get(key)] + [row["heldout_loss"].get(key) for row in b["rows"]]
            ax.plot(rounds[: len(ys)], ys, marker="x", linestyle="--", color=color, label=f"FedAvg-only, depth {depth}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Held-out loss per depth")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def install_signal_cleanup() -> None:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so `finally` blocks terminate every child."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
