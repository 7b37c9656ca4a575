"""Crafted .tflite files: every index and shape is checked before LiteRT opens the file. A CONV_2D
whose filter is tensor -1 passed LiteRT's verifier and then crashed the process (SIGSEGV) in
evaluate, serve and train (a crafted converted backbone in the cache): the commands run in
child processes here, so that a crash shows as one failed test."""

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tlcli.model import tflite_check

CLI = "import sys; from tlcli.cli import run; sys.argv[0] = 'tlcli'; run()"


@pytest.fixture(scope="module")
def exported(trained_bundle, tmp_path_factory):
    """A copy of the trained bundle with its model.tflite, and that file's bytes."""
    import tlcli

    path = tmp_path_factory.mktemp("crafted") / "model"
    shutil.copytree(trained_bundle, path)
    tlcli.export_tflite(path)
    return path, (path / "model.tflite").read_bytes()


def _crafted(flat: bytes, change) -> bytes:
    """``flat`` with ``change(model, op)`` applied to its object form; ``op(name)`` is the first
    operator of that builtin type."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = copy.deepcopy(flatbuffer_utils.convert_bytearray_to_object(bytearray(flat)))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.subgraphs[0]

    def op(name):
        return next(o for o in graph.operators
                    if names[max(model.operatorCodes[o.opcodeIndex].builtinCode,
                                 model.operatorCodes[o.opcodeIndex].deprecatedBuiltinCode)] == name)

    change(model, op)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _set(seq, i, value):
    seq[i] = value


def _io(op_name, side, pos, value):
    """A change: input or output ``pos`` of the first ``op_name`` operator becomes tensor ``value``."""
    return lambda m, op: _set(getattr(op(op_name), side), pos, value)


def _conv_tensor(which, field, value):
    """A change: ``field`` of the CONV_2D's filter (``which`` 1) or output (-1) tensor becomes ``value``."""
    def change(m, op):
        conv = op("CONV_2D")
        setattr(m.subgraphs[0].tensors[conv.inputs[which] if which >= 0 else conv.outputs[0]], field, value)
    return change


VARIANTS = {
    "conv filter -1": (_io("CONV_2D", "inputs", 1, -1), r"operator \d+ \(CONV_2D\): input 1 is tensor -1, which it"),
    "conv input -1": (_io("CONV_2D", "inputs", 0, -1), r"\(CONV_2D\): input 0 is tensor -1, which it needs"),
    "dense weights -1": (_io("FULLY_CONNECTED", "inputs", 1, -1), r"\(FULLY_CONNECTED\): input 1 is tensor -1"),
    "softmax input -1": (_io("SOFTMAX", "inputs", 0, -1), r"\(SOFTMAX\): input 0 is tensor -1"),
    "conv filter 999": (_io("CONV_2D", "inputs", 1, 999), r"\(CONV_2D\): input 1 is tensor 999, not one of"),
    "conv output -1": (_io("CONV_2D", "outputs", 0, -1), r"\(CONV_2D\): output 0 is tensor -1"),
    "conv output 999": (_io("CONV_2D", "outputs", 0, 999), r"output 0 is tensor 999"),
    "opcode 99": (lambda m, op: setattr(op("CONV_2D"), "opcodeIndex", 99), r"names operator code 99 of"),
    "buffer 999": (_conv_tensor(1, "buffer", 999), r"tensor \d+ names buffer 999 of"),
    "graph input -1": (lambda m, op: _set(m.subgraphs[0].inputs, 0, -1), r"its inputs include tensor -1"),
    "graph output 999": (lambda m, op: _set(m.subgraphs[0].outputs, 0, 999), r"its outputs include tensor 999"),
    "negative shape": (_conv_tensor(-1, "shape", np.array([1, -32, 32, 8], np.int32)),
                       r"has the shape \[1, -32, 32, 8\]"),
    "huge shape": (_conv_tensor(-1, "shape", np.array([1, 100000, 100000, 8], np.int32)),
                   r"would take 320000000000 bytes"),
    "unknown type": (_conv_tensor(1, "type", 99), r"unknown element type \(99\)"),
    "metadata buffer": (lambda m, op: setattr(m.metadata[0], "buffer", 999), r"metadata entry 0 names buffer 999"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_check_refuses_each_crafted_index_and_shape(exported, name):
    change, why = VARIANTS[name]
    with pytest.raises(ValueError, match=why):
        tflite_check.check(_crafted(exported[1], change))


def test_the_check_passes_real_files_and_refuses_what_is_not_one(exported):
    tflite_check.check(exported[1])
    tflite_check.check(_crafted(exported[1], _io("CONV_2D", "inputs", 2, -1)))  # the bias: optional
    for junk in (b"", b"x" * 64, exported[1][:200], exported[1][:8] + b"\xff" * 400):
        with pytest.raises(ValueError):
            tflite_check.check(junk)


def _run(*args, timeout=120):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("command", ["predict", "evaluate", "serve"])
def test_a_crafted_model_tflite_is_one_line_in_every_command_that_runs_it(exported, colour_data, tmp_path, command):
    bundle = tmp_path / "model"
    shutil.copytree(exported[0], bundle)
    (bundle / "model.tflite").write_bytes(_crafted(exported[1], VARIANTS["conv filter -1"][0]))
    args = {"predict": ["predict", "--model", bundle, "--engine", "tflite", colour_data / "red" / "red_1.png"],
            "evaluate": ["evaluate", colour_data, "--model", bundle, "--engine", "tflite"],
            "serve": ["serve", "--model", bundle, "--engine", "tflite", "--port", "0"]}[command]
    p = _run(*args)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"error: {bundle / 'model.tflite'}: cannot load the TFLite model (the graph: operator")
    assert "input 1 is tensor -1, which it needs); re-export it" in " ".join(p.stderr.split())


def test_a_crafted_converted_backbone_in_the_cache_is_converted_again(tiny_backbone, colour_data, tmp_path):
    import tlcli

    cache = tmp_path / "cache"
    first = tlcli.train(colour_data, out=str(tmp_path / "first"), backbone=str(tiny_backbone), image_size=32,
                        epochs=40, batch_size=4, extractor="litert", cache_dir=str(cache), tensorboard=None)
    [cached] = (cache / "backbones").glob("*.tflite")
    assert first.extractor == "litert"
    crafted = _crafted(cached.read_bytes(), VARIANTS["conv filter -1"][0])
    cached.write_bytes(crafted)
    shutil.rmtree(cache / "features", ignore_errors=True)  # so that the backbone runs again
    p = _run("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--epochs", 40, "--batch-size",
             4, "--extractor", "litert", "--cache-dir", cache, "--out", tmp_path / "second", "--tensorboard", "none",
             "--json", timeout=240)
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    import json

    assert json.loads(p.stdout)["extractor"] == "litert"
    assert cached.read_bytes() != crafted
    tflite_check.check(cached.read_bytes())  # replaced by a sound conversion
