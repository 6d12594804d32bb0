"""Generated gRPC stubs for the `prufed.v1` wire contract (regenerate with `scripts/gen_protos.py`)."""
