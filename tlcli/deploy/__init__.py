"""Deployment: running a bundle (the inference engines, TensorFlow and the export formats, and
``predict``), exporting it (``export_model``, ``export_all``, ``export_tflite``: the registry of
formats in ``formats`` (TFLite, ONNX, OpenVINO), each through the same parity pass) and serving
it over HTTP (``serve``, its page and TF Serving's REST protocol). Starlette and uvicorn are
imported only when a server starts, and each format's runtime only when it is used."""

from tlcli.deploy.export import ExportAllResult, ExportResult, export_all, export_model, export_tflite
from tlcli.deploy.inference import Prediction, predict
from tlcli.deploy.server import ServeResult, make_app, serve

__all__ = ["ExportAllResult", "ExportResult", "Prediction", "ServeResult", "export_all", "export_model",
           "export_tflite", "make_app", "predict", "serve"]
