"""The bundle: the trained model's folder and its format. It owns ``tlcli.json`` (``BundleMeta``,
versioned), ``labels.txt`` and ``splits.json``, their schema checks, where a bundle may be
written and how it is swapped in atomically, the SavedModel writer and the check of a shared
SavedModel's graph. It does not know how a model is trained: the recipe builds the metadata."""

from tlcli.bundle.format import (
    FINGERPRINT_FILE,
    FORMAT_VERSION,
    LABELS_FILE,
    META_FILE,
    SIGNATURES,
    SPLITS_FILE,
    TASK_MULTI_LABEL,
    TASK_SINGLE_LABEL,
    TFLITE_FILE,
    BackboneMeta,
    Bundle,
    BundleMeta,
    DataMeta,
    MetricsMeta,
    TrainingMeta,
    check_version,
    input_spec,
    load,
    record_export,
    save,
    splits_text,
    tf_readable,
)
from tlcli.bundle.place import (
    check_free_space,
    check_output,
    check_place,
    check_replaceable,
    clean_stale,
    commit,
    foreign_entries,
    lock,
    parents_made,
    space_needed,
    staging_dir,
)
from tlcli.bundle.schema import read_regular

__all__ = ["FINGERPRINT_FILE", "FORMAT_VERSION", "LABELS_FILE", "META_FILE", "SIGNATURES", "SPLITS_FILE",
           "TASK_MULTI_LABEL", "TASK_SINGLE_LABEL", "TFLITE_FILE", "BackboneMeta", "Bundle", "BundleMeta", "DataMeta",
           "MetricsMeta", "TrainingMeta",
           "check_free_space", "check_output", "check_place", "check_replaceable", "check_version", "clean_stale",
           "commit", "foreign_entries", "input_spec", "load", "lock", "parents_made", "read_regular", "record_export",
           "save", "space_needed", "splits_text", "staging_dir", "tf_readable"]
