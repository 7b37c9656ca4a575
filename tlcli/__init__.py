"""tlcli: transfer learning from TF Hub image feature vectors, from the command line or Python.

The library functions are imported lazily so that ``import tlcli`` stays cheap::

    import tlcli
    result = tlcli.train("images/", out="my-model")
    tlcli.predict(["cat.jpg"], model_dir="my-model")
    tlcli.export_tflite("my-model", quantize="int8")
    tlcli.evaluate("test-images/", model_dir="my-model")
    tlcli.load_bundle("my-model").meta.metrics.val_accuracy
"""

__version__ = "0.1.0"

# name -> (module, attribute): the public API, imported on first use.
_LAZY = {
    "train": ("tlcli.training", "train"),
    "TrainConfig": ("tlcli.config", "TrainConfig"),
    "TrainResult": ("tlcli.training", "TrainResult"),
    "predict": ("tlcli.inference", "predict"),
    "Prediction": ("tlcli.inference", "Prediction"),
    "export_tflite": ("tlcli.export", "export_tflite"),
    "ExportResult": ("tlcli.export", "ExportResult"),
    "evaluate": ("tlcli.evaluation", "evaluate"),
    "EvaluateResult": ("tlcli.evaluation", "EvaluateResult"),
    "load_bundle": ("tlcli.bundle", "load"),
    "Bundle": ("tlcli.bundle", "Bundle"),
    "BundleMeta": ("tlcli.bundle", "BundleMeta"),
    "TlcliError": ("tlcli.errors", "TlcliError"),
    "serve": ("tlcli.server", "serve"),
    "make_app": ("tlcli.server", "make_app"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tlcli' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]

# Modules are named training/inference/evaluation (not train/predict/evaluate) so that importing
# them never shadows the functions of the same name on this package.
