"""The long-running edge agent: profile -> plan depth -> register -> loop (pull, download, train, upload).

Every step is persisted atomically in the state directory before the next begins, so a killed agent resumes
without redoing accepted work:

    state.json (mode 0600: it holds the per-client bearer token)
        client_id, token, plan, hardware, federation, round, phase, global_version, receipt, history
    rounds/<r>/global.safetensors      the downloaded global slice (kept layers only)
    rounds/<r>/train/                  train_local's out dir: checkpoint/state.pt (every step), update.safetensors

Phases of the current round, and what a restarted agent does in each:
    registered  nothing in flight                       -> pull a task
    downloaded  global slice on disk, training may have   -> pull; same round: train_local(resume=True) from the
                checkpointed step; round moved on: discard, start the new one
    trained     update.safetensors written              -> upload it (no retraining)
    uploaded    receipt stored                          -> pull the next task
An upload refused because the round closed (FAILED_PRECONDITION) or the client is no longer sampled
(PERMISSION_DENIED) discards the update. Re-sending bytes the server already accepted returns its original
receipt (the server is idempotent per client and round), so a kill between upload and persist costs no duplicate.

The only payload that leaves the device is the update file (LoRA deltas of the kept layers), plus two numbers of
federated evaluation (edge_client/federated_eval.py: the held-out loss of the downloaded global and how many
held-out examples were scored, computed before training); the local data set is read here and never sent.
SIGTERM/SIGINT: the current RPC finishes, a training run stops after its current step
(already checkpointed), the state is persisted and `run()` returns 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_client.backoff import BackoffPolicy
from edge_client.core.pruning import DEFAULT_STRATEGY, PruningPlan
from prufed.common.errors import ConfigError
from prufed.common.fsio import atomic_write_json

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
GLOBAL_FILE = "global.safetensors"
FAULT_ENV = "PRUFED_AGENT_FAULT"
REGISTERED, DOWNLOADED, TRAINED, UPLOADED, DONE = "registered", "downloaded", "trained", "uploaded", "done"
DEMO_EXAMPLES = 1000
# gRPC codes (by name, so this module stays importable without grpc) that mean "this update is no longer wanted".
DISCARD_CODES = ("FAILED_PRECONDITION", "PERMISSION_DENIED")


class Stopped(Exception):
    """Raised inside a step when SIGTERM/SIGINT asked the agent to stop."""


@dataclass(frozen=True)
class AgentConfig:
    """What `prufed edge run` was given. `enroll_token` is needed only until the client is registered."""

    aggregator: str
    state_dir: Path
    enroll_token: str | None = None
    model: str | None = None  #: alias or local HF directory of the UNPRUNED base model (same as the aggregator's)
    data: str | None = None  #: private instruction file; None = built-in demo data
    depth: int | str = "auto"  #: layers to keep, or "auto" = deepest the memory planner fits in the budget
    strategy: str = DEFAULT_STRATEGY
    protect: tuple[int, ...] = ()
    profile: str | None = None  #: emulate this hardware profile instead of probing
    budget_gib: float | None = None  #: emulate this memory budget (GiB); wins over the profile's
    quant: str = "auto"
    tls_ca: str | None = None
    max_examples: int | None = None
    seed: int = 0
    name: str = ""
    gradient_checkpointing: bool = True
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    max_wait_s: float = 30.0  #: cap on a WAIT's retry_after (s)
    eval_examples: int = 16  #: local examples held out to score each downloaded global (0: no federated evaluation)
    verbose: bool = False


# ---- persistence ------------------------------------------------------------------------------------------------
def write_state(state_dir: Path, state: dict) -> None:
    """Atomically replace state.json (mode 0600): write a temp file, fsync, rename."""
    atomic_write_json(state_dir / STATE_FILE, state, mode=0o600)


def read_state(state_dir: Path) -> dict | None:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("--state-dir", f"{path} is not valid JSON ({exc.msg}); move it away to re-register") from None


def fault_point(name: str, round_id: int) -> None:
    """Test hook: `PRUFED_AGENT_FAULT=<name>[:<round>]` SIGKILLs the agent here (no cleanup, like a power cut)."""
    wanted = os.environ.get(FAULT_ENV, "")
    point, _, at_round = wanted.partition(":")
    if point == name and (not at_round or int(at_round) == round_id):
        print(f"agent: fault injection {wanted}: killing self", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


# ---- planning ---------------------------------------------------------------------------------------------------
def hardware_spec(config: AgentConfig):
    """The device as the planner sees it: an emulated profile / budget, or this machine's probe."""
    from edge_client.planning import device_spec

    return device_spec(config.profile, config.budget_gib)


