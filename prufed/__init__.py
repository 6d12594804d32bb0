"""PruFed: heterogeneous federated fine-tuning of layer-pruned LLMs.

The `prufed` package holds what the edge agent and the aggregator share: the adapter key scheme and file
format, model resolution (the offline default model), the wire stubs, and the `prufed` CLI.
"""

__version__ = "0.1.0"
