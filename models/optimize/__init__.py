"""Model optimisation past post-training quantization: structured pruning, distillation, QAT.

``graph`` and ``frames`` are plain (onnx, numpy) and run in the factory's own environment; the
modules that train import torch, which lives in its own cached virtualenv
(``scripts/setup-train.sh``), so the agent and the rest of the factory never need it.
"""