def plan_layers(config: AgentConfig, spec) -> tuple[PruningPlan, dict]:
    """The pruning plan and precision (`edge_client.planning`, the planner `prufed plan` and `prufed train` use):
    --depth N, or the deepest depth whose predicted training memory fits the budget. The federation's training
    hyper-parameters arrive after registration, so the plan assumes `prufed plan`'s defaults (seq 256, batch 1,
    LoRA r=8 on q,v)."""
    from edge_client.core.memory import TrainingSetup
    from edge_client.layer_scores import plan_for_model, source_model_dir
    from edge_client.model import check_quant_available
    from edge_client.planning import budget_label, plan_training
    from prufed.common.models import read_model_config

    model_dir = source_model_dir(config.model)
    planned = plan_training(read_model_config(model_dir), spec,
                            TrainingSetup(gradient_checkpointing=config.gradient_checkpointing),
                            quant=config.quant, depth=config.depth, budget_source=budget_label(config.profile, config.budget_gib))
    check_quant_available(planned.quant)
    choice = planned.choice("auto" if config.depth == "auto" else "fixed")
    return plan_for_model(config.model, config.strategy, planned.depth, config.protect), choice


def load_private_examples(config: AgentConfig) -> list:
    """The local training set (never leaves the device)."""
    if config.data is None:
        from edge_client.demo_data import build_demo_examples

        return build_demo_examples(config.max_examples or DEMO_EXAMPLES, seed=config.seed)
    from edge_client.data import load_examples

    examples = load_examples(config.data)
    return examples[: config.max_examples] if config.max_examples else examples


def rotate(examples: list, round_id: int, used_per_round: int) -> list:
    """Start each round where the previous one stopped, so successive rounds see fresh examples."""
    offset = ((round_id - 1) * used_per_round) % len(examples)
    return examples[offset:] + examples[:offset]


