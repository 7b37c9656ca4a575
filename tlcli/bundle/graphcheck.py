"""What a bundle's SavedModel may run: an allowlist of TensorFlow ops, checked on the proto
before TensorFlow loads or converts it.

A SavedModel is a program. ``tf.saved_model.load`` runs some of it (resource initializers), and
calling a signature runs the rest, so a crafted bundle could read, write or execute anything
TensorFlow can (``ReadFile``, ``WriteFile``, ``PyFunc``, ``PrintV2`` to a file, ...). Before
``TFEngine`` loads a bundle or export converts it, ``check_saved_model`` parses
``saved_model.pb`` itself (a regular file, size-bounded) and walks every op the loaded model
could run: the graph nodes that feed each signature, every function the object graph exposes
(signatures, ``tf.function`` methods, resource initializers, saveable restore functions), and,
recursively, every function those call through a function-valued attribute (``f`` of
``PartitionedCall``, branches of ``If`` / ``Case``, ``cond`` / ``body`` of ``While`` ...).
Every op found must be in ``ALLOWED_OPS``: what a tlcli classifier (an image backbone such as
TF Hub's MobileNets, EfficientNets, Inception or ResNet, the Keras head and mirror average) and
the ``serving_bytes`` decoder (``tlcli.bundle.savedmodel.decode_image_bytes``, ``map_fn``) use. Pure tensor
computation only: no op that touches files, the network, processes or Python.

The checkpoint functions that only ``saver_def`` reaches (``SaveV2``, ``RestoreV2``,
``MergeV2Checkpoints`` ...) are not walked: TensorFlow 2 restores variables with ops it builds
itself, never by running the bundle's saver graph.

This module imports TensorFlow only inside ``parse``: the TFLite path never needs it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tlcli.errors import BundleError

SAVED_MODEL_FILE = "saved_model.pb"
MAX_SAVED_MODEL_BYTES = 1 << 30  # protobuf's own limit is 2 GiB; a backbone's graph is a few MB

_CALLS = {  # function calls and control flow (their functions are walked too)
    "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf", "Case", "StatelessCase",
    "While", "StatelessWhile", "NoOp", "Identity", "IdentityN", "Placeholder", "PlaceholderWithDefault",
    "Const", "Assert", "StopGradient", "PreventGradient", "CheckNumerics", "EnsureShape",
    # TF1 control flow, for backbones exported from TF1 graphs
    "Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond", "ControlTrigger", "RefIdentity",
}
_VARIABLES = {  # in-memory variables only (the checkpoint is read by TensorFlow's own ops)
    "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    "VarIsInitializedOp", "DestroyResourceOp", "DisableCopyOnRead", "ResourceGather",
}
_PLUMBING = {  # shapes, slicing, joining, casting
    "Shape", "ShapeN", "Size", "Rank", "Reshape", "Squeeze", "ExpandDims", "Transpose", "ConjugateTranspose",
    "ReverseV2", "StridedSlice", "StridedSliceGrad", "Slice", "Pack", "Unpack", "ConcatV2", "Concat",
    "ConcatOffset", "Split", "SplitV", "Tile", "Fill", "ZerosLike", "OnesLike", "Range", "Cast", "Bitcast",
    "GatherV2", "GatherNd", "Gather", "ScatterNd", "TensorScatterUpdate", "Where", "Select", "SelectV2",
    "Pad", "PadV2", "MirrorPad", "BroadcastTo", "BroadcastArgs", "BroadcastGradientArgs", "OneHot",
    "DepthToSpace", "SpaceToDepth", "SpaceToBatchND", "BatchToSpaceND", "Roll", "ReverseSequence",
    "Cumsum", "Cumprod", "TopKV2", "ArgMax", "ArgMin", "Unique", "DenseBincount", "Bincount",
    "InvertPermutation", "MatrixBandPart", "MatrixDiag", "MatrixDiagV3", "MatrixDiagPartV3",
}
_MATH = {
    "Add", "AddV2", "AddN", "Sub", "Mul", "MulNoNan", "Div", "DivNoNan", "RealDiv", "FloorDiv", "FloorMod",
    "TruncateDiv", "Mod", "Neg", "Abs", "Sign", "Square", "Sqrt", "Rsqrt", "Reciprocal", "Inv", "Pow",
    "Exp", "Expm1", "Log", "Log1p", "Floor", "Ceil", "Round", "Rint", "Maximum", "Minimum",
    "SquaredDifference", "ClipByValue", "Erf", "Erfc", "Tanh", "Sigmoid", "Sin", "Cos", "Atan2",
    "Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm",
    "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Tensordot",
    "Equal", "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr",
    "LogicalNot", "IsNan", "IsInf", "IsFinite", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "LeftShift",
    "RightShift", "FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxArgs",
}
_NN = {
    "Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "BiasAdd", "Relu", "Relu6",
    "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Softmax", "LogSoftmax", "MaxPool", "MaxPoolV2",
    "AvgPool", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "LRN", "L2Loss", "Dilation2D",
    "_FusedConv2D", "_FusedMatMul", "_FusedBatchNormEx", "_FusedDepthwiseConv2dNative",
    "StatelessRandomUniformV2", "StatelessRandomNormalV2", "StatelessRandomGetKeyCounter",
    "StatelessRandomUniform", "StatelessRandomNormal",
}
_DECODE = {  # the serving_bytes decoder: encoded image strings -> pixels, in memory
    "DecodeJpeg", "DecodePng", "DecodeImage", "DecodeGif", "DecodeBmp", "DecodeWebP", "DecodeRaw",
    "ExtractJpegShape", "ScaleAndTranslate", "ResizeBilinear", "ResizeArea", "ResizeBicubic",
    "ResizeNearestNeighbor", "CropAndResize", "AdjustContrastv2", "RGBToHSV", "HSVToRGB",
    "Substr", "StringSplit", "StringSplitV2", "StringLength", "StringJoin", "StaticRegexFullMatch",
    "StringToNumber", "AsString",
    # tf.map_fn over the batch of strings
    "TensorListReserve", "TensorListFromTensor", "TensorListGetItem", "TensorListSetItem",
    "TensorListStack", "TensorListLength", "TensorListElementShape", "TensorListPushBack",
    "TensorListPopBack", "EmptyTensorList", "TensorListConcatV2", "TensorListSplit",
}
ALLOWED_OPS = frozenset(_CALLS | _VARIABLES | _PLUMBING | _MATH | _NN | _DECODE)


def parse(model_dir: str | os.PathLike):
    """``model_dir/saved_model.pb`` as a ``SavedModel`` proto, read as a regular file of at most
    ``MAX_SAVED_MODEL_BYTES``. Raises ``BundleError`` (missing, not a regular file, too large,
    not a SavedModel)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from tlcli.bundle.schema import read_regular

    path = Path(model_dir) / SAVED_MODEL_FILE
    raw = read_regular(path, MAX_SAVED_MODEL_BYTES)
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError and its C++ twin
        raise BundleError(f"{path}: the SavedModel cannot be loaded (not a SavedModel: {type(exc).__name__}); "
                          "the bundle is corrupt; retrain it") from None
    if not proto.meta_graphs:
        raise BundleError(f"{path}: the SavedModel cannot be loaded (it holds no graph); the bundle is "
                          "corrupt; retrain it")
    return proto


