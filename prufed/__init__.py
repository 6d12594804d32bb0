"""PruFed: heterogeneous federated fine-tuning of layer-pruned LLMs.

`prufed.common` and `prufed.v1` are the contract that `edge_client` and `aggregator` share; `prufed.cli` and
`prufed.simulation` sit on top of both (docs/architecture.md).
"""

__version__ = "0.1.0"
