"""The check of a .tflite file before LiteRT runs it: every index the file's operators,
subgraphs, signatures and metadata name, and every tensor's shape, against the file itself.

LiteRT's verifier checks the flatbuffer's layout, not where its indices point: a CONV_2D whose
filter is tensor -1 (the mark of an omitted optional input) passes it, and XNNPACK then reads
outside the tensor table when the tensors are allocated (SIGSEGV: ``evaluate`` and ``serve``
died, and ``train`` with such a converted backbone in a shared ``--cache-dir``). Every engine
that opens a .tflite calls ``check`` first (``deploy.inference.TFLiteEngine``,
``model.litert.LiteRTBackbone``). It reads the file with the schema's Python reader, before
LiteRT sees it, so a file whose offsets point outside itself is refused too, in time bounded by
the file's size.
"""

from __future__ import annotations

import math

MAX_TENSOR_BYTES = 2 << 30    # one tensor at the file's shapes: the flatbuffer format's own limit
MAX_GRAPH_BYTES = 16 << 30    # all of a subgraph's tensors at the file's shapes

# Bytes per element of each TensorType (schema.TensorType). STRING, RESOURCE and VARIANT hold
# no fixed-size elements: 0. A type not listed is refused.
_ITEM_BYTES = {"FLOAT32": 4, "FLOAT16": 2, "INT32": 4, "UINT8": 1, "INT64": 8, "STRING": 0, "BOOL": 1,
               "INT16": 2, "COMPLEX64": 8, "INT8": 1, "FLOAT64": 8, "COMPLEX128": 16, "UINT64": 8, "RESOURCE": 0,
               "VARIANT": 0, "UINT32": 4, "UINT16": 2, "INT4": 1, "BFLOAT16": 2, "INT2": 1, "UINT4": 1,
               "FLOAT8_E4M3FN": 1, "FLOAT8_E5M2": 1}

# The inputs an operator may omit (tensor index -1): those TFLite's kernels read as optional.
# Anywhere else -1 is refused: a kernel or XNNPACK would read a tensor that is not there.
_LSTM = {1, 5, 9, 10, 11, 12, 16, 17, 20, 21, 22, 23}  # input gate, peepholes, projection, layer norm
_OPTIONAL = {
    "CONV_2D": {2}, "DEPTHWISE_CONV_2D": {2}, "FULLY_CONNECTED": {2}, "CONV_3D": {2}, "SVDF": {3},
    "TRANSPOSE_CONV": {3}, "CONV_3D_TRANSPOSE": {3}, "LSTM": _LSTM, "UNIDIRECTIONAL_SEQUENCE_LSTM": _LSTM,
    # forward 1-17 and backward 18-34 as in LSTM, then the optional auxiliary input and its weights
    "BIDIRECTIONAL_SEQUENCE_LSTM": {1, 5, 9, 10, 11, 12, 16, 17, 18, 22, 26, 27, 28, 29, 33, 34, *range(39, 48)},
}
# Options that name subgraphs: (the BuiltinOptions type's name, its accessors).
_SUBGRAPH_OPTIONS = {"WhileOptions": ("CondSubgraphIndex", "BodySubgraphIndex"),
                     "IfOptions": ("ThenSubgraphIndex", "ElseSubgraphIndex"),
                     "CallOnceOptions": ("InitSubgraphIndex",)}