def _tensor_names(info) -> list[str]:
    """The graph tensor names behind a signature's ``TensorInfo`` (dense, sparse or composite)."""
    kind = info.WhichOneof("encoding")
    if kind == "name":
        return [info.name]
    if kind == "coo_sparse":
        s = info.coo_sparse
        return [s.values_tensor_name, s.indices_tensor_name, s.dense_shape_tensor_name]
    if kind == "composite_tensor":
        return [n for c in info.composite_tensor.components for n in _tensor_names(c)]
    return []


def _called(attrs) -> list[str]:
    """Function names in a node's attributes (``func`` and ``list(func)`` values, nested too)."""
    names = []
    for value in attrs.values():
        funcs = [value.func] if value.HasField("func") else list(value.list.func)
        for f in funcs:
            names.append(f.name)
            names += _called(f.attr)
    return names


def _roots(meta_graph) -> tuple[list[str], list[str]]:
    """(graph nodes, functions) where what the loaded model can run starts."""
    nodes = [name.lstrip("^").split(":")[0] for sig in meta_graph.signature_def.values()
             for info in (*sig.inputs.values(), *sig.outputs.values()) for name in _tensor_names(info)]
    objects = meta_graph.object_graph_def
    functions = list(objects.concrete_functions)
    for obj in objects.nodes:
        kind = obj.WhichOneof("kind")
        if kind == "function":
            functions += list(obj.function.concrete_functions)
        elif kind == "bare_concrete_function":
            functions.append(obj.bare_concrete_function.concrete_function_name)
    return nodes, functions


