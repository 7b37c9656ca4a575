"""Deployment: running a bundle (the inference engines, TensorFlow and LiteRT, and ``predict``;
``saliency``: what drove a guess, as an overlay on the photo),
exporting it (``export_tflite``, with the parity check and the ``.tflite`` metadata) and serving
it over HTTP (``serve``, its page and TF Serving's REST protocol). Starlette and uvicorn are
imported only when a server starts."""

from tlcli.deploy.export import ExportResult, export_tflite
from tlcli.deploy.inference import Prediction, predict
from tlcli.deploy.server import ServeResult, make_app, serve

__all__ = ["ExportResult", "Prediction", "ServeResult", "export_tflite", "make_app", "predict", "serve"]
