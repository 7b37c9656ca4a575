"""Where training, evaluate and export write, and what survives a fault: --force replaces only a
tlcli bundle, outputs never overlap the images, export never overwrites the bundle's files,
--resume trains the same images into the --out given, one run at a time, one-line errors for a
full disk or a damaged checkpoint, and a run whose bundle is in place has succeeded."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

import tlcli
from tests.helpers import make_colour_dataset, run_cli
from tlcli import bundle
from tlcli.config import TrainConfig
from tlcli.errors import Interrupted, TlcliError, UsageError


@pytest.fixture
def dataset(tmp_path):
    return make_colour_dataset(tmp_path / "images", per_class=6)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(parent: Path, name: str = "model") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# -- item 1: --force replaces only a tlcli bundle ------------------------------------------------

@pytest.mark.parametrize("case", ["no-metadata", "foreign-file", "foreign-in-variables", "symlink-inside"])
def test_force_does_not_replace_a_folder_that_is_not_a_bundle(tmp_path, bundle_copy, dataset, train_args, case):
    if case == "no-metadata":
        target = tmp_path / "notes"
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
    else:
        target = bundle_copy
        if case == "foreign-file":
            (target / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
        elif case == "foreign-in-variables":
            (target / "variables" / "notes.txt").write_text("mine")
        else:
            os.symlink(dataset, target / "images")
    before = snapshot(target)
    with pytest.raises(TlcliError, match=r"--out .*--force will not replace it"):
        tlcli.train(dataset, out=str(target), force=True, **train_args)
    assert snapshot(target) == before


def test_a_bundle_with_exports_and_logs_counts_as_a_bundle(bundle_copy):
    (bundle_copy / "model.tflite").write_bytes(b"x")
    (bundle_copy / "small.tflite").write_bytes(b"x")
    (bundle_copy / "small.labels.txt").write_text("a\n")
    (bundle_copy / "logs" / "fine-tune").mkdir(parents=True)
    (bundle_copy / "logs" / "fine-tune" / "events.out.tfevents.1.host.2.v2").write_bytes(b"x")
    (bundle_copy / ".tlcli.json.0123abcd.tmp").write_text("{")
    assert bundle.foreign_entries(bundle_copy) == []
    (bundle_copy / "logs" / "readme.md").write_text("mine")
    assert bundle.foreign_entries(bundle_copy) == ["logs/readme.md"]


@pytest.mark.parametrize("where", ["is-dir", "inside-dir", "contains-dir", "is-val-dir", "via-symlink"])
def test_out_overlapping_the_images_is_refused(tmp_path, dataset, train_args, where):
    val = make_colour_dataset(tmp_path / "val", per_class=2)
    (tmp_path / "link").symlink_to(dataset)
    out = {"is-dir": dataset, "inside-dir": dataset / "red" / "model", "contains-dir": tmp_path,
           "is-val-dir": val, "via-symlink": tmp_path / "link" / "model"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(TlcliError, match=r"--out .*the image folder (DIR|--val-dir)") as err:
        tlcli.train(dataset, out=str(out), force=True, val_dir=str(val), **train_args)
    assert err.value.exit_code == 1  # as every other --out error
    assert snapshot(tmp_path) == before


def test_out_inside_the_images_exits_1_in_one_line_like_the_other_out_errors(dataset, tiny_backbone):
    result = run_cli("train", dataset, "--backbone", tiny_backbone, "--out", dataset / "red" / "new" / "model")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == f"error: --out {dataset / 'red' / 'new' / 'model'}: lies inside the image " \
                                    f"folder DIR {dataset}; choose another --out, outside the image folders"
    assert not (dataset / "red" / "new").exists()


def test_out_in_folders_that_do_not_exist_creates_them_as_mkdir_p(tmp_path, dataset, train_args):
    out = tmp_path / "runs" / "exp1" / "model"
    result = tlcli.train(dataset, out=str(out), **train_args)
    assert result.model_dir == str(out) and (out / "tlcli.json").is_file()


def test_a_run_that_ends_before_its_bundle_removes_the_folders_it_made(tmp_path, dataset, train_args):
    def stop_at_scan(event):
        if event.kind == "start":
            raise KeyboardInterrupt

    (tmp_path / "runs").mkdir()
    with pytest.raises(Interrupted):
        tlcli.train(dataset, out=str(tmp_path / "runs" / "exp1" / "deeper" / "model"), progress=stop_at_scan,
                    **train_args)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == []  # runs/ was there before: kept
    (tmp_path / "file").write_text("x")
    with pytest.raises(TlcliError, match=r"--out .*file/sub/model: cannot create its folder .*file/sub"):
        tlcli.train(dataset, out=str(tmp_path / "file" / "sub" / "model"), **train_args)


@pytest.mark.parametrize("which", ["root", "home", "cwd"])
def test_root_home_and_current_folder_are_refused_as_out(tmp_path, dataset, train_args, monkeypatch, which):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    out = {"root": "/", "home": str(home), "cwd": "."}[which]
    with pytest.raises(TlcliError, match=r"--out .*: is the (root|home|current) folder"):
        tlcli.train(dataset, out=out, force=True, **train_args)


def test_out_root_with_force_on_the_command_line_is_one_line(dataset, tiny_backbone):
    result = run_cli("train", dataset, "--backbone", tiny_backbone, "--out", "/", "--force")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "--out /" in result.output


@pytest.mark.parametrize("where", ["inside", "contains"])
def test_evaluate_report_overlapping_the_images_is_refused(trained_bundle, colour_data, where):
    report = colour_data / "red" / "report" if where == "inside" else colour_data.parent
    with pytest.raises(UsageError, match=r"--report .*the image folder DIR"):
        tlcli.evaluate(colour_data, model_dir=trained_bundle, report_dir=report)
    assert not (colour_data / "red" / "report").exists()


def test_absolute_tensorboard_inside_the_images_is_refused(dataset, tmp_path, train_args):
    options = dict(train_args, tensorboard=str(dataset / "green" / "logs"))
    with pytest.raises(UsageError, match=r"--tensorboard .*the image folder DIR"):
        tlcli.train(dataset, out=str(tmp_path / "model"), **options)
    assert not (dataset / "green" / "logs").exists()


def test_unwritable_absolute_tensorboard_is_refused_before_any_work(dataset, tmp_path, train_args):
    (tmp_path / "a-file").write_text("x")
    events = []
    options = dict(train_args, tensorboard=str(tmp_path / "a-file" / "logs"))
    with pytest.raises(UsageError, match=r"--tensorboard .*a-file.*--tensorboard none"):
        tlcli.train(dataset, out=str(tmp_path / "model"), progress=events.append, **options)
    assert not [e for e in events if e.kind == "start"], "refused only after work began"


# -- item 2: export --output ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["saved_model.pb", "labels.txt", "tlcli.json", "variables/variables.index",
                                  "variables/model.tflite"])
def test_export_refuses_to_overwrite_the_bundles_own_files(bundle_copy, name):
    from tlcli.deploy.export import export_tflite

    before = snapshot(bundle_copy)
    with pytest.raises(UsageError, match=r"--output .*is a file of the model"):
        export_tflite(bundle_copy, output=bundle_copy / name)
    assert snapshot(bundle_copy) == before


def test_export_refuses_an_existing_file_that_is_not_tflite(bundle_copy, tmp_path, colour_data):
    from tlcli.deploy.export import export_tflite

    image = tmp_path / "photo.jpg"
    shutil.copy(colour_data / "red" / "red_0.jpg", image)
    disguised = tmp_path / "labels.tflite"
    disguised.symlink_to(bundle_copy / "labels.txt")
    before = image.read_bytes(), snapshot(bundle_copy)
    with pytest.raises(UsageError, match=r"--output .*photo.jpg: already exists and is not a .tflite"):
        export_tflite(bundle_copy, output=image)
    with pytest.raises(UsageError, match=r"--output .*labels.tflite"):
        export_tflite(bundle_copy, output=disguised)
    assert (image.read_bytes(), snapshot(bundle_copy)) == before


def test_export_output_bundle_file_on_the_command_line_is_one_line(bundle_copy):
    result = run_cli("export", "--tflite", "--model", bundle_copy, "--output", bundle_copy / "labels.txt")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "--output" in result.output


# -- item 13: --resume ---------------------------------------------------------------------------

def write_state(model: Path, **config) -> None:
    """The resume state an interrupted run into ``model`` would leave, with ``config``."""
    partial = model.parent / f".{model.name}.partial"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"config": TrainConfig(**config).to_dict(), "history": {}}))


def test_resume_from_another_folder_trains_the_same_images_into_the_out_given(tmp_path, train_args, monkeypatch):
    first = tmp_path / "first"
    make_colour_dataset(first / "images", per_class=4)
    monkeypatch.chdir(first)

    def stop_at_save(event):
        if event.kind == "start" and event.task == "save":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="--resume"):
        tlcli.train("images", out="model", progress=stop_at_save, **train_args)
    saved = json.loads((first / ".model.partial" / "state.json").read_text())["config"]
    assert saved["data_dir"] == str(first / "images") and saved["out"] == str(first / "model")
    assert saved["backbone"] == str(train_args["backbone"])

    elsewhere = tmp_path / "elsewhere"
    make_colour_dataset(elsewhere / "images", per_class=4, colours={"cyan": (0, 200, 200), "grey": (90, 90, 90)})
    monkeypatch.chdir(elsewhere)
    result = tlcli.train(out=str(first / "model"), resume=True)
    assert result.labels == ["blue", "green", "red"]
    assert result.model_dir == str(first / "model") and not (elsewhere / "model").exists()
    assert json.loads((first / "model" / "tlcli.json").read_text())["data"]["train_dir"] == str(first / "images")


def test_resume_names_each_setting_the_command_changes(tmp_path, dataset, train_args):
    out = tmp_path / "model"
    write_state(out, data_dir=str(dataset), out=str(out), **train_args)
    other = make_colour_dataset(tmp_path / "other", per_class=2)
    with pytest.raises(UsageError, match=r"--resume: .*keeps the settings.*DIR .*other.*--epochs \(that run: 60, "
                                         r"this command: 5\)"):
        tlcli.train(other, out=str(out), resume=True, epochs=5)


def test_resume_on_the_command_line_refuses_an_explicit_default_that_differs(tmp_path, dataset, train_args):
    out = tmp_path / "model"
    write_state(out, data_dir=str(dataset), out=str(out), **train_args)  # epochs=60, the default is 300
    result = run_cli("train", "--out", out, "--resume", "--epochs", TrainConfig().epochs)
    assert result.exit_code == 2, result.output
    assert "--epochs (that run: 60" in result.output and "Traceback" not in result.output


def test_resume_with_a_damaged_checkpoint_is_a_one_line_error(tmp_path, dataset, train_args):
    out = tmp_path / "model"

    def stop_after_first_epoch(event):
        if event.kind == "epoch" and event.task == "fine-tune":
            raise KeyboardInterrupt

    options = dict(train_args, fine_tune=True, fine_tune_epochs=3, mirror=False)
    with pytest.raises(Interrupted):
        tlcli.train(dataset, out=str(out), progress=stop_after_first_epoch, **options)
    for f in (tmp_path / ".model.partial" / "fine-tune").glob("last-*"):
        f.write_bytes(b"\0garbage")
    with pytest.raises(UsageError, match=r"--resume: the checkpoint .* damaged.*without --resume"):
        tlcli.train(dataset, out=str(out), resume=True, **options)


# -- crashes that become one line ----------------------------------------------------------------

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/file")


@pytest.mark.parametrize("where", ["extract", "save"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_bundle(bundle_copy, dataset, train_args, monkeypatch,
                                                              where):
    from tlcli.features import extraction
    from tlcli.insight import plots

    monkeypatch.setattr(extraction, "extract", disk_full) if where == "extract" \
        else monkeypatch.setattr(plots, "training_curves", disk_full)
    before = snapshot(bundle_copy)
    with pytest.raises(TlcliError, match=r"no space left on the disk .*free some space.*previous model .* untouched"):
        tlcli.train(dataset, out=str(bundle_copy), force=True, **train_args)
    assert snapshot(bundle_copy) == before
    assert [n for n in hidden_leftovers(bundle_copy.parent) if ".tmp-" in n] == []


def test_a_full_disk_under_tensorflow_is_one_line(tmp_path, dataset, train_args, monkeypatch):
    import tensorflow as tf

    from tlcli.insight import plots

    def tf_disk_full(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "/x/variables.data: No space left on device")

    monkeypatch.setattr(plots, "training_curves", tf_disk_full)
    with pytest.raises(TlcliError, match="no space left on the disk"):
        tlcli.train(dataset, out=str(tmp_path / "model"), **train_args)


def test_a_second_run_into_the_same_out_fails_at_once(tmp_path, dataset, train_args):
    out = tmp_path / "model"
    staging = tmp_path / ".model.tmp-0123abcd"  # the running run's staging folder is left alone
    staging.mkdir()
    events = []
    with bundle.lock(out):
        with pytest.raises(TlcliError, match=r"--out .*another tlcli train or export is writing"):
            tlcli.train(dataset, out=str(out), progress=events.append, **train_args)
        assert events == [] and staging.exists()
    tlcli.train(dataset, out=str(out), **train_args)  # released: the next run works, and cleans up
    assert hidden_leftovers(tmp_path) == []


# -- contracts -------------------------------------------------------------------------------------

def test_ctrl_c_right_after_the_new_bundle_is_renamed_in_is_a_success(tmp_path, monkeypatch):
    out, staging = tmp_path / "model", None
    out.mkdir()
    (out / "tlcli.json").write_text("old")
    staging = bundle.staging_dir(out)
    (staging / "tlcli.json").write_text("new")
    real_rename = os.rename

    def rename_then_ctrl_c(src, dst):
        real_rename(src, dst)
        if Path(dst) == out:  # the second rename: the new bundle is in
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename_then_ctrl_c)
    try:
        assert bundle.commit(staging, out, force=True) == out
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C after the new bundle was renamed in failed the commit")
    assert (out / "tlcli.json").read_text() == "new"


def test_late_ctrl_c_after_the_save_keeps_the_new_bundle_and_stale_folders_go_next_run(
        bundle_copy, dataset, train_args, monkeypatch):
    real_rmtree = shutil.rmtree

    def ctrl_c_removing_the_old_bundle(path, *args, **kwargs):
        if ".old-" in Path(path).name:
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", ctrl_c_removing_the_old_bundle)

    def ctrl_c_at_the_end(event):
        if event.kind == "end" and event.task == "save":
            raise KeyboardInterrupt

    result = tlcli.train(dataset, out=str(bundle_copy), force=True, progress=ctrl_c_at_the_end, **train_args)
    assert json.loads((bundle_copy / "tlcli.json").read_text())["data"]["train_dir"] == str(dataset)
    assert result.model_dir == str(bundle_copy)
    assert [n for n in hidden_leftovers(bundle_copy.parent) if ".old-" in n]  # left for the next run
    monkeypatch.undo()
    tlcli.train(dataset, out=str(bundle_copy), force=True, **train_args)
    assert hidden_leftovers(bundle_copy.parent) == []


def test_sigterm_stops_training_like_ctrl_c_and_the_handler_is_restored(bundle_copy, dataset, train_args):
    def reached_default(signum, frame):
        raise RuntimeError("SIGTERM was not handled by training")

    def terminate_in_head_phase(event):
        if event.kind == "epoch" and event.task == "head":
            signal.raise_signal(signal.SIGTERM)

    before = snapshot(bundle_copy)
    previous = signal.signal(signal.SIGTERM, reached_default)
    try:
        with pytest.raises(Interrupted, match="untouched"):
            tlcli.train(dataset, out=str(bundle_copy), force=True, progress=terminate_in_head_phase, **train_args)
        assert signal.getsignal(signal.SIGTERM) is reached_default
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert snapshot(bundle_copy) == before


def test_a_run_killed_between_the_renames_gets_its_previous_bundle_back(tmp_path):
    out = tmp_path / "model"
    old = tmp_path / ".model.old-0123abcd"
    old.mkdir()
    (old / "tlcli.json").write_text("previous")
    (tmp_path / ".model.tmp-89abcdef").mkdir()
    with bundle.lock(out):
        notes = bundle.clean_stale(out)
    assert (out / "tlcli.json").read_text() == "previous"
    assert hidden_leftovers(tmp_path) == [] and len(notes) == 2


# -- smaller ---------------------------------------------------------------------------------------

def test_free_space_demand_follows_the_backbone_size(tmp_path, dataset, train_args, tiny_backbone, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 9 * 10**8, 10**8))  # 100 MB free
    tlcli.train(dataset, out=str(tmp_path / "model"), **train_args)  # a tiny backbone needs far less

    big = tmp_path / "big-backbone"
    shutil.copytree(tiny_backbone, big)
    with open(big / "variables" / "variables.data-00000-of-00001", "r+b") as f:
        f.truncate(150 * 10**6)  # sparse: costs no disk here
    options = dict(train_args, backbone=str(big))
    with pytest.raises(TlcliError, match=r"--out .*only 100 MB free.*about 1[67]\d MB needed"):
        tlcli.train(dataset, out=str(tmp_path / "model2"), **options)


def test_a_val_dir_that_overlaps_dir_is_warned_about(tmp_path, dataset, train_args):
    val = tmp_path / "val"
    for label in ("blue", "green", "red"):
        (val / label).mkdir(parents=True)
        for src in sorted((dataset / label).iterdir())[:2]:
            shutil.copy(src, val / label / src.name)
    events = []
    result = tlcli.train(dataset, out=str(tmp_path / "model"), val_dir=str(val), progress=events.append,
                         **train_args)
    leaks = [w for w in result.warnings if "also training images" in w]
    assert len(leaks) == 1 and leaks[0].startswith("6 of the 6 validation images")
    assert any(e.kind == "warning" and e.message == leaks[0] for e in events)


def test_resume_with_a_state_of_the_wrong_types_is_a_one_line_error(tmp_path, dataset, train_args):
    out = tmp_path / "model"
    write_state(out, data_dir=str(dataset), out=str(out), **dict(train_args, epochs="many"))
    with pytest.raises(UsageError, match=r"--resume: the interrupted run's state .* unreadable.*without --resume"):
        tlcli.train(out=str(out), resume=True)
