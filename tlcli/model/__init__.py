"""The model: the presets (name -> TF Hub handle and sizes), resolving, fetching and loading a
backbone, the backbone converted for LiteRT, the Keras classifier (backbone + head), the numpy
softmax head fit on cached features (``model.head``, imported on use: it needs numpy), and the TF
Hub cache behind ``tlcli models``."""

from tlcli.model.backbone import REMOTE_PREFIXES, BackboneSpec, cache_key, fetch, resolve_spec
from tlcli.model.presets import PRESETS, Preset

__all__ = ["PRESETS", "REMOTE_PREFIXES", "BackboneSpec", "Preset", "cache_key", "fetch", "resolve_spec"]