def reachable_ops(meta_graph) -> dict[str, str]:
    """Every op the loaded ``meta_graph`` can run, each with one place it was found (a function
    name, or "graph"). Walks the graph nodes that feed the signatures and, recursively, every
    function reachable from them and from the object graph. A called name that is not in the
    function library is reported as an op (TensorFlow runs a primitive op by that name)."""
    graph = meta_graph.graph_def
    by_name = {n.name: n for n in graph.node}
    library = {f.signature.name: f for f in graph.library.function}
    ops: dict[str, str] = {}
    pending_nodes, pending_functions = _roots(meta_graph)
    seen_nodes: set[str] = set()
    seen_functions: set[str] = set()
    while pending_nodes or pending_functions:
        if pending_nodes:
            name = pending_nodes.pop()
            if name in seen_nodes or name not in by_name:
                continue
            seen_nodes.add(name)
            node = by_name[name]
            ops.setdefault(node.op, "graph")
            pending_nodes += [i.lstrip("^").split(":")[0] for i in node.input]
            pending_functions += _called(node.attr)
            continue
        fname = pending_functions.pop()
        if fname in seen_functions:
            continue
        seen_functions.add(fname)
        if fname not in library:
            ops.setdefault(fname, "a call")
            continue
        for node in library[fname].node_def:
            ops.setdefault(node.op, fname)
            pending_functions += _called(node.attr)
    return ops


def check_saved_model(model_dir: str | os.PathLike) -> None:
    """Refuse, before TensorFlow loads or converts it, a SavedModel that could run an op outside
    ``ALLOWED_OPS`` (see the module docstring), or that TensorFlow would load as a TF1 model
    (which runs its init ops). Also refuses a non-regular file under ``variables/``, which would
    hang the restore. Raises ``BundleError`` naming the ops; returns the parsed proto."""
    path = Path(model_dir) / SAVED_MODEL_FILE
    proto = parse(model_dir)
    for meta_graph in proto.meta_graphs:
        if not meta_graph.object_graph_def.nodes:
            raise BundleError(f"{path}: a TF1-style SavedModel (no object graph), which tlcli never writes; "
                              "refused because loading it runs its init ops; retrain with 'tlcli train'")
        bad = {op: where for op, where in reachable_ops(meta_graph).items() if op not in ALLOWED_OPS}
        if bad:
            named = ", ".join(f"{op} (in {where})" for op, where in sorted(bad.items())[:6])
            more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
            raise BundleError(f"{path}: refused: the model can run TensorFlow ops that an image classifier "
                              f"never needs, such as file, system or Python access: {named}{more}; "
                              "use only bundles you trust, or retrain it with 'tlcli train'")
    _check_variables(Path(model_dir))
    return proto


def _dims(info) -> list[int] | None:
    shape = info.tensor_shape
    return None if shape.unknown_rank else [d.size for d in shape.dim]


def check_signature(proto, bundle) -> None:
    """Refuse a SavedModel whose ``serving_default`` is not images [batch, S, S, 3] ->
    probabilities [batch, N] with the S and N of ``bundle`` (its tlcli.json), or whose ``tlcli``
    signature (images -> probabilities, unknown_score [batch]) is not, or is missing while
    tlcli.json records an ``unknown`` detector. Raises ``BundleError``."""
    path = Path(bundle.path) / SAVED_MODEL_FILE
    sig = next((mg.signature_def["serving_default"] for mg in proto.meta_graphs
                if "serving_default" in mg.signature_def), None)
    if sig is None or "images" not in sig.inputs or "probabilities" not in sig.outputs:
        raise BundleError(f"{path}: has no serving_default signature taking \"images\" and giving "
                          "\"probabilities\"; it was not written by 'tlcli train'; retrain it")
    images, probs = _dims(sig.inputs["images"]), _dims(sig.outputs["probabilities"])
    size = bundle.image_size
    fits = (images is None or (len(images) == 4 and images[1] in (-1, size) and images[2] in (-1, size))) and \
        (probs is None or (len(probs) == 2 and probs[1] in (-1, len(bundle.labels))))
    if not fits:
        raise BundleError(f"{path}: serving_default takes images {images} and gives probabilities {probs}, "
                          f"but {bundle.path / 'tlcli.json'} says {size}x{size} images and {len(bundle.labels)} "
                          "labels; the bundle is inconsistent; retrain it or restore the files")
    _check_engine_signature(proto, bundle, path)
    embedded = _string_constants(proto)
    if embedded and list(bundle.labels) not in embedded:
        raise BundleError(f"{path}: the labels stored in the SavedModel (for serving_bytes) differ from the "
                          f"{len(bundle.labels)} labels in {bundle.path / 'tlcli.json'} (other names or another "
                          "order), so predictions would be named wrongly; the bundle is inconsistent; retrain it "
                          "or restore the files")


