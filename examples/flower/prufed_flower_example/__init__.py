"""PruFed in a Flower app: the apps are PruFed's, configured by this app's run config."""
