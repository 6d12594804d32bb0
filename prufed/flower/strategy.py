"""PruFedStrategy: Flower's FedAvg round structure with PruFed's depth-heterogeneous aggregation.

Flower's own strategies average ArrayRecords key by key and refuse replies whose key sets differ
(`validate_message_reply_consistency`), so clients of different depths cannot meet in one round. Here every reply
carries Δ_k = local − global for ITS kept layers only (ORIGINAL layer keys, see `prufed.flower.records`), and the
round folds them with PruFed's streaming aggregator; with the default mode (HeteAgg) for every tensor x

    global'[x] = global[x] + server_lr · Σ_{k∈S_x} n_k·Δ_k[x] / Σ_{k∈S_x} n_k,    S_x = replies that hold x

so a layer only deep clients keep is averaged over those clients, and untouched layers stay bit-identical.
The mode is pluggable: pass `make_aggregator(global_state) -> object with add(update, num_examples, name) and
finish() -> result with .state and .report` to run any aggregator of aggregator/core on the same replies.

Each reply is validated once, up front (`aggregator.core.validate`): exactly the global's keys for the declared
kept layers, the global's shapes and dtypes, finite values, num-examples > 0. A refused reply is logged and left
out; the others still make the round. Replies are folded in content order (ArrayRecord object id, a sha256), so a
rerun gives the same sums whatever order the nodes answered in.

Downloads: once a node has told its kept layers, its next TRAIN message carries only those layers' tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aggregator.core.heteagg import AggregationConfig, HeteAggregator
from aggregator.core.validate import UpdateRejected, validate_update
from prufed.common.errors import PrufedError
from prufed.flower.records import (
    ARRAYS,
    CONFIG,
    KEPT_LAYERS,
    METRICS,
    NUM_EXAMPLES,
    PARTITION,
    PLAN,
    PRUFED,
    slice_state,
    to_array_record,
    to_state,
)


class StreamingAggregator(Protocol):
    """What a pluggable aggregation mode offers (HeteAggregator does)."""

    def add(self, update: Mapping[str, torch.Tensor], num_examples: int, name: str = "") -> None: ...

    def finish(self) -> Any: ...


AggregatorFactory = Callable[[Mapping[str, torch.Tensor]], StreamingAggregator]


class PruFedStrategy(FedAvg):
    """FedAvg's sampling and evaluation, PruFed's aggregation of depth-heterogeneous deltas.

    aggregation: HeteAgg options (mode heteagg | fedavg, weighting, server_lr, clipping, ...), used unless
    make_aggregator is given. `history` keeps one record per round (clients, bytes, timing, the aggregation
    report) for reports; `known_layers` maps node id -> kept layers learnt from its replies.
    """

    def __init__(self, *, aggregation: AggregationConfig | None = None,
                 make_aggregator: AggregatorFactory | None = None, fraction_train: float = 1.0,
                 min_train_nodes: int = 2, min_available_nodes: int = 2, fraction_evaluate: float = 0.0,
                 min_evaluate_nodes: int = 0) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=NUM_EXAMPLES,
                         arrayrecord_key=ARRAYS, configrecord_key=CONFIG)
        self.aggregation = aggregation or AggregationConfig()
        self.custom_mode = make_aggregator is not None
        self.make_aggregator: AggregatorFactory = make_aggregator or (
            lambda state: HeteAggregator(state, self.aggregation))
        self.known_layers: dict[int, tuple[int, ...]] = {}
        self.history: list[dict[str, Any]] = []
        self.global_state: dict[str, torch.Tensor] = {}  #: the latest global adapter (ORIGINAL keys)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> PruFed aggregation: %s", "custom make_aggregator" if self.custom_mode else self.aggregation)

    # ---- training ------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample like FedAvg; each node gets the global slice of its known kept layers (all layers at first)."""
        self.global_state = to_state(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = {"round": server_round, "started": time.time(), "bytes_down": {}, "clients": [], "refused": []}
        for message in messages:
            layers = self.known_layers.get(message.metadata.dst_node_id)
            if layers is not None:
                sliced = to_array_record(slice_state(self.global_state, layers))
                message.content = RecordDict({ARRAYS: sliced, CONFIG: message.content[CONFIG]})
            record["bytes_down"][message.metadata.dst_node_id] = message.content[ARRAYS].count_bytes()
        self.history.append(record)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, fold the valid ones with the aggregation mode, return global' and mean metrics."""
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not self.history or self.history[-1]["round"] != server_round:  # configure_train was not ours
            self.history.append({"round": server_round, "started": time.time(), "bytes_down": {}, "clients": [],
                                 "refused": []})
        record = self.history[-1]
        record["failed"] = [{"node": m.metadata.src_node_id, "reason": m.error.reason} for m in errors]
        accepted: list[tuple[Message, dict[str, torch.Tensor], tuple[int, ...], int]] = []
        for message in sorted(valid, key=lambda m: m.content[ARRAYS].object_id if ARRAYS in m.content else ""):
            node = message.metadata.src_node_id
            try:
                update, layers, examples = self._read_reply(message)
            except UpdateRejected as exc:
                log(WARNING, "aggregate_train: refused the reply of node %d: %s", node, exc)
                record["refused"].append({"node": node, "reason": str(exc)})
                continue
            self.known_layers[node] = layers
            accepted.append((message, update, layers, examples))
        aggregator = self.make_aggregator(self.global_state)
        for entry in list(accepted):
            message, update, _, examples = entry
            try:  # the mode's own checks (e.g. fedavg: identical key sets); a refused add changes nothing
                aggregator.add(update, examples, name=str(message.metadata.src_node_id))
            except PrufedError as exc:
                log(WARNING, "aggregate_train: %s mode refused node %d: %s", self.aggregation.mode,
                    message.metadata.src_node_id, exc)
                record["refused"].append({"node": message.metadata.src_node_id, "reason": str(exc)})
                accepted.remove(entry)
        if not accepted:
            record["closed"] = time.time()
            return None, None
        result = aggregator.finish()
        self.global_state = {key: value for key, value in result.state.items()}
        for message, _, layers, examples in accepted:
            metrics = message.content[METRICS]
            prufed = message.content[PRUFED]
            record["clients"].append({
                "node": message.metadata.src_node_id, "partition_id": int(prufed.get(PARTITION, -1)),
                "kept_layers": list(layers), "plan": prufed.get(PLAN), "num_examples": examples,
                "metrics": {key: metrics[key] for key in metrics},
                "bytes_up": message.content[ARRAYS].count_bytes(),
                "bytes_down": record["bytes_down"].get(message.metadata.src_node_id, 0)})
        record["report"] = getattr(result, "report", {})
        record["closed"] = time.time()
        metrics = self.train_metrics_aggr_fn([m.content for m, *_ in accepted], self.weighted_by_key)
        return to_array_record(self.global_state), metrics

    def _read_reply(self, message: Message) -> tuple[dict[str, torch.Tensor], tuple[int, ...], int]:
        """(Δ, kept layers, num examples) of one reply, checked against the current global."""
        content = message.content
        for name, kind in ((ARRAYS, "ArrayRecord"), (METRICS, "MetricRecord"), (PRUFED, "ConfigRecord")):
            if name not in content:
                raise UpdateRejected("wrong_keys", f"the reply has no {kind} {name!r}")
        layers_value = content[PRUFED].get(KEPT_LAYERS)
        if not isinstance(layers_value, list):
            raise UpdateRejected("bad_kept_layers", f"{PRUFED}[{KEPT_LAYERS!r}] must be a list of ints, "
                                                    f"got {layers_value!r}")
        examples = content[METRICS].get(NUM_EXAMPLES)
        update = to_state(content[ARRAYS])
        layers = tuple(layers_value)
        validate_update(update, kept_layers=layers, global_state=self.global_state,
                        num_examples=examples)
        return update, layers, int(examples)
