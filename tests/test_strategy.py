"""Distribution strategies, exercised on CPU with logical devices in a fresh process."""

import json
import subprocess
import sys
import textwrap


def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path, tiny_backbone, colour_data):
    out = tmp_path / "model"
    code = textwrap.dedent(f"""
        import json, os
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import tlcli
        r = tlcli.train({str(colour_data)!r}, out={str(out)!r}, backbone={str(tiny_backbone)!r}, image_size=32,
                        epochs=40, batch_size=4, learning_rate=0.05, strategy="mirrored", fine_tune=True,
                        fine_tune_epochs=1, cache_dir={str(tmp_path / "cache")!r}, tensorboard=None)
        # Head-only through LiteRT (it converts), then again with only that conversion cached: the
        # extraction ahead runs, and parity is measured beside it, in the mirrored strategy's scope.
        import shutil
        def lite(name):
            return tlcli.train({str(colour_data)!r}, out={str(tmp_path)!r} + "/" + name,
                               backbone={str(tiny_backbone)!r}, image_size=32, epochs=40, batch_size=4,
                               strategy="mirrored", extractor="litert",
                               cache_dir={str(tmp_path)!r} + "/cache-" + name, tensorboard=None)
        converted = lite("converted")
        shutil.copytree({str(tmp_path / "cache-converted" / "backbones")!r},
                        {str(tmp_path / "cache-again" / "backbones")!r})
        again = lite("again")
        print(json.dumps(dict(replicas=r.replicas, batch=r.global_batch_size, strategy=r.strategy,
                              val=r.val_accuracy, converted=converted.extractor,
                              again=[again.extractor, again.extracted, again.val_accuracy])))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["replicas"] == 2
    assert r["batch"] == 8  # 4 per replica x 2 replicas
    assert "MirroredStrategy" in r["strategy"] and "CPU:1" in r["strategy"]
    assert r["val"] >= 0.8
    assert (out / "saved_model.pb").exists()
    assert r["converted"] == "litert" and r["again"][:2] == ["litert", 24] and r["again"][2] >= 0.8


def test_auto_picks_default_strategy_on_a_single_cpu():
    from tlcli.training import strategy

    chosen = strategy.choose("auto")
    assert chosen.name == "default" and chosen.replicas == 1


def test_unknown_strategy_is_a_usage_error():
    import pytest

    from tlcli.errors import UsageError
    from tlcli.training import strategy

    with pytest.raises(UsageError, match="--strategy"):
        strategy.choose("warp")


# ---- an NVIDIA GPU that TensorFlow does not see (faked: no GPU is needed) ----------------------

def _fake_driver(root, model="NVIDIA H100 80GB HBM3"):
    gpu = root / "0000:01:00.0"
    gpu.mkdir(parents=True)
    (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 150\nBus Type: \t PCIe\n")
    return root


def test_an_nvidia_gpu_is_found_without_tensorflow(tmp_path, monkeypatch):
    from tlcli.training import strategy

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no nvidia-smi
    monkeypatch.setattr(strategy, "NVIDIA_GPUS", tmp_path / "none")
    assert strategy.nvidia_gpu() is None
    monkeypatch.setattr(strategy, "NVIDIA_GPUS", _fake_driver(tmp_path / "gpus"))
    assert strategy.nvidia_gpu() == "NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: nothing to say
    assert strategy.nvidia_gpu() is None


def test_nvidia_smi_finds_the_gpu_when_the_driver_has_no_proc_files(tmp_path, monkeypatch):
    from tlcli.training import strategy

    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 5090 (UUID: GPU-1234)'\n")
    smi.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(strategy, "NVIDIA_GPUS", tmp_path / "none")
    assert strategy.nvidia_gpu() == "NVIDIA GeForce RTX 5090"


def test_train_says_in_one_line_that_tensorflow_does_not_see_the_gpu(tmp_path, monkeypatch, train_args, colour_data):
    import tlcli
    from tlcli.progress import Warn
    from tlcli.training import strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(strategy, "NVIDIA_GPUS", _fake_driver(tmp_path / "gpus"))
    assert strategy.choose("auto").hint.startswith("NVIDIA H100 80GB HBM3 found, but TensorFlow does not see it")
    events = []
    tlcli.train(colour_data, out=str(tmp_path / "m"), **train_args, progress=events.append)
    [hint] = [e.message for e in events if isinstance(e, Warn) and "NVIDIA" in e.message]
    assert "\n" not in hint and "pip install 'tensorflow[and-cuda]'" in hint and "tensorflow#88122" in hint
    assert "training runs on the CPU" in hint
    monkeypatch.setattr(strategy, "NVIDIA_GPUS", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert strategy.choose("auto").hint is None  # no GPU here: nothing to say