def task_train_config(config: AgentConfig, kept_layers, hyper: dict, lora: dict, *, quant: str,
                      checkpoint_every: int = 1):
    """The local run a task asks for: the server's hyper-parameters (max_steps, lr, batch_size, seq_len) and LoRA
    settings (r, alpha, targets) on this device's kept layers, in the plan's precision `quant`; warm-up = a quarter
    of the steps (at most 5), no held-out split here (federated evaluation holds its examples out before).
    Shared by the agent and the Flower ClientApp, so both train alike."""
    from edge_client.train import TrainConfig

    alpha = float(lora["alpha"])
    steps = int(hyper.get("max_steps") or 1)
    return TrainConfig(
        model=config.model or TrainConfig.model, kept_layers=tuple(kept_layers), max_steps=steps,
        batch_size=int(hyper.get("batch_size") or 1), lr=float(hyper.get("lr") or 2e-4),
        seq_len=int(hyper.get("seq_len") or 256), lora_r=int(lora["r"]),
        lora_alpha=int(alpha) if alpha.is_integer() else alpha, lora_targets=tuple(lora["targets"]),
        quant=quant, seed=config.seed, warmup_steps=min(5, steps // 4), eval_fraction=0.0,
        checkpoint_every=checkpoint_every, gradient_checkpointing=config.gradient_checkpointing,
        verbose=config.verbose)


# ---- the agent --------------------------------------------------------------------------------------------------
class Agent:
    def __init__(self, config: AgentConfig, *, stop: threading.Event | None = None,
                 log: Callable[[str], None] | None = None):
        self.config = config
        self.dir = Path(config.state_dir)
        self.stop = stop or threading.Event()
        self.rng = random.Random(f"{config.seed}:{os.getpid()}")
        self._log = log or (lambda message: print(f"agent: {message}", file=sys.stderr, flush=True))
        self.state: dict = {}
        self.client = None
        self._examples: list | None = None
        self._heldout: list = []

    # -- helpers --
    def persist(self, **changes) -> None:
        self.state.update(changes)
        write_state(self.dir, self.state)

    def retry(self, what: str, fn: Callable):
        """fn() with TransientError retried on the backoff schedule; a stop request ends the wait."""
        from edge_client.transport import TransientError

        delays = self.config.backoff.delays(self.rng)
        while True:
            try:
                return fn()
            except TransientError as exc:
                delay = next(delays, None)
                if delay is None:
                    raise
                self._log(f"{what}: {exc.code.name} ({exc.details}); retrying in {delay:.1f} s")
                if self.stop.wait(delay):
                    raise Stopped() from None

    def round_dir(self, round_id: int) -> Path:
        return self.dir / "rounds" / str(round_id)

    # -- steps --
    def register(self) -> None:
        from edge_client.transport import AggregatorClient
        from prufed.common.models import fingerprint_model_dir, resolve_model

        if not self.config.enroll_token:
            raise ConfigError("--token", f"{self.dir / STATE_FILE} does not exist yet: the enrolment token is needed "
                                         "to register")
        spec = hardware_spec(self.config)
        plan, choice = plan_layers(self.config, spec)
        fingerprint = fingerprint_model_dir(resolve_model(self.config.model))
        hardware = spec.to_json_dict()
        client = AggregatorClient(self.config.aggregator, tls_ca=self.config.tls_ca)
        try:
            reg = self.retry("Register", lambda: client.register(
                self.config.enroll_token, plan.kept_layers, hardware, base_model=fingerprint,
                name=self.config.name))
        finally:
            client.close()
        self.state = {"version": 1, "client_id": reg.client_id, "token": reg.token, "aggregator":
                      self.config.aggregator, "base_model": fingerprint, "plan": plan.to_json_dict(),
                      "depth_choice": choice, "hardware": hardware, "federation": reg.federation,
                      "phase": REGISTERED, "round": 0, "global_version": None, "receipt": None, "history": []}
        self.persist()
        self._log(f"registered as {reg.client_id}: depth {plan.depth}/{plan.source_num_layers} ({plan.strategy}), "
                  f"kept layers {list(plan.kept_layers)}")

    @property
    def kept_layers(self) -> tuple[int, ...]:
        return tuple(self.state["plan"]["kept_layers"])

    def download(self, task) -> None:
        target = self.round_dir(task.round)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        started = time.perf_counter()
        _, _, version = self.retry("DownloadGlobal", lambda: self.client.download_global(
            task.global_version, out_path=target / GLOBAL_FILE))
        size = (target / GLOBAL_FILE).stat().st_size
        self.persist(phase=DOWNLOADED, round=task.round, global_version=version, training=task.training,
                     receipt=None, current={"round": task.round, "download_bytes": size,
                                            "download_s": round(time.perf_counter() - started, 4)})
        self._log(f"round {task.round}: downloaded global v{version} slice ({size} bytes)")

    def load_examples(self) -> None:
        """The private examples, split once into training and federated-evaluation parts (never re-mixed)."""
        if self._examples is None:
            from edge_client.federated_eval import heldout_split

            self._examples, self._heldout = heldout_split(load_private_examples(self.config),
                                                          self.config.eval_examples, self.config.seed)

    def evaluate(self) -> None:
        """Federated evaluation of the downloaded global before training; only (loss, examples) leave the device."""
        from edge_client.federated_eval import score_global
        from prufed.common.adapter_format import load_adapter

        current = dict(self.state.get("current") or {})
        if "eval" in current:
            return  # already scored before a restart
        self.load_examples()
        result = None
        if self._heldout:
            hp = self.state.get("training") or {}
            result = score_global(self.config.model, PruningPlan.from_json_dict(self.state["plan"]),
                                  load_adapter(self.round_dir(self.state["round"]) / GLOBAL_FILE)[0], self._heldout,
                                  seq_len=int(hp.get("seq_len") or 256), lora=self.state["federation"]["lora"],
                                  quant=(self.state.get("depth_choice") or {}).get("quant", self.config.quant))
        self.persist(current=dict(current, eval=result.to_json_dict() if result else None))
        if result:
            self._log(f"round {self.state['round']}: federated eval of global v{self.state['global_version']}: "
                      f"loss {result.loss:.4f} on {result.examples} held-out examples")

    def train(self) -> None:
        from edge_client.train import train_local

        self.evaluate()
        round_id = self.state["round"]
        self.load_examples()
        assert self._examples is not None
        config = task_train_config(self.config, self.kept_layers, self.state.get("training") or {},
                                   self.state["federation"]["lora"],
                                   quant=(self.state.get("depth_choice") or {}).get("quant", self.config.quant))
        steps, batch = config.max_steps, config.batch_size

        def on_step(step: int, loss: float) -> None:
            if self.stop.is_set():  # the step just finished is checkpointed; resume continues from it
                raise Stopped()

        train_dir = self.round_dir(round_id) / "train"
        resuming = (train_dir / "checkpoint").exists()
        self._log(f"round {round_id}: training {steps} steps{' (resuming)' if resuming else ''}")
        result = train_local(config, train_dir, global_adapter=self.round_dir(round_id) / GLOBAL_FILE,
                             examples=rotate(self._examples, round_id, steps * batch), round=round_id,
                             resume=True, on_step=on_step)
        losses = result.metrics["train_loss"]
        current = dict(self.state.get("current") or {}, round=round_id, update_path=str(result.update_path),
                       num_examples=result.num_examples, steps=result.metrics["steps"],
                       train_loss=sum(losses) / len(losses), last_loss=losses[-1],
                       train_seconds=result.metrics["train_seconds"], train_wall_s=result.metrics["wall_time_s"],
                       resumed_from_step=result.metrics["resumed_from_step"], quant=result.metrics["quant"])
        self.persist(phase=TRAINED, current=current)
        self._log(f"round {round_id}: trained, mean loss {current['train_loss']:.4f} "
                  f"({current['train_seconds']:.1f} s)")
        fault_point("after_train", round_id)

    def upload(self) -> None:
        from edge_client.transport import FatalError

        round_id, current = self.state["round"], dict(self.state["current"])
        path = Path(current["update_path"])
        started = time.perf_counter()
        try:
            scored = current.get("eval")
            receipt = self.retry("UploadUpdate", lambda: self.client.upload_update(
                path, round_id, int(current["num_examples"]), self.kept_layers,
                eval=(scored["loss"], scored["examples"]) if scored else None))
        except FatalError as exc:
            if exc.code.name not in DISCARD_CODES:
                raise
            self._log(f"round {round_id}: update discarded, the server refused it ({exc.details})")
            self.finish_round(current | {"discarded": exc.details}, phase=REGISTERED, receipt=None)
            return
        fault_point("after_upload", round_id)
        record = {"upload_id": receipt.upload_id, "sha256": receipt.sha256, "accepted": receipt.accepted,
                  "duplicate": receipt.duplicate, "round": receipt.round}
        current.update(upload_bytes=path.stat().st_size, upload_s=round(time.perf_counter() - started, 4),
                       receipt=record)
        self.finish_round(current, phase=UPLOADED, receipt=record)
        self._log(f"round {round_id}: uploaded {current['upload_bytes']} bytes, receipt {receipt.upload_id}"
                  f"{' (duplicate: already accepted)' if receipt.duplicate else ''}")

    def finish_round(self, record: dict, **changes) -> None:
        """Close the round locally: record it in the history, drop its large files (keep the metrics)."""
        history = [h for h in self.state.get("history", []) if h.get("round") != record["round"]] + [record]
        self.persist(history=history, current=None, **changes)
        round_dir = self.round_dir(record["round"])
        for path in (round_dir / GLOBAL_FILE, round_dir / "train" / "checkpoint",
                     round_dir / "train" / "adapter.safetensors", round_dir / "train" / "update.safetensors"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()

    def wait(self, seconds: float) -> None:
        if self.stop.wait(max(0.05, min(seconds, self.config.max_wait_s))):
            raise Stopped()

    # -- main loop --
    def run(self) -> int:
        from edge_client.transport import AggregatorClient

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with open(self.dir / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError("--state-dir", f"{self.dir} is in use by another agent") from None
            try:
                self.state = read_state(self.dir) or {}
                if not self.state:
                    self.register()
                else:
                    self._log(f"resuming client {self.state['client_id']} at round {self.state['round']} "
                              f"(phase {self.state['phase']})")
                chunk = int(self.state["federation"].get("chunk_size") or 0)
                kwargs = {"chunk_size": chunk} if chunk else {}
                self.client = AggregatorClient(self.config.aggregator, token=self.state["token"],
                                               tls_ca=self.config.tls_ca, **kwargs)
                try:
                    return self._loop()
                finally:
                    self.client.close()
            except Stopped:
                self._log(f"stopped; state persisted (round {self.state.get('round')}, "
                          f"phase {self.state.get('phase')})")
                return 0

    def _loop(self) -> int:
        while not self.stop.is_set():
            phase = self.state["phase"]
            if phase == DONE:
                self._log(f"{self.dir} already took part in a finished federation; nothing to do (use a new "
                          "--state-dir to join another)")
                return 0
            if phase == TRAINED:
                self.upload()
                continue
            task = self.retry("PullTask", self.client.pull_task)
            if task.kind == "done":
                self.persist(phase=DONE)
                self._log(f"federation finished ({task.reason})")
                return 0
            if task.kind == "wait":
                self.wait(task.retry_after_s or 1.0)
                continue
            if phase == DOWNLOADED and self.state["round"] == task.round:
                self.train()  # resumes from the per-step checkpoint when one exists
                continue
            if phase == DOWNLOADED:
                self._log(f"round {self.state['round']} moved on to {task.round}: discarding the unfinished update")
                shutil.rmtree(self.round_dir(self.state["round"]), ignore_errors=True)
            self.download(task)
            self.train()
        raise Stopped()


def run_agent(config: AgentConfig) -> int:
    """Run until the federation is done (0) or SIGTERM/SIGINT (0); errors propagate as PrufedError."""
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        return Agent(config, stop=stop).run()
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)

