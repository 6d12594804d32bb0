"""Aggregator replicas and chaos for `prufed simulate --replicas N --chaos K`.

N `prufed aggregator serve` processes share one database, each on its own fixed 127.0.0.1 port, so the agents'
`--aggregator HOST:PORT,HOST:PORT,...` list stays valid when a replica is restarted there. With chaos, a thread
seeded by `--seed` SIGKILLs a random replica K times, at random moments (a uniform gap of `CHAOS_GAP_S` seconds
between kills), and restarts it on the same port. Every replica's Prometheus endpoint is scraped while it runs, so
per-replica request counts survive a kill up to the last scrape before it.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prufed.common.errors import PrufedError

CHAOS_GAP_S = (1.0, 4.0)  # seconds between two kills: short enough that a tiny federation sees them all


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    proc: object = None  # subprocess.Popen of the current incarnation
    incarnation: int = 0
    requests: list[dict[str, int]] = field(default_factory=list)  # per incarnation: {method: count} last scraped


class ReplicaSet:
    """Start, watch, kill and restart the replicas; `address` is the agents' comma-separated address list."""

    def __init__(self, children, serve_cmd: Sequence[str], ports: Sequence[tuple[int, int]], out: Path, *,
                 chaos: int = 0, seed: int = 0):
        self.children = children
        self.serve_cmd = list(serve_cmd)  # without --listen / --metrics-port
        self.replicas = [Replica(i, port, metrics) for i, (port, metrics) in enumerate(ports)]
        self.out = out
        self.chaos = chaos
        self.rng = random.Random(f"prufed-chaos:{seed}")
        self.kills: list[dict] = []
        self._lock = threading.Lock()  # a replica being restarted is not "dead"
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return ",".join(f"127.0.0.1:{r.port}" for r in self.replicas)

    def start(self) -> str:
        from prufed.simulation.run import wait_listening

        for replica in self.replicas:
            self._spawn(replica)
        for replica in self.replicas:
            wait_listening(self._log(replica), replica.proc)
        self._started = time.monotonic()
        if self.chaos:
            self._thread = threading.Thread(target=self._chaos, name="chaos", daemon=True)
            self._thread.start()
        return self.address

    def _log(self, replica: Replica) -> Path:
        name = "aggregator" if replica.index == 0 else f"aggregator-{replica.index}"
        return self.out / (f"{name}.log" if replica.incarnation == 0 else f"{name}.{replica.incarnation}.log")

    def _spawn(self, replica: Replica) -> None:
        cmd = [*self.serve_cmd, "--listen", f"127.0.0.1:{replica.port}", "--metrics-port", str(replica.metrics_port)]
        replica.proc = self.children.spawn(cmd, self._log(replica))
        replica.requests.append({})

    def _chaos(self) -> None:
        from prufed.simulation.run import wait_listening

        for _ in range(self.chaos):
            if self._stop.wait(self.rng.uniform(*CHAOS_GAP_S)):
                return
            with self._lock:
                replica = self.rng.choice(self.replicas)
                self.scrape()
                replica.proc.send_signal(signal.SIGKILL)
                replica.proc.wait()
                self.kills.append({"replica": replica.index, "incarnation": replica.incarnation,
                                   "at_s": round(time.monotonic() - self._started, 3)})
                replica.incarnation += 1
                self._spawn(replica)
            wait_listening(self._log(replica), replica.proc)
        # the restarted replicas are this thread's children, and PR_SET_PDEATHSIG fires when the forking THREAD
        # ends: stay alive until the run stops them
        self._stop.wait()

    def check(self) -> None:
        """Raise if a replica exited on its own (not killed by chaos)."""
        with self._lock:
            for replica in self.replicas:
                if replica.proc.poll() is not None:
                    raise PrufedError(f"aggregator replica {replica.index} exited ({replica.proc.returncode}); see "
                                      f"{self._log(replica)}")

    def scrape(self) -> None:
        """Record each live replica's prufed_requests_total{method} (its current incarnation)."""
        for replica in self.replicas:
            counts = _scrape_requests(replica.metrics_port)
            if counts is not None:
                replica.requests[-1] = counts

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=300)
        self.scrape()

    def report(self) -> dict:
        """{"replica_kills": [...], "replica_requests": [{"replica", "restarts", "requests": {method: n}, "total"}]}."""
        rows = []
        for replica in self.replicas:
            merged: dict[str, int] = {}
            for counts in replica.requests:
                for method, n in counts.items():
                    merged[method] = merged.get(method, 0) + n
            rows.append({"replica": replica.index, "address": f"127.0.0.1:{replica.port}",
                         "restarts": replica.incarnation, "requests": dict(sorted(merged.items())),
                         "total": sum(merged.values())})
        return {"replica_kills": list(self.kills), "replica_requests": rows}


def _scrape_requests(port: int) -> dict[str, int] | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "prufed_requests":
            for sample in family.samples:
                if sample.name == "prufed_requests_total":
                    counts[sample.labels["method"]] = int(sample.value)
    return counts
