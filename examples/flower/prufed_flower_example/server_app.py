"""ServerApp: Flower's round loop with PruFedStrategy (HeteAgg); rounds, mode and pruning strategy from run config."""

from prufed.flower.server_app import make_server_app

app = make_server_app()
