"""tlcli: transfer learning from TF Hub image feature vectors, from the command line or Python.

The library functions are imported lazily so that ``import tlcli`` stays cheap::

    import tlcli
    result = tlcli.train("images/", out="my-model")
    tlcli.predict(["cat.jpg"], model_dir="my-model")
    tlcli.explain(["cat.jpg"], out_dir="why", model_dir="my-model")  # predict + saliency overlays
    tlcli.export_tflite("my-model", quantize="int8")
    tlcli.export_model("my-model", format="onnx")    # or "openvino"; export_all for every format
    tlcli.evaluate("test-images/", model_dir="my-model")
    tlcli.audit("images/")
    tlcli.load_bundle("my-model").meta.metrics.val_accuracy
    tlcli.share_bundle("my-model", out="my-model-shared")  # without the folders it was trained from
"""

__version__ = "0.1.0"

# name -> (module, attribute): the public API, imported on first use.
_LAZY = {
    "train": ("tlcli.training.recipe", "train"),
    "TrainConfig": ("tlcli.config", "TrainConfig"),
    "TrainResult": ("tlcli.training.recipe", "TrainResult"),
    "predict": ("tlcli.deploy.inference", "predict"),
    "Prediction": ("tlcli.deploy.inference", "Prediction"),
    "explain": ("tlcli.deploy.saliency", "explain"),
    "export_tflite": ("tlcli.deploy.export", "export_tflite"),
    "export_model": ("tlcli.deploy.export", "export_model"),
    "export_all": ("tlcli.deploy.export", "export_all"),
    "ExportResult": ("tlcli.deploy.export", "ExportResult"),
    "ExportAllResult": ("tlcli.deploy.export", "ExportAllResult"),
    "evaluate": ("tlcli.insight.evaluation", "evaluate"),
    "EvaluateResult": ("tlcli.insight.evaluation", "EvaluateResult"),
    "audit": ("tlcli.insight.audit", "audit"),
    "AuditResult": ("tlcli.insight.audit", "AuditResult"),
    "load_bundle": ("tlcli.bundle.format", "load"),
    "Bundle": ("tlcli.bundle.format", "Bundle"),
    "BundleMeta": ("tlcli.bundle.format", "BundleMeta"),
    "share_bundle": ("tlcli.bundle.share", "share"),
    "ShareResult": ("tlcli.bundle.share", "ShareResult"),
    "TlcliError": ("tlcli.errors", "TlcliError"),
    "serve": ("tlcli.deploy.server", "serve"),
    "make_app": ("tlcli.deploy.server", "make_app"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tlcli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY) + ["__version__"]

# The stages are subpackages (data, model, features, bundle, training, deploy, insight, cli) and
# none is named like a function above, so importing one never shadows the function.
