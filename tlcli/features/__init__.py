"""The feature stage: the frozen backbone's vectors of each image, computed once (TensorFlow or
LiteRT) and kept in the feature store by content digest, and the feature views the head is fit
on. It owns the store's format and keys, so users' caches stay warm across releases. ``unknown``
is the score of how unlike the training photos' features a photo's are, and its threshold; ``tta``
the test-time crop views, and the cross-validated decision to keep them."""

from tlcli.features.extraction import extract, extract_litert
from tlcli.features.store import (
    DECODER_VERSION,
    VIEWS_IN_MEMORY_BYTES,
    FeatureStore,
    NoStore,
    StoredRows,
    model_store,
)
from tlcli.features.views import FeatureViews, agrees, compute_views, frozen_engines, frozen_views, view_key

__all__ = ["DECODER_VERSION", "VIEWS_IN_MEMORY_BYTES", "FeatureStore", "FeatureViews", "NoStore", "StoredRows",
           "agrees", "compute_views", "extract", "extract_litert", "frozen_engines", "frozen_views", "model_store",
           "view_key"]
