"""The resumable state of a training run, and what an interrupted run leaves and says.

The state is kept in ``.<out>.partial/state.json`` beside ``--out``.

It holds the run's settings (paths absolute, so ``--resume`` from another folder trains the same
images), the per-epoch history of every phase, what the head fit chose, and where fine-tuning
stands (its checkpoints are files beside ``state.json``). The file layout is that of tlcli 0.1::

    {"config": {...TrainConfig...}, "history": {phase: [{"epoch": 1, ...}, ...]},
     "head_epochs": 12, "head_l2": 0.001, "head_cv_loss": {"0.001": 0.21, ...},
     "fine_tune": {"epochs_run": 2, "best": 0.3, "best_epoch": 1, "wait": 0, "stopped": false,
                   "last_checkpoint": "...", "best_checkpoint": "...", "improved": true}}
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

from tlcli import files
from tlcli.config import DEFAULTS, TrainConfig, is_backbone_choice, validate
from tlcli.errors import TlcliError, UsageError
from tlcli.model.backbone import REMOTE_PREFIXES
from tlcli.model.presets import PRESETS
from tlcli.progress import Callback, Info

STATE_FILE = "state.json"
# Paths of a run, stored absolute so that --resume from another folder trains the same images.
_PATHS = ("data_dir", "val_dir", "out", "cache_dir", "labels_override")
# What a command may still change on --resume: where the bundle goes (it names the run being
# resumed), whether it may replace one, and where features are cached (the results are the same).
_RESUME_MAY_CHANGE = {"out", "force", "resume", "cache_dir"}


@dataclass
class HeadState:
    """What the last head fit chose: its epoch count, L2 strength and CV loss per L2 ("l2" -> loss)."""

    epochs: int = 0
    l2: float | None = None
    cv_loss: dict[str, float] = field(default_factory=dict)


@dataclass
class FineTuneState:
    """Where fine-tuning stands after its last finished epoch: epochs run, the best holdout loss
    and its epoch (-1: the starting weights), epochs since it improved, whether early stopping
    ended it, its last and best checkpoints (path prefixes), whether the backbone changed, and how
    many checkpoints the final weights average."""

    epochs_run: int = 0
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    stopped: bool = False
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    improved: bool | None = None
    soup: int = 0  # epoch checkpoints averaged into the final weights (0 or 1: none)


# JSON types of each field: bool is kept apart from int (JSON's true is not an epoch count).
_INT, _FLOAT, _STR, _BOOL, _NONE = ("int",), ("int", "float"), ("str",), ("bool",), ("null",)
_FINE_TUNE_TYPES = {"epochs_run": _INT, "best": _FLOAT + _NONE, "best_epoch": _INT + _NONE, "wait": _INT,
                    "stopped": _BOOL, "last_checkpoint": _STR + _NONE, "best_checkpoint": _STR + _NONE,
                    "improved": _BOOL + _NONE, "soup": _INT}
_HEAD_KEYS = {"head_epochs": ("epochs", _INT), "head_l2": ("l2", _FLOAT + _NONE), "head_cv_loss": ("cv_loss", None)}


def _json_type(value) -> str:
    if value is None or isinstance(value, bool):
        return "null" if value is None else "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    return {float: "float", str: "str"}.get(type(value), type(value).__name__)


def _checked(name: str, value, types):
    if _json_type(value) not in types:
        raise TypeError(f"{name} must be {' or '.join(types)}, not {_json_type(value)}")
    return value


@dataclass
class RunState:
    """The saved ``config`` (a ``TrainConfig`` with absolute paths), the ``history`` of every
    phase (phase -> per-epoch rows) and the per-phase state."""

    config: TrainConfig
    history: dict[str, list] = field(default_factory=dict)
    head: HeadState = field(default_factory=HeadState)
    fine_tune: FineTuneState = field(default_factory=FineTuneState)
    calibration: dict | None = None  # the last head fit's (model.calibration); not saved: every run refits
    unknown: dict | None = None  # the unknown detector's record (features.unknown); not saved: every run refits
    plan: dict | None = None  # a --time-budget's (training.plan.Plan); not saved: every run plans anew
    tta: dict | None = None  # the crop views' test (features.tta.Decision); not saved: every run decides anew

    def to_json(self) -> dict:
        return {"config": self.config.to_dict(), "history": self.history, "head_epochs": self.head.epochs,
                "head_l2": self.head.l2, "head_cv_loss": dict(self.head.cv_loss),
                "fine_tune": dataclasses.asdict(self.fine_tune)}

    @classmethod
    def from_json(cls, data) -> "RunState":
        """Parse ``to_json``'s layout (keys other than the config's may be missing). Raises
        ``TypeError``, ``KeyError`` or ``ValueError`` for a value of the wrong type, and
        ``UsageError`` for a config that ``validate`` refuses."""
        if not isinstance(data, dict):
            raise TypeError("the state must be an object")
        if not isinstance(data["config"], dict):
            raise TypeError("config must be an object")
        config = TrainConfig.from_dict(data["config"])
        validate(config)
        history, fine_tune = data.get("history", {}), data.get("fine_tune", {})
        if not isinstance(history, dict) or not all(isinstance(rows, list) for rows in history.values()):
            raise TypeError("history must be an object of lists")
        if not isinstance(fine_tune, dict):
            raise TypeError("fine_tune must be an object")
        ft = {k: _checked(f"fine_tune.{k}", v, _FINE_TUNE_TYPES[k]) for k, v in fine_tune.items()
              if k in _FINE_TUNE_TYPES}
        head = {}
        for key, (name, types) in _HEAD_KEYS.items():
            if key in data:
                head[name] = _checked(key, data[key], types) if types else data[key]
        if not isinstance(head.get("cv_loss", {}), dict):
            raise TypeError("head_cv_loss must be an object")
        return cls(config, history, HeadState(**head), FineTuneState(**ft))

    def save(self, partial: Path) -> None:
        """Write ``partial/state.json`` atomically (creating ``partial``)."""
        partial.mkdir(parents=True, exist_ok=True)
        files.write_json(partial / STATE_FILE, self.to_json())


def partial_dir(out: str | os.PathLike) -> Path:
    """The run's work folder beside ``out``: ``.<name>.partial``."""
    p = Path(out).absolute()
    return p.parent / f".{p.name}.partial"


