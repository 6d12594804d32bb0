"""prufed.flower without Ray: the strategy's aggregation over Flower Messages, node and server settings."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aggregator.core.heteagg import AggregationConfig, HeteAggregator
from aggregator.core.init_adapter import initial_global_adapter
from prufed.common.adapter_keys import keys_for_layers, layer_of
from prufed.common.errors import ConfigError
from prufed.flower.client_app import node_settings
from prufed.flower.records import task_hyper, to_array_record, to_state
from prufed.flower.server_app import ServerSettings
from prufed.flower.strategy import PruFedStrategy

CONFIG = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16,
          "num_hidden_layers": 6}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need the identity of the running task (run_simulation sets it in a real run)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _global() -> dict[str, torch.Tensor]:
    state = initial_global_adapter(CONFIG, r=2, alpha=4, targets=("q_proj", "v_proj"), seed=0)
    gen = torch.Generator().manual_seed(1)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def _reply(node: int, update: dict, layers: list[int], examples: int) -> Message:
    sent = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": to_array_record(update),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": float(node)}),
                          "prufed": ConfigRecord({"kept-layers": layers, "plan": "{}", "partition-id": node})})
    return Message(content, reply_to=sent)


def _delta(state, layers, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(state[k].shape, generator=gen) for k in keys_for_layers(state, layers)}


def _strategy(state, **kwargs) -> PruFedStrategy:
    strategy = PruFedStrategy(**kwargs)
    strategy.global_state = dict(state)  # what configure_train stores from the round's arrays
    return strategy


def test_mixed_depths_fold_per_layer_holders():
    """Layers 0-5 held by the deep client only, 0-1 by all three: each key averages over its holders (by hand)."""
    state = _global()
    layers = {11: [0, 1, 2, 3, 4, 5], 12: [0, 1, 2, 3], 13: [0, 1]}
    counts = {11: 5, 12: 3, 13: 2}
    updates = {node: _delta(state, ls, node) for node, ls in layers.items()}
    strategy = _strategy(state)
    arrays, metrics = strategy.aggregate_train(1, [_reply(n, updates[n], layers[n], counts[n]) for n in (13, 11, 12)])
    result = to_state(arrays)
    for key, value in state.items():
        holders = [n for n in layers if layer_of(key) in layers[n]]
        expected = value.double() + sum(counts[n] * updates[n][key].double() for n in holders) / sum(
            counts[n] for n in holders)
        assert torch.allclose(result[key].double(), expected, atol=1e-6), key
    # the same replies through PruFed's aggregator directly: bit for bit (the strategy adds nothing to the maths)
    direct = HeteAggregator(state, AggregationConfig())
    for node in sorted(layers):
        direct.add(updates[node], counts[node])
    for key, value in direct.finish().state.items():
        assert torch.equal(result[key], value)
    assert metrics["train-loss"] == pytest.approx((5 * 11 + 3 * 12 + 2 * 13) / 10)
    assert strategy.known_layers == {n: tuple(ls) for n, ls in layers.items()}
    record = strategy.history[-1]
    assert sorted(c["kept_layers"] for c in record["clients"]) == sorted(layers.values())
    assert all(c["bytes_up"] > 0 for c in record["clients"])


def test_bad_replies_are_refused_and_the_rest_aggregated():
    state = _global()
    good = _delta(state, [0, 1], 1)
    foreign = _delta(state, [0, 1, 2], 2)  # declares layers 0-1 but sends layer 2 too
    nan = {k: v.clone() for k, v in _delta(state, [0], 3).items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    sent = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=9,
                   message_type=MessageType.TRAIN)
    replies = [_reply(1, good, [0, 1], 4), _reply(2, foreign, [0, 1], 4), _reply(3, nan, [0], 4),
               Message(Error(code=0, reason="client crashed"), reply_to=sent)]
    strategy = _strategy(state)
    arrays, _ = strategy.aggregate_train(1, replies)
    result = to_state(arrays)
    for key in state:  # only the good reply counts
        expected = state[key] + good[key] if key in good else state[key]
        assert torch.allclose(result[key], expected, atol=1e-7)
    record = strategy.history[-1]
    reasons = {r["node"]: r["reason"] for r in record["refused"]}
    assert set(reasons) == {2, 3}
    assert "wrong_keys" in reasons[2] and "layers [2]" in reasons[2]
    assert "non_finite" in reasons[3]
    assert record["failed"] == [{"node": 9, "reason": "client crashed"}]
    assert set(strategy.known_layers) == {1}


def test_no_valid_reply_keeps_the_global():
    state = _global()
    strategy = _strategy(state)
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, {"bogus.key": torch.zeros(2)}, [0], 3)])
    assert arrays is None and metrics is None
    assert all(torch.equal(strategy.global_state[k], v) for k, v in state.items())


def test_fedavg_mode_refuses_mixed_depths_and_custom_mode_plugs_in():
    state = _global()
    replies = [_reply(1, _delta(state, [0, 1], 1), [0, 1], 2), _reply(2, _delta(state, [0], 2), [0], 2)]
    fedavg = _strategy(state, aggregation=AggregationConfig(mode="fedavg"))
    arrays, _ = fedavg.aggregate_train(1, replies)  # the first reply folded in sets the key set; the other is refused
    (refused,) = fedavg.history[-1]["refused"]
    assert "same keys" in refused["reason"] and len(fedavg.history[-1]["clients"]) == 1
    (kept,) = fedavg.history[-1]["clients"]
    assert sum(not torch.equal(v, state[k]) for k, v in to_state(arrays).items()) == 2 * len(kept["kept_layers"]) * 2
    seen = []

    class Recording(HeteAggregator):
        def add(self, update, num_examples, name=""):
            seen.append((name, sorted({layer_of(k) for k in update}), num_examples))
            super().add(update, num_examples, name)

    strategy = _strategy(state, make_aggregator=lambda g: Recording(g, AggregationConfig(weighting="uniform")))
    strategy.aggregate_train(1, replies)
    assert sorted(seen) == [("1", [0, 1], 2), ("2", [0], 2)]


def test_node_settings_order_and_errors(tmp_path):
    run = {"depths": "8,6,4", "profiles": "", "seed": 10, "model": "m", "client-ids": "3,5,7"}
    s = node_settings(run, {"partition-id": 1, "num-partitions": 3})
    assert (s.client_id, s.agent.depth, s.agent.seed, s.agent.profile) == (5, 6, 15, None)
    s = node_settings(run, {"partition-id": 4})  # round-robin over the lists
    assert (s.client_id, s.agent.depth) == (5, 6)
    s = node_settings(run, {"partition-id": 0, "hardware-profile": "laptop-cpu-8gb"})  # the node's hardware wins
    assert (s.agent.depth, s.agent.profile) == ("auto", "laptop-cpu-8gb")
    s = node_settings({"profiles": "jetson-orin-nano-8gb,laptop-cpu-16gb"}, {"partition-id": 1})
    assert (s.agent.depth, s.agent.profile) == ("auto", "laptop-cpu-16gb")
    assert node_settings({}, {"depth": 3}).agent.depth == 3
    with pytest.raises(ConfigError, match="depths"):
        node_settings({"depths": "8,x"}, {"partition-id": 1})
    with pytest.raises(ConfigError, match="data-dir"):
        node_settings({"data-dir": str(tmp_path)}, {"partition-id": 0})
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "data.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    assert node_settings({"data-dir": str(tmp_path)}, {"partition-id": 2}).agent.data == str(tmp_path / "2" / "data.jsonl")


def test_server_settings_name_the_run_config_key():
    settings = ServerSettings.from_run_config({"num-server-rounds": 2, "local-steps": 4, "lora-alpha": 16})
    assert settings.rounds == 2 and settings.task["max-steps"] == 4 and settings.lora()["alpha"] == 16
    hyper, lora = task_hyper(ConfigRecord(dict(settings.task)))
    assert hyper == {"max_steps": 4, "lr": 1e-3, "batch_size": 1, "seq_len": 160}
    assert lora == {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}
    for key, value in (("num-server-rounds", 0), ("mode", "mean"), ("pruning-strategy", "random-ish"),
                       ("weighting", "size"), ("local-steps", 0), ("seq-len", 4), ("min-nodes", 0),
                       ("fraction-train", 0.0), ("lr", -1.0)):
        with pytest.raises(ConfigError) as info:
            ServerSettings.from_run_config({key: value})
        assert key in str(info.value)
    with pytest.raises(KeyError, match="max-steps"):
        task_hyper({"lr": 1.0})


def test_simulation_config_checks_the_engine(tmp_path):
    from prufed.simulation.run import SimulationConfig

    assert SimulationConfig(out=tmp_path, engine="flower", mode="fedavg").engine == "flower"
    with pytest.raises(ConfigError, match="--engine") as info:
        SimulationConfig(out=tmp_path, engine="flower", mode="mixed")
    assert "per-group" in str(info.value)
    with pytest.raises(ConfigError, match="--engine"):
        SimulationConfig(out=tmp_path, engine="ray")
