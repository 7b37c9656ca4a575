"""Deployment: running a bundle (the inference engines, TensorFlow and the export formats, and
``predict``; ``saliency``: what drove a guess, as an overlay on the photo), exporting it
(``export_model``, ``export_all``, ``export_tflite``: the registry of formats in ``formats``
(TFLite, ONNX, OpenVINO), each through the same parity pass) and serving it over HTTP (``serve``,
its page and TF Serving's REST protocol). The names below are imported on first use, so that
predict on an exported file loads neither the exporter nor the server; Starlette and uvicorn are
imported only when a server starts, and each format's runtime only when it is used."""

# name -> module: the public names, imported on first use.
_LAZY = {
    "ExportAllResult": "tlcli.deploy.export", "ExportResult": "tlcli.deploy.export",
    "export_all": "tlcli.deploy.export", "export_model": "tlcli.deploy.export", "export_tflite": "tlcli.deploy.export",
    "Prediction": "tlcli.deploy.inference", "predict": "tlcli.deploy.inference",
    "ServeResult": "tlcli.deploy.server", "make_app": "tlcli.deploy.server", "serve": "tlcli.deploy.server",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tlcli.deploy' has no attribute {name!r}")


__all__ = sorted(_LAZY)