def _check_engine_signature(proto, bundle, path: Path) -> None:
    """A ``tlcli`` signature (a bundle with an unknown detector) must take the images
    ``serving_default`` takes and give ``probabilities`` [batch, N] and ``unknown_score``
    [batch]; tlcli.json's ``unknown`` needs one. Raises ``BundleError``."""
    sig = next((mg.signature_def["tlcli"] for mg in proto.meta_graphs if "tlcli" in mg.signature_def), None)
    fix = "the bundle is inconsistent; retrain it or restore the files"
    if sig is None:
        if getattr(bundle.meta, "unknown", None) is not None:
            raise BundleError(f"{path}: has no \"tlcli\" signature, but {bundle.path / 'tlcli.json'} records an "
                              f"\"unknown\" detector; {fix}")
        return
    if set(sig.inputs) != {"images"} or set(sig.outputs) != {"probabilities", "unknown_score"}:
        raise BundleError(f"{path}: its \"tlcli\" signature does not take \"images\" and give \"probabilities\" "
                          f"and \"unknown_score\"; {fix}")
    images, probs, score = (_dims(x) for x in (sig.inputs["images"], sig.outputs["probabilities"],
                                               sig.outputs["unknown_score"]))
    size, n = bundle.image_size, len(bundle.labels)
    fits = (images is None or (len(images) == 4 and images[1] in (-1, size) and images[2] in (-1, size))) and \
        (probs is None or (len(probs) == 2 and probs[1] in (-1, n))) and (score is None or len(score) == 1)
    if not fits:
        raise BundleError(f"{path}: its \"tlcli\" signature takes images {images} and gives probabilities {probs} "
                          f"and unknown_score {score}, but {bundle.path / 'tlcli.json'} says {size}x{size} images "
                          f"and {n} labels (and one score an image); {fix}")


def _string_constants(proto) -> list[list[str]]:
    """The 1-D string constants the object graph holds (``serving_module``'s labels among them;
    none in a bundle made before serving_bytes), decoded; undecodable ones are left out."""
    found = []
    for meta_graph in proto.meta_graphs:
        by_name = {n.name: n for n in meta_graph.graph_def.node}
        for obj in meta_graph.object_graph_def.nodes:
            node = by_name.get(obj.constant.operation) if obj.WhichOneof("kind") == "constant" else None
            tensor = node.attr["value"].tensor if node is not None and node.op == "Const" else None
            if tensor is not None and tensor.dtype == 7 and len(tensor.tensor_shape.dim) == 1:  # DT_STRING
                try:
                    found.append([v.decode("utf-8") for v in tensor.string_val])
                except UnicodeDecodeError:
                    continue
    return found


def _check_variables(model_dir: Path) -> None:
    fingerprint = model_dir / "fingerprint.pb"  # TensorFlow's loader reads it too: a FIFO would hang it
    if os.path.lexists(fingerprint):
        try:
            mode = fingerprint.stat().st_mode
        except OSError as exc:
            raise BundleError(f"{fingerprint}: cannot read it ({exc.strerror}); the bundle is damaged; "
                              "retrain it") from None
        if not stat.S_ISREG(mode):
            raise BundleError(f"{fingerprint}: not a regular file; the bundle is damaged or crafted; retrain it")
    variables = model_dir / "variables"
    if not variables.is_dir():
        return
    for entry in variables.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError as exc:
            raise BundleError(f"{entry}: cannot read it ({exc.strerror}); the bundle is damaged; retrain it") from None
        if not stat.S_ISREG(mode):
            raise BundleError(f"{entry}: not a regular file; the bundle is damaged or crafted; retrain it")
