"""tlcli: transfer learning from TF Hub image feature vectors, from the command line or Python.

The library functions are imported lazily so that ``import tlcli`` stays cheap::

    import tlcli
    result = tlcli.train("images/", out="my-model")
    tlcli.predict(["cat.jpg"], model_dir="my-model")
    tlcli.export_tflite("my-model", quantize="int8")
"""

__version__ = "0.1.0"

_LAZY = {
    "train": ("tlcli.training", "train"),
    "TrainConfig": ("tlcli.config", "TrainConfig"),
    "predict": ("tlcli.inference", "predict"),
    "export_tflite": ("tlcli.export", "export_tflite"),
    "evaluate": ("tlcli.evaluation", "evaluate"),
    "TlcliError": ("tlcli.errors", "TlcliError"),
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