def absolute(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its folders, and a local backbone's (each local candidate's), as absolute paths."""
    changes = {name: os.path.abspath(getattr(cfg, name)) for name in _PATHS if getattr(cfg, name)}
    if is_backbone_choice(cfg.backbone):
        if cfg.backbone != "auto":
            changes["backbone"] = ",".join(_absolute_backbone(b.strip()) for b in cfg.backbone.split(",") if b.strip())
    else:
        changes["backbone"] = _absolute_backbone(cfg.backbone)
    if cfg.tensorboard and os.path.isabs(cfg.tensorboard):
        changes["tensorboard"] = os.path.abspath(cfg.tensorboard)
    return cfg.replace(**changes)


def _absolute_backbone(backbone: str) -> str:
    if backbone in PRESETS or backbone.startswith(REMOTE_PREFIXES):
        return backbone
    return os.path.abspath(os.path.expanduser(backbone))


def requested(data_dir, config: TrainConfig | None, options: dict, given) -> tuple[TrainConfig, set[str]]:
    """The run's config and the names of the fields the caller set: ``given`` when passed, else
    the ``options``, ``data_dir`` and the fields of ``config`` that differ from the defaults."""
    base = config or TrainConfig()
    cfg = base.replace(**options)
    if data_dir is not None:
        cfg = cfg.replace(data_dir=str(data_dir))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if given is None:
        given = set(options) | {n for n in names if getattr(base, n) != getattr(DEFAULTS, n)}
        given |= {"data_dir"} if data_dir is not None else set()
    return cfg, set(given) & names


def _flag(name: str) -> str:
    return "DIR" if name == "data_dir" else "--" + name.replace("_", "-")


def _same_path(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b)


def load(out: str | os.PathLike) -> RunState:
    """The state of the interrupted run into ``out``. Raises ``UsageError`` (one line, naming the
    file) when there is none or it is unreadable."""
    state_file = partial_dir(out) / STATE_FILE
    if not state_file.exists():
        raise UsageError(f"--resume: no interrupted run to continue for --out {out} (a run stopped before "
                         "fine-tuning keeps only the features it extracted, in the feature cache); run the same "
                         "command without --resume, which reuses them")
    try:
        return RunState.from_json(json.loads(state_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError) as exc:
        raise UsageError(f"--resume: the interrupted run's state in {state_file} is unreadable ({exc}); "
                         "run without --resume to start over") from None


def resume(cfg: TrainConfig, given: set[str], progress: Callback) -> tuple[TrainConfig, RunState]:
    """The config and state of the interrupted run into ``cfg.out``. The saved run keeps every
    setting but those in ``_RESUME_MAY_CHANGE``; a ``given`` one that differs from it is refused
    with ``UsageError`` naming each."""
    state = load(cfg.out)
    saved = state.config
    mine, theirs = absolute(cfg), absolute(saved)
    changed = [f"{_flag(n)} (that run: {getattr(saved, n)}, this command: {getattr(cfg, n)})"
               for n in sorted(given - _RESUME_MAY_CHANGE)
               if getattr(mine, n) != getattr(theirs, n) and not _same_path(getattr(mine, n), getattr(theirs, n))]
    if changed:
        raise UsageError(f"--resume: the interrupted run into {cfg.out} keeps the settings it started with, "
                         f"and this command changes {'; '.join(changed)}; leave those out, or run without "
                         "--resume to start over")
    cache = cfg.cache_dir if "cache_dir" in given else saved.cache_dir
    cfg = saved.replace(out=mine.out, resume=True, force=cfg.force or saved.force, cache_dir=cache)
    _rebase_checkpoints(state.fine_tune, partial_dir(theirs.out), partial_dir(cfg.out))
    progress(Info(f"resuming the interrupted run into {cfg.out} with the settings it started "
                   f"with (DIR {cfg.data_dir})"))
    state.config = absolute(cfg)
    return cfg, state


def _rebase_checkpoints(st: FineTuneState, was: Path, now: Path) -> None:
    """Point the checkpoints that lay in the run's work folder ``was`` at the same files in
    ``now``, the work folder read on this resume: the folder beside a renamed ``--out``, or a
    cluster worker's copy of the chief's (``distributed.join``), so that no worker reads another's."""
    for name in ("last_checkpoint", "best_checkpoint"):
        path = getattr(st, name)
        if path and was != now and Path(path).is_relative_to(was):
            setattr(st, name, str(now / Path(path).relative_to(was)))


def left_behind(out: str | os.PathLike) -> str:
    """What an interrupted or failed run into ``out`` leaves: the previous bundle, and the resume state."""
    kept = ("; progress kept: run the same command with --resume to continue"
            if (partial_dir(out) / STATE_FILE).exists() else
            "; the features extracted so far are in the feature cache: run the same command again (without "
            "--resume) and it starts from them")
    where = f"the previous model at {out} is untouched" if Path(out).exists() else f"nothing was written to {out}"
    return where + kept


def write_error(exc: BaseException, out: str | os.PathLike) -> TlcliError:
    """One line for a file error (a full disk above all) during a run into ``out`` or its save."""
    name = getattr(exc, "filename", None) or out
    if files.disk_full(exc):
        return TlcliError(f"no space left on the disk while writing {name}: free some space, then train again; "
                          f"{left_behind(out)}")
    return TlcliError(f"{name}: {getattr(exc, 'strerror', None) or exc}; {left_behind(out)}")
