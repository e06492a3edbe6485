"""edge-models: the model factory (quantize, evaluate, gate, publish)."""
