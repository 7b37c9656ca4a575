"""Training: the recipe from the scan to the written bundle (``train``), the prelude that checks
files while extraction starts, resume state, fine-tuning, TensorBoard summaries, and the
hardware: strategies, multi-worker clusters (TF_CONFIG), the distributed feature step and mixed
precision. The recipe owns the run and builds the bundle's metadata."""

from tlcli.training.recipe import TrainResult, train

__all__ = ["TrainResult", "train"]
