"""PruFed inside Flower (needs the `prufed[flower]` extra, flwr 1.42 Message API).

- `strategy.PruFedStrategy`: a Flower `Strategy` that folds depth-heterogeneous LoRA deltas with PruFed's
  aggregation (HeteAgg by default; the mode is pluggable) over ArrayRecords keyed by ORIGINAL layer index.
- `client_app.make_client_app`: a `ClientApp` that plans its depth from the node's hardware profile and trains with
  PruFed's edge trainer.
- `server_app.make_server_app`: a `ServerApp` whose run config sets rounds, aggregation mode and pruning strategy.
- `records`: the message layout both sides share.

Layering: above edge_client and aggregator (it drives both roles), below prufed.simulation and prufed.cli.
"""
