"""The commands about data and bundles as things: audit, share, and the backbone cache (models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli.cli import common, render, reports, shell
from tlcli.config import DEFAULT_MODEL_DIR, DEFAULT_PRESET, DEFAULTS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, Extractor
from tlcli.errors import TlcliError, UsageError


@common.app.command(cls=shell.Command, short_help="Find duplicates, leaks, likely mislabels and outliers in DIR.")
@common.interruptible
def audit(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Argument(
        metavar="DIR", show_default=False,
        help="Folder with one subfolder of images per class (with --model: the one it was trained "
             "on).")] = None,
    model: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="A trained bundle: audit with its training settings (folders, split, seed, backbone, "
                            "image size, cache), instead of the options below.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Validation folder, as given to "
                                                                        "train.")] = None,
    val_split: Annotated[float, typer.Option(help="Fraction of each class held out, as train splits it.")] = (
        DEFAULTS.val_split),
    seed: Annotated[int, typer.Option(help="The seed of the split, as given to train.")] = DEFAULTS.seed,
    backbone: Annotated[str, typer.Option(help="The backbone, as given to train.")] = DEFAULT_PRESET,
    image_size: Annotated[Optional[int], typer.Option(min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE,
                                                          help="Input size, as given to train.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Feature cache (default $TLCLI_CACHE_DIR or ~/.cache/tlcli).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size of the feature extraction.")] = DEFAULTS.batch_size,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image (decoded pixels) "
                                                       "accepted.")] = DEFAULTS.max_pixels,
    extractor: Annotated[Extractor, typer.Option(help="What runs the backbone, as given to train.")] = Extractor(
        DEFAULTS.extractor),
    report: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder to write audit.html (thumbnails), "
                                                                       "one CSV per kind and review.csv (for "
                                                                       "train --labels-override) into.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the report files in a --report folder that is "
                                                        "not empty.")] = False,
    json_out: common.JsonFlag = False,
):
    """Find exact and near-duplicates, train/val leaks, likely mislabels and outliers in DIR, from the
    features train computes (an audit after train extracts nothing). Never changes the images."""
    from tlcli.insight.audit import audit as run_audit

    taken = sorted(common.given(ctx, {}) & {"val_dir", "val_split", "seed", "backbone", "image_size", "cache_dir",
                                       "extractor"})
    if model is not None and taken:
        flags = ", ".join("--" + t.replace("_", "-") for t in taken)
        common.fail(UsageError(f"--model {model}: takes {flags} from the bundle; drop them, or audit without "
                               "--model"), json_out=json_out)
    r = common.with_progress(run_audit, data_dir, quiet=json_out, json_out=json_out, model_dir=model,
                             val_dir=common.path_str(val_dir), val_split=val_split, seed=seed, backbone=backbone,
                             image_size=image_size, cache_dir=common.path_str(cache_dir), batch_size=batch_size,
                             max_pixels=max_pixels, extractor=extractor.value, report_dir=report, force=force)
    if json_out:
        render.print_json(r.to_dict())
    else:
        for shown in reports.audit(r):
            common.out.print(shown, highlight=False)


@common.app.command(cls=shell.Command, short_help="Copy a bundle for others, without the folders it was trained from.")
@common.interruptible
def share(
    model: common.ModelDir = Path(DEFAULT_MODEL_DIR),
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where to write the copy to share.")] = ...,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing copy at --out.")] = False,
    json_out: common.JsonFlag = False,
):
    """Copy the bundle for others, without the folders it was trained from (see docs/security.md)."""
    from tlcli.bundle.share import share as share_bundle

    try:
        r = share_bundle(model, out=out_dir, force=force)
    except TlcliError as exc:
        common.fail(exc, json_out=json_out)
    render.print_json(r.to_dict()) if json_out else common.out.print(render.share_summary(r))


@common.models_app.command("list", cls=shell.Command, short_help="The backbone presets, and which are cached.")
def models_list(json_out: common.JsonFlag = False):
    """List the backbone presets: handle, input size, feature size, and whether each is in the TF Hub
    cache ($TFHUB_CACHE_DIR, else ~/.cache/tlcli/tfhub) with its size on disk."""
    from tlcli.model import hub_cache as models

    listing = models.list_models()
    if json_out:
        render.print_json(listing.to_dict())
    else:
        common.out.print(render.models_table(listing))


@common.models_app.command("fetch", cls=shell.Command, short_help="Download a backbone into the TF Hub cache.")
@common.interruptible
def models_fetch(
    name: Annotated[str, typer.Argument(metavar="NAME|HANDLE", show_default=False,
                                        help="A preset name or an https:// TF Hub / Kaggle handle.")],
    json_out: common.JsonFlag = False,
):
    """Download a backbone into the TF Hub cache ($TFHUB_CACHE_DIR, else ~/.cache/tlcli/tfhub), so train
    works offline later."""
    from tlcli.model import hub_cache as models

    r = common.with_progress(models.fetch_model, name, quiet=json_out, json_out=json_out)
    if json_out:
        render.print_json(r.to_dict())
    else:
        common.out.print(render.fetch_summary(r))
