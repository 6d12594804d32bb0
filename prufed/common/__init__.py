"""The contract shared by the edge agent and the aggregator.

It imports neither `edge_client` nor `aggregator`: errors, the adapter key scheme and file format, wire
helpers, model resolution and the PEFT key bridge.
"""