def check(model: bytes) -> None:
    """Return if LiteRT may open ``model`` (the bytes of a .tflite file); raise ``ValueError``
    with a short reason otherwise. Checked: the file identifier; every operator's opcode index;
    its input tensor indices (-1 only where the operator's input is optional), output and
    intermediate indices; every subgraph's and signature's input and output indices; the
    subgraphs named by WHILE, IF and CALL_ONCE; every tensor's buffer index and element type;
    shapes without negative sizes, each tensor within ``MAX_TENSOR_BYTES`` and a subgraph's within
    ``MAX_GRAPH_BYTES``; the metadata's buffer indices."""
    if len(model) < 16 or model[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer")
    try:
        _check(model)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001  (offsets outside the file: the reader fails its own way)
        raise ValueError(f"not a readable TFLite flatbuffer ({type(exc).__name__})") from None


def _names(enum) -> dict[int, str]:
    return {v: k for k, v in vars(enum).items() if not k.startswith("_")}


class _Reader:
    """Counts and indices of one flatbuffer, each checked against what the file can hold."""

    def __init__(self, model: bytes):
        from ai_edge_litert import schema_py_generated as schema

        self.schema, self.limit = schema, len(model) // 4  # an entry of any vector takes >= 4 bytes
        self.model = schema.Model.GetRootAs(model, 0)
        self.buffers = self.count(self.model.BuffersLength(), "buffers")
        self.subgraphs = self.count(self.model.SubgraphsLength(), "subgraphs")
        ops, self.types, self.options = (_names(e) for e in (schema.BuiltinOperator, schema.TensorType,
                                                               schema.BuiltinOptions))
        self.ops = []
        for i in range(self.count(self.model.OperatorCodesLength(), "operator codes")):
            code = self.model.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            self.ops.append("CUSTOM" if code.CustomCode() else ops.get(builtin, f"builtin {builtin}"))

    def count(self, n: int, what: str) -> int:
        if not 0 <= n <= self.limit:
            raise ValueError(f"{n} {what}, more than the file can hold")
        return n

    def indices(self, table, field: str, what: str) -> list[int]:
        n = self.count(getattr(table, field + "Length")(), what)
        return [int(i) for i in getattr(table, field + "AsNumpy")()] if n else []


def _check(model: bytes) -> None:
    r = _Reader(model)
    if not r.subgraphs:
        raise ValueError("no subgraph")
    for k in range(r.count(r.model.MetadataLength(), "metadata entries")):
        if not 0 <= r.model.Metadata(k).Buffer() < r.buffers:
            raise ValueError(f"metadata entry {k} names buffer {r.model.Metadata(k).Buffer()} of {r.buffers}")
    for s in range(r.subgraphs):
        _check_subgraph(r, s)
    for k in range(r.count(r.model.SignatureDefsLength(), "signatures")):
        sig = r.model.SignatureDefs(k)
        if not 0 <= sig.SubgraphIndex() < r.subgraphs:
            raise ValueError(f"signature {k} names subgraph {sig.SubgraphIndex()} of {r.subgraphs}")
        tensors = r.count(r.model.Subgraphs(sig.SubgraphIndex()).TensorsLength(), "tensors")
        for side in ("Inputs", "Outputs"):
            for j in range(r.count(getattr(sig, side + "Length")(), "signature tensors")):
                t = getattr(sig, side)(j).TensorIndex()
                if not 0 <= t < tensors:
                    raise ValueError(f"signature {k}: {side.lower()[:-1]} {j} is tensor {t} of {tensors}")


def _check_subgraph(r: _Reader, s: int) -> None:
    g = r.model.Subgraphs(s)
    where = f"subgraph {s}" if r.subgraphs > 1 else "the graph"
    n = r.count(g.TensorsLength(), "tensors")
    total = 0
    for t in range(n):
        tensor = g.Tensors(t)
        if not 0 <= tensor.Buffer() < r.buffers:
            raise ValueError(f"{where}: tensor {t} names buffer {tensor.Buffer()} of {r.buffers}")
        item = _ITEM_BYTES.get(r.types.get(tensor.Type(), ""))
        if item is None:
            raise ValueError(f"{where}: tensor {t} has an unknown element type ({tensor.Type()})")
        shape = r.indices(tensor, "Shape", "dimensions")
        if any(d < 0 for d in shape):
            raise ValueError(f"{where}: tensor {t} has the shape {shape}")
        size = math.prod(shape) * item
        if size > MAX_TENSOR_BYTES:
            raise ValueError(f"{where}: tensor {t} would take {size} bytes")
        total += size
    if total > MAX_GRAPH_BYTES:
        raise ValueError(f"{where}: its tensors would take {total} bytes")
    for side in ("Inputs", "Outputs"):
        bad = [i for i in r.indices(g, side, "tensor indices") if not 0 <= i < n]
        if bad:
            raise ValueError(f"{where}: its {side.lower()} include tensor {bad[0]}, not one of its {n} tensors")
    for o in range(r.count(g.OperatorsLength(), "operators")):
        _check_operator(r, g.Operators(o), f"{where}: operator {o}", n)


def _check_operator(r: _Reader, op, where: str, n: int) -> None:
    code = op.OpcodeIndex()
    if not 0 <= code < len(r.ops):
        raise ValueError(f"{where} names operator code {code} of {len(r.ops)}")
    name, optional = r.ops[code], _OPTIONAL.get(r.ops[code], set())
    where = f"{where} ({name})"
    for pos, t in enumerate(r.indices(op, "Inputs", "inputs")):
        if not (0 <= t < n or (t == -1 and pos in optional)):
            why = "which it needs" if t == -1 else f"not one of the {n} tensors"
            raise ValueError(f"{where}: input {pos} is tensor {t}, {why}")
    for side in ("Outputs", "Intermediates"):
        for pos, t in enumerate(r.indices(op, side, side.lower())):
            if not 0 <= t < n:
                raise ValueError(f"{where}: {side.lower()[:-1]} {pos} is tensor {t}, not one of the {n} tensors")
    kind = r.options.get(op.BuiltinOptionsType())
    if kind in _SUBGRAPH_OPTIONS and op.BuiltinOptions() is not None:
        options = getattr(r.schema, kind)()
        table = op.BuiltinOptions()
        options.Init(table.Bytes, table.Pos)
        for field in _SUBGRAPH_OPTIONS[kind]:
            if not 0 <= getattr(options, field)() < r.subgraphs:
                raise ValueError(f"{where} names subgraph {getattr(options, field)()} of {r.subgraphs}")
