"""ClientApp: plans this node's depth from its hardware profile, trains LoRA on the kept layers, replies the delta."""

from prufed.flower.client_app import make_client_app

app = make_client_app()
