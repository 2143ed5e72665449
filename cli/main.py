"""The ``pipe`` command: a thin click shell over :mod:`pipeline`.

    pipe extract digits --out artifacts/digits/shards
    pipe train artifacts/digits/shards --out artifacts/digits/run
    pipe evaluate artifacts/digits/run digits --split test
    pipe query artifacts/digits/run digit.png --k 5
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import click

import pipeline
from pipeline import ExtractConfig, PipelineError, TrainConfig
from pipeline.config import CODE_POOLS, CODE_SIGNS, DISTILL, EXTRACT_BOUNDS, OPTIMIZERS, REPLAY, TRAIN_BOUNDS, parse_size
from pipeline.extraction.shards import DEFAULT_CODEC
from pipeline.errors import ParameterError, environment_message
from pipeline.query.classify import UNSEEN_RULES

from cli import progress as progress_bars


# a library parameter whose flag is not its name with dashes
FLAGS = {"start": "--from"}


def flag(param: str) -> str:
    """The flag of library parameter ``param`` (``val_fraction`` -> ``--val-fraction``)."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def with_flags(text: str) -> str:
    """A library message with each parameter it names in backquotes (`` `val_fraction` ``) written as its flag."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag(m.group(1)), text)


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Flags(logging.Formatter):
    """Library warnings name parameters as the library's callers pass them; on the command line, by
    their flags. A formatter of the CLI's own handler, so the records other handlers see keep the
    library's words."""

    def format(self, record: logging.LogRecord) -> str:
        return with_flags(super().format(record))


class _Group(click.Group):
    """Turns library errors into one ``Error: ...`` line and exit code 1, a bad parameter named by its flag."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ParameterError as e:
            raise click.ClickException(with_flags(f"{flag(e.param)} {e.text}")) from None
        except PipelineError as e:
            raise click.ClickException(with_flags(str(e))) from None
        except OSError as e:
            message = environment_message(e)
            if message is None:
                raise
            raise click.ClickException(message) from None


def _size(value: str | None, option: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


@click.group(cls=_Group)
@click.version_option(package_name="patchhash")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "off"]), default="auto", show_default=True, envvar="PIPE_PROGRESS",
              help="Progress on stderr: a bar redrawn in place, a plain line every 30 s (for logs), or none; auto = bar on a terminal, lines otherwise. Env: PIPE_PROGRESS.")
def main(verbose: bool, progress: str) -> None:
    """patchhash: learn a vector for every image patch; look up the nearest learned pattern.

    User mistakes print one "Error: ..." line and exit with code 1 (click's own usage errors
    exit 2). Progress (images/s, patches/s, ETA) goes to stderr: a bar redrawn in place on a
    terminal; where stderr is a file or pipe (a log, nohup, CI), one plain line when the work
    starts, one at most every 30 seconds and one when it ends.
    """
    progress_bars.MODE["mode"] = progress
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _Flags):
            handler.setFormatter(_Flags(LOG_FORMAT))


_source_options = [
    click.option("--split", type=click.Choice(["train", "test"]), default=None, help="Which split of the source [train where present]."),
    click.option("--holdout", type=float, default=None,
                 help="Divide a source that has one split (or none) by a hash of each image's name: this share is --split test, the rest train [off]."),
    click.option("--limit", type=int, default=None, help="Keep only the first N images, in sorted-name order [all]."),
    click.option("--per-class", type=int, default=None, help="Keep only the first N images of each class, in sorted-name order [all]."),
    click.option("--skip-bad", is_flag=True, help="Skip unreadable image files (counted in the manifest) instead of failing."),
]


def _json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=what)


def source_options(f):
    for opt in reversed(_source_options):
        f = opt(f)
    return f


@main.command()
@click.argument("source")
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts/shards"), show_default=True, help="Shard directory to write.")
@source_options
@click.option("--levels", type=int, default=ExtractConfig.levels, show_default=True, help="Quantization levels per channel.")
@click.option("--views", default=ExtractConfig.views, show_default=True, help="Exact views hashed side by side: levels (--levels), norm (each image's contrast stretched first), grad (ordinal: brighter than the right / lower neighbour); ':N' sets a view's levels, e.g. levels,norm:3; none = code view only; auto = levels,grad on gray images, levels on RGB.")
@click.option("--color", type=click.Choice(["auto", "gray", "rgb"]), default=ExtractConfig.color, show_default=True, help="Channels hashed; auto = as the first image.")
@click.option("--max-size", default="auto", show_default=True, help="Largest exact-view patch, N or HxW (the full image size is allowed); auto = the largest square whose possible contents number at most 2**24 (3 on gray, 2 on RGB at 4 levels).")
@click.option("--shapes", default=ExtractConfig.shapes, show_default=True, help="rect = every HxW up to --max-size; square = squares only; or a list such as 1x1,2x2,1x3.")
@click.option("--stride", type=int, default=ExtractConfig.stride, show_default=True, help="Step between patch positions, in pixels.")
@click.option("--position", default=ExtractConfig.position, show_default=True, help="Key kinds per patch, one or more of: none (no location), grid (its grid cell), offset (its cell in the grid moved by half a cell), coarse (its cell in a grid half as fine); both = none,grid.")
@click.option("--grid", type=int, default=ExtractConfig.grid, show_default=True, help="Grid cells per side for the grid, offset and coarse key kinds; 0 = auto: cells of about 8 pixels, at least 3 per side (3 on 8x8, 4 on 32x32).")
@click.option("--code-shapes", default=ExtractConfig.code_shapes, show_default=True, help="Shapes of the code view (each patch keyed by its nearest learned atoms): a list such as 6x6,4x8; HxW/S = an HxW patch of the image averaged over SxS pixel blocks (covering HSxWS pixels); none = no code view; auto = one square of side s = min(6, half the shorter side), plus s x s/2 where the half-size image is at least 2s wide (4x4 on 8x8, 6x6,6x6/2 on 32x32).")
@click.option("--atoms", type=int, default=ExtractConfig.atoms, show_default=True, help="Code view: dictionary atoms per shape (FAISS k-means on sampled training patches); 0 = auto: 4096 when a code shape holds more than 64 values (h x w x channels: 6x6 on RGB), else 1024.")
@click.option("--code-k", type=int, default=ExtractConfig.code_k, show_default=True, help="Code view: nearest atoms kept per patch, each a key with a weight; 0 = auto: every atom when the code view is pooled, else 5.")
@click.option("--code-pool", type=click.Choice(list(CODE_POOLS)), default=ExtractConfig.code_pool, show_default=True, help="Code view: none = a key per patch location and kept atom; grid, coarse or offset = the weights of each atom summed over the patches of each cell of that key kind before anything is written (the code keys then use that kind alone).")
@click.option("--code-position", default=ExtractConfig.code_position, show_default=True, help="Code view: key kinds of its patches (unpooled), like --position; same = those of --position; e.g. grid,offset gives the code view overlapping cells and leaves the exact views' keys as they are; auto = those of --position plus none (a key per atom shared by every place) on a large code (6x6 on RGB), else same.")
@click.option("--code-weight", type=click.Choice(["triangle", "hard"]), default=ExtractConfig.code_weight, show_default=True, help="Code view: weight of a kept atom: triangle (mean distance to all atoms minus its distance) or hard (1).")
@click.option("--code-norm", type=click.Choice(["contrast", "none"]), default=ExtractConfig.code_norm, show_default=True, help="Code view: how a patch is scaled before whitening: contrast (each patch's brightness and contrast normalised) or none (pixels on [0, 1], e.g. with --whiten 0.01); atoms of none are drawn in their own colours.")
@click.option("--code-signs", type=click.Choice(list(CODE_SIGNS)), default=ExtractConfig.code_signs, show_default=True, help="Code view: one = a patch keeps the atoms nearest to it; both = also the atoms nearest to its negative, each a key of its own (the second map of Thiry et al. 2021).")
@click.option("--whiten", type=float, default=ExtractConfig.whiten, show_default=True, help="Code view: ZCA regularisation added to the eigenvalues of the scaled patches' covariance; 0 = no whitening.")
@click.option("--code-stride", type=int, default=ExtractConfig.code_stride, show_default=True, help="Code view: step between patch positions, in pixels.")
@click.option("--code-sample", type=int, default=ExtractConfig.code_sample, show_default=True, help="Code view: patches per shape sampled to fit the dictionary.")
@click.option("--dictionary", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Code view: use this dictionary.npz (e.g. the training shards') instead of fitting one on SOURCE.")
@click.option("--like", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Take every setting (and the dictionary) from this run or shard directory, so the new keys are its keys (for pipe train --from).")
@click.option("--seed", type=int, default=ExtractConfig.seed, show_default=True, help="Hash seed (also seeds the dictionary fit).")
@click.option("--resize", default=None, help="Resize every image to HxW first [no resize: sizes must match].")
@click.option("--augment", default="auto", show_default=True, help="Extra copies of each image: none, flip (mirror), shift:N (every shift up to N pixels), e.g. flip,shift:1; auto = flip for colour images, none for grayscale.")
@click.option("--workers", type=int, default=0, show_default=True, help="Processes that decode, hash and write shards (with --engine ray: CPUs of the local Ray instance); 0 = one per core, at most one per shard.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="Run the shard tasks in local processes, or on Ray (pip install 'patchhash[ray]').")
@click.option("--address", default=None, help="With --engine ray: the Ray cluster to use (e.g. ray://head:10001 or auto) [a local instance].")
@click.option("--compression", type=click.Choice(["snappy", "lz4", "zstd", "none"]), default=DEFAULT_CODEC, show_default=True, help="Parquet codec of the shards.")
@click.option("--images-per-shard", type=int, default=None, help="Images per Parquet file [about 8M patches' worth].")
@click.option("--audit", is_flag=True, help="Also count hash collisions: distinct patch contents vs distinct keys (reads the source again).")
@click.option("--audit-images", type=int, default=None, help="Audit only the first N images [all].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
@_json_option("Print the shards' manifest (with resumed_shards, seconds, and the audit with --audit) as one JSON object.")
def extract(source, out, split, holdout, limit, per_class, skip_bad, levels, views, color, max_size, shapes, stride, position, grid, code_shapes, atoms, code_k, code_pool, code_position, code_weight, code_norm, code_signs, whiten, code_stride, code_sample, dictionary, like, seed, resize, augment, workers, engine, address, compression, images_per_shard, audit, audit_images, overwrite, as_json):
    """Hash every patch of every image of SOURCE into Parquet shards.

    SOURCE is 'digits', an image folder, a .tar/.tar.gz of one, a CIFAR
    batches folder or an .npz with x and y.

    Run the same command again after an interruption (Ctrl-C, a kill, a crash):
    the shards already finished are kept and only the rest are written; the
    output then equals an uninterrupted run's, byte for byte. The same command on
    a finished directory prints its summary with "(already complete)". Different
    settings into an existing directory are refused with the list of what
    differs, unless --overwrite is given; so is a source whose content changed
    since the interrupted extract read it, and a second extract into a directory
    another one is writing (docs/checks.md).

    \b
    Examples:
      pipe extract digits --out artifacts/digits/shards
      pipe extract ../shared/data/cifar10-train-jpg.tar.gz --per-class 500 --out artifacts/cifar/shards
      pipe extract photos/ --resize 32x32 --max-size 4x2 --grid 8 --skip-bad --out artifacts/photos
      pipe extract ../shared/data/cifar10-train-jpg.tar.gz --holdout 0.1 --out artifacts/cifar/shards
      pipe extract digits --shapes 1x1,2x2,1x4,4x1 --stride 2 --out artifacts/digits/custom
      pipe extract new-images/ --like artifacts/cifar/run --out artifacts/new/shards
    """
    if like is not None:
        given = [f"--{p.replace('_', '-')}" for p in SETTINGS_OF_LIKE
                 if click.get_current_context().get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.ClickException(f"--like {like} sets every setting; leave out {', '.join(given)}")
    if audit_images is not None and not audit:
        raise click.ClickException("--audit-images goes with --audit")
    if audit_images is not None and audit_images < 1:
        raise click.ClickException(f"--audit-images {audit_images} must be at least 1")
    mh, mw = (0, 0) if max_size == "auto" else _size(max_size, "--max-size")
    config = ExtractConfig(
        levels=levels, views=views, color=color, max_h=mh, max_w=mw, shapes=shapes, stride=stride, position=position, grid=grid, seed=seed,
        resize=_size(resize, "--resize"), code_shapes=code_shapes, atoms=atoms, code_k=code_k, code_pool=code_pool, code_position=code_position, code_weight=code_weight, code_norm=code_norm, code_signs=code_signs, whiten=whiten,
        code_stride=code_stride, code_sample=code_sample,
    )
    src = pipeline.open_source(source, split=split, limit=limit, per_class=per_class, skip_bad=skip_bad, holdout=holdout)
    with progress_bars.bar(len(src), "img", "dictionary") as fit_bar, progress_bars.bar(len(src), "img", "extract") as bar:
        m = pipeline.extract(
            src, out, config, overwrite=overwrite, images_per_shard=images_per_shard, workers=workers, engine=engine, address=address,
            compression=compression, progress=progress_bars.patches(bar), augment=augment, dictionary=dictionary, on_fit=fit_bar.update,
            like=like,
        )
    if audit:
        from pipeline.extraction import audit as audits

        src = pipeline.open_source(source, split=split, limit=limit, per_class=per_class, skip_bad=skip_bad, holdout=holdout)
        with progress_bars.bar(min(len(src), audit_images or len(src)), "img", "audit") as bar:
            res = audits.audit(src, ExtractConfig.from_dict(m["config"]), limit=audit_images, progress=progress_bars.patches(bar))
        audits.save(out, res)
    if as_json:
        click.echo(json.dumps({**m, **({"audit": res} if audit else {})}))
        return
    resumed = m["resumed_shards"]
    note = " (already complete)" if resumed == len(m["shards"]) else (f" ({resumed} shard(s) kept from an interrupted run)" if resumed else "")
    click.echo(
        f"{m['images']} images"
        + (f" (with {m['variants_per_image']} augmented cop{'y' if m['variants_per_image'] == 1 else 'ies'} each)" if m.get("variants_per_image") else "")
        + f" ({m['height']}x{m['width']}, {m['channels']} channel(s)), {m['patches']:,} patches "
        f"({m['keys']:,} keys) in {len(m['shards'])} shard(s), {m['bytes'] / 1e6:.1f} MB "
        f"({m['bytes_per_patch']:.2f} B/patch) -> {out}{note}"
        + (f" ({len(m['skipped'])} unreadable file(s) skipped)" if m["skipped"] else "")
        + (f" ({m['unlabelled']} image(s) without a label: kept for query, left out of training and validation)" if m.get("unlabelled") else "")
    )
    if audit:
        click.echo(
            f"audit: {res['patches']:,} patches, {res['distinct_contents']:,} distinct contents, "
            f"{res['distinct_keys']:,} distinct keys -> {res['collisions']} collision(s) "
            f"(expected at {res['bits']} bits: {res['expected_collisions']:.3g})"
        )


# the options of pipe extract that --like takes from the earlier run or shards
SETTINGS_OF_LIKE = ("levels", "views", "color", "max_size", "shapes", "stride", "position", "grid", "code_shapes", "atoms", "code_k",
                    "code_pool", "code_position", "code_weight", "code_norm", "code_signs", "whiten", "code_stride", "code_sample", "dictionary", "seed", "resize", "augment")


def _train_option(name: str, help: str, **kw):
    """An option whose default and type come from TrainConfig, so the CLI and the library agree."""
    field = name.lstrip("-").replace("-", "_")
    default = getattr(TrainConfig, field)
    kw.setdefault("type", type(default))
    return click.option(name, default=default, show_default=True, help=help, **kw)


@main.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts/run"), show_default=True, help="Run directory to write.")
@_train_option("--min-count", "Keys seen at least this often in training get their own row.")
@_train_option("--buckets", "Shared rows for the rarer keys (key % buckets); 0 drops them.")
@_train_option("--dim", "Embedding dimension.")
@_train_option("--bag", "Pooling of an image's rows: mean, sum, or sqrt (sum / sqrt(n)).", type=click.Choice(["mean", "sum", "sqrt"]))
@_train_option("--hidden", "0 = linear head; else one hidden ReLU layer of this width.")
@_train_option("--drop", "Patch dropout: rate of an image's distinct rows dropped in training, 'auto' to learn it, or 'image': 0.3 when the shards' code patches hold more than 64 values (6x6 on RGB), else 0.")
@_train_option("--pooled-dropout", "Ordinary dropout on the pooled vector.")
@_train_option("--optimizer", "Optimizer of the table.", type=click.Choice(list(OPTIMIZERS)))
@_train_option("--epochs", "Most passes over the training images.")
@_train_option("--patience", "Stop after this many epochs without a better validation accuracy (0 = never).")
@_train_option("--batch-size", "Images per step; 0 = auto: 128, or fewer so that an epoch has at least 32 steps.")
@_train_option("--lr", "Learning rate of the table; 0 = auto: 0.3 when the shards' code patches hold more than 64 values (6x6 on RGB), else 1.0.")
@_train_option("--head-lr", "Adam learning rate of the head.")
@_train_option("--init-std", "Standard deviation of the table's initial values.")
@_train_option("--vocab-mb", "Memory for counting keys (MB); past it the count takes several passes over key ranges.")
@_train_option("--cache-mb", "Memory for keeping every image's bags after the first epoch (MB); 0 = read the shards every epoch.")
@_train_option("--val-fraction", "Share of images held out for validation.")
@_train_option("--refit", "auto = when fewer than 500 images are held out, train again on every image for the epochs they chose; off = keep them held out.", type=click.Choice(["auto", "off"]))
@_train_option("--vote", "How an image is scored: mirror = as the bag of its own patches and its left-right mirror's; none = alone; auto = mirror when the shards hold each image's mirror (--augment flip).", type=click.Choice(["auto", "mirror", "none"]))
@_train_option("--seed", "Seed for initialisation, shuffling and dropout.")
@_train_option("--device", "auto = CUDA when present.", type=click.Choice(["auto", "cpu", "cuda"]))
@_train_option("--index", "Pattern index: auto (flat up to 100k patterns, else ivf), flat, hnsw, ivf, ivfpq, or a FAISS factory string.")
@_train_option("--nprobe", "Inverted lists searched per query (ivf kinds); more = better recall, slower.")
@_train_option("--ef-search", "Search breadth (hnsw kinds); more = better recall, slower.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Processes: N > 1 launches torchrun with DistributedDataParallel (gloo), docs/distributed.md.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last checkpoint (with the --nproc it ran with).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
@click.option("--from", "start", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Learn SHARDS on top of this finished run (extract them with --like RUN); it is never modified. Settings default to its own.")
@click.option("--replay", type=int, default=REPLAY, show_default=True, help="With --from: earlier images per class trained on again.")
@click.option("--distill", type=float, default=DISTILL, show_default=True,
              help="With --from: weight of RUN's own answers on the earlier classes in the loss (0 = none).")
@_json_option("Print the run's manifest (run.json) as one JSON object.")
def train(shards, out, nproc, resume, overwrite, start, replay, distill, as_json, **options):
    """Train pattern vectors and a classifier on SHARDS (from pipe extract).

    Prints one line per epoch (train/val loss and accuracy, raw ids/s, the
    learned drop rate with --drop auto) and rewrites metrics.jsonl and
    curves.png after every epoch, with a checkpoint that --resume continues from.

    With --from RUN it learns SHARDS (extracted with --like RUN) on top of RUN,
    which is never modified: RUN's classes keep their indices, new ones are
    appended, and only the patterns in the images it trains on change
    (docs/training.md, "Learning in steps"). Settings default to RUN's; those
    that shape its tensors (--dim, --bag, --hidden, --drop, --buckets) cannot
    change; one process.

    --nproc N (N > 1) trains with N processes through torchrun and
    DistributedDataParallel (gloo), docs/distributed.md.

    \b
    Example:
      pipe train artifacts/digits/shards --out artifacts/digits/run --epochs 10
      pipe train artifacts/new/shards --from artifacts/digits/run --out artifacts/digits/run2
    """
    ctx = click.get_current_context()
    if start is None:
        for name in ("replay", "distill"):
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
                raise click.ClickException(f"--{name} goes with --from")
        config = TrainConfig(**options)
    else:
        if nproc != 1:
            raise click.ClickException("--from trains in one process; leave out --nproc")
        from pipeline.training.grow import step_config

        given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        config = step_config(start, **given)
    if nproc != 1:
        from pipeline.training.ddp import launch

        m = launch(shards, out, config, nproc, overwrite, resume)
        click.echo(json.dumps(m) if as_json else
                   f"run written to {out} by {nproc} processes: best epoch {m['best_epoch']} of {m['epochs_run']}, val accuracy {m['final']['val_accuracy']:.4f}")
        return
    sh = pipeline.open_shards(shards)
    # the bars' totals are exact
    if start is None:
        per_epoch = sh.count_training(config.val_fraction)
    else:
        from pipeline.training.grow import step_images

        per_epoch = step_images(sh, start, replay, config.val_fraction)
    with progress_bars.bar(per_epoch, "img", "vocabulary") as vbar:
        vocab_progress = vbar.update
        bar = progress_bars.bar(per_epoch * config.epochs, "img", "train")

        def progress(images: int, ids: int) -> None:
            bar.update(images)

        def on_epoch(row: dict) -> None:
            val = f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}" if row["val_accuracy"] is not None else "no validation images"
            rate = f", drop rate {row['drop_rate']:.3f}" if "drop_rate" in row else ""
            bar.write(
                f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}, {val}, "
                f"{row['ids_per_s'] / 1e6:.2f}M ids/s{rate}", file=sys.stderr if as_json else None,
            )

        steps: list = []

        def on_step(what: str, items: int):
            if 0 < bar.n < bar.total:  # stopped early: the epochs it did are all there was
                bar.total = bar.n
                bar.set_description("train (stopped early)")
                bar.refresh()
            for b in [bar, *steps]:
                b.close()
            click.echo(f"then: {what}", err=as_json)  # with --json, stdout holds the JSON alone
            if items:
                steps.append(progress_bars.bar(items, "vec", "index"))
                return steps[-1].update
            return None

        with bar:
            m = pipeline.train(sh, out, config, overwrite=overwrite, resume=resume, progress=progress, on_epoch=on_epoch,
                               on_vocab=vocab_progress, on_step=on_step, start=start, replay=replay, distill=distill)
        for b in steps:
            b.close()
    if as_json:
        click.echo(json.dumps(m))
        return
    v = m["vocabulary"]
    click.echo(
        f"run written to {out}: best epoch {m['best_epoch']} of {m['epochs_run']}, val accuracy "
        + (f"{m['final']['val_accuracy']:.4f}" if m["final"]["val_accuracy"] is not None else "n/a")
        + (f" (then trained again on all {m['refit']['images']:,} images for {m['refit']['epochs']} epoch(s))" if m.get("refit") else "")
        + f"; vocabulary {v['vocabulary']:,} of {v['distinct_keys']:,} distinct keys, {m['rows']:,} rows, index {m['index']['factory']}"
        + (f"; grown from {m['grown_from']} (+{v['new_keys']:,} patterns, {len(m['class_names'])} classes, "
           f"{m['replayed_images']:,} earlier images trained again)" if "grown_from" in m else "")
    )


_unseen_option = click.option(
    "--unseen", type=click.Choice(list(UNSEEN_RULES)), default=None,
    help="What unseen patches do: drop (leave out, as training does), compose (vector from seen parts), nearest (nearest learned pattern) [drop].",
)
_classifier_option = click.option(
    "--classifier", type=click.Choice(["head", "knn"]), default="head", show_default=True,
    help="head = the trained classifier; knn = vote of the nearest training images (pooled vectors).",
)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("source", required=False)
@source_options
@click.option("--validation", is_flag=True, help="Score the run's own held-out part of its training shards (instead of SOURCE).")
@click.option("--resize", default=None, help="Resize SOURCE's images to HxW first [the run's own --resize, if any].")
@_unseen_option
@_classifier_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with per-class accuracy and the confusion matrix).")
def evaluate(run, source, split, holdout, limit, per_class, skip_bad, validation, resize, unseen, classifier, as_json):
    """Accuracy of RUN on SOURCE (images, hashed the run's way, or shards extracted with the run's config),
    or with --validation on the part of its training shards it held out.

    A shard directory is refused unless its fingerprint equals the run's, and
    the source options are refused with it. Without --split a source with a
    train split is scored on it; the output says what was scored. --resize is
    refused with shards, whose keys are already made; without it an image of
    another size than the run's is fitted to it (scaled, proportions kept, until
    it covers the run's size, then the centre cut out), and the output says how
    many were. --json adds per_class and confusion (confusion[i][j]: images of
    class i predicted as j). --validation gives the same figure as the best
    epoch's val_accuracy.

    \b
    Examples:
      pipe evaluate artifacts/digits/run digits --split test --json
      pipe evaluate artifacts/digits/run --validation
    """
    if bool(source) == validation:
        raise click.ClickException("give SOURCE to score, or --validation for the run's held-out part, not both" if source else
                                   "nothing to score: give SOURCE (e.g. digits --split test, an image folder), or --validation for the run's held-out part")
    r = pipeline.load(run)
    src = r.validation_shards() if validation else pipeline.open_data(source, split=split, limit=limit, per_class=per_class, skip_bad=skip_bad, holdout=holdout)
    if validation and (split or holdout or limit or per_class or skip_bad):
        raise click.ClickException("--split, --holdout, --limit, --per-class and --skip-bad choose images of SOURCE; they do not go with --validation")
    total = src.num_images if isinstance(src, pipeline.Shards) else len(src)
    with progress_bars.bar(total, "img", "evaluate") as bar:
        res = r.evaluate(src, progress=bar.update, unseen=unseen, classifier=classifier, validation=validation, resize=_size(resize, "--resize"))
    res["scored"] = ("the held-out part of the training shards" if validation else "the shard directory" if isinstance(src, pipeline.Shards)
                     else f"split {src.split}" if src.split else "all of it")
    if as_json:
        click.echo(json.dumps(res))
    else:
        fitted = f"; {res['fitted']} of another size fitted to {r.height}x{r.width}" if res.get("fitted") else ""
        click.echo(f"accuracy {res['accuracy']:.4f} on {res['n']} images of {source or run} ({res['scored']}; loss {res['loss']:.4f}{fitted})")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(run, as_json):
    """What RUN is: classes, image size, accuracy, table and index, sizes on disk, and how it was made.

    How it was made: the extract and train settings, the shards it came from (a
    run grown in steps: each step's; a run taught on the page: the run it was
    taught from and each image's name and class). --json gives all of it, both
    configs whole.

    \b
    Example:
      pipe info artifacts/digits/run
    """
    from pipeline.query.report import info_lines

    s = pipeline.load(run).summary()
    if as_json:
        click.echo(json.dumps(s))
        return
    for line in info_lines(s):
        click.echo(line)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--index", required=True, help="auto, flat, hnsw, ivf, ivfpq, or a FAISS factory string.")
@click.option("--nprobe", type=int, default=None, help="Inverted lists searched per query (ivf kinds) [as recorded, or 32].")
@click.option("--ef-search", type=int, default=None, help="Search breadth (hnsw kinds) [as recorded, or 64].")
@_json_option("Print the index's entry of run.json (and rebuilt: false when only its settings changed) as one JSON object.")
def index(run, index, nprobe, ef_search, as_json):
    """Rebuild RUN's pattern index as another kind (or change its query-time settings) and record it.

    --index is flat, hnsw, ivf, ivfpq, auto (exact Flat up to 100,000 patterns,
    IVF beyond), or a FAISS index_factory string such as HNSW64 or IVF4096,PQ16;
    with the kind the run already has, only the recorded nprobe / ef_search
    change. pipe train --index chooses it at training time (docs/query.md).

    \b
    Example:
      pipe index artifacts/run --index hnsw --ef-search 128
    """
    info = pipeline.rebuild_index(run, index, nprobe, ef_search)
    if as_json:
        click.echo(json.dumps(info))
        return
    knobs = ", ".join(f"{k} {info[k]}" for k in ("nprobe", "ef_search") if info[k] is not None)
    click.echo(f"{run}: index {info['factory']} over {info['vectors']:,} patterns ({'exact' if info['exact'] else 'approximate'}"
               + (f", {knobs}" if knobs else "") + (f"), built in {info['build_s']:.1f} s" if info["rebuilt"] else "): the same index, only its settings changed"))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--k", type=int, default=5, show_default=True, help="Nearest learned patterns per patch (and nearest training images in --batch).")
@click.option("--patches", type=int, default=5, show_default=True, help="Most decisive patches shown per image (0 = all; in --batch, 0 = none).")
@click.option("--batch", "batch_source", default=None, help="Query every image of this source (or shard directory) instead of IMAGES.")
@source_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="With --batch: the results Parquet file [artifacts/results.parquet].")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="With --batch: answer batches in this process, or on Ray actors (each loads the run once).")
@click.option("--workers", type=int, default=1, show_default=True, help="With --engine ray: actors (CPUs of the local Ray instance).")
@click.option("--address", default=None, help="With --engine ray: the Ray cluster to use [a local instance].")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Also write one PNG per image to this folder: decisive patches and their nearest patterns.")
@click.option("--resize", default=None, help="Resize the images to HxW first [the run's own --resize, if any].")
@_unseen_option
@_classifier_option
@click.option("--nprobe", type=int, default=None, help="Override the index's nprobe (ivf kinds) for this query.")
@click.option("--ef-search", type=int, default=None, help="Override the index's efSearch (hnsw kinds) for this query.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image, one per line.")
def query(run, images, k, patches, batch_source, split, holdout, limit, per_class, skip_bad, out, engine, workers, address, png_dir, resize, unseen, classifier, nprobe, ef_search, as_json):
    """Classify IMAGES with RUN and show their patches' nearest learned patterns.

    For each image: the prediction and top probabilities, how many patches were
    seen in training / unseen but composed from seen sub-patches / unmatched,
    and the --patches N patterns that push the predicted class most (0 = every
    patch), each with its --k nearest learned patterns (id, squared distance,
    how often seen, majority class), then the k nearest training images. Patches
    unseen in training are left out of the prediction by default (--unseen
    compose or nearest changes that) and are marked in the output. --png DIR
    writes DIR/<image name>.png: the image with those patches outlined and,
    beside each, the pixels of its nearest learned patterns. An image of another
    size than the run's is fitted to it, and a gray image on a colour run (or
    the reverse) converted, each with a "note:" line on stderr.

    --batch SOURCE streams every image of a source or shard directory through
    the run and writes one Parquet row per image (schema in docs/query.md),
    printing the accuracy when the images have labels; the file appears only
    when complete. The source options choose the images; --engine ray answers on
    Ray actors (docs/distributed.md).

    \b
    Examples:
      pipe query artifacts/digits/run artifacts/digits/test-0.png --k 3 --png artifacts/png
      pipe query artifacts/digits/run --batch digits --split test --out artifacts/results.parquet
    """
    from pipeline.query.report import check_counts, png_names, query_one, text_lines

    if images and batch_source:
        raise click.ClickException("give image files, or --batch SOURCE, not both")
    if not images and not batch_source:
        raise click.ClickException("give one or more image files to query, or --batch SOURCE for a whole source")
    folders = [p for p in images if Path(p).is_dir()]
    if folders:
        raise click.ClickException(f"{folders[0]} is a directory; to query every image in it use --batch {folders[0]}")
    if not batch_source and (out or split or holdout or limit or per_class or skip_bad or engine != "local" or address or workers != 1):
        raise click.ClickException("--out, --split, --holdout, --limit, --per-class, --skip-bad, --engine, --workers and --address go with --batch")
    check_counts(k, patches)
    if batch_source and png_dir:
        raise click.ClickException("--png draws the image files given as IMAGES; it does not go with --batch")
    r = pipeline.load(run, unseen)
    if nprobe is not None or ef_search is not None:
        r.tune(nprobe, ef_search)
    if batch_source:
        src = pipeline.open_data(batch_source, split=split, limit=limit, per_class=per_class, skip_bad=skip_bad, holdout=holdout)
        total = src.num_images if isinstance(src, pipeline.Shards) else len(src)
        with progress_bars.bar(total, "img", "query") as bar:
            res = pipeline.query_batch(
                r, src, out or Path("artifacts/results.parquet"), k=k, patches=patches, classifier=classifier, progress=bar.update,
                engine=engine, workers=workers, address=address, resize=_size(resize, "--resize"),
            )
        if as_json:
            click.echo(json.dumps(res))
            return
        acc = f"; accuracy {res['accuracy']:.4f} on {res['labelled']} labelled images" if res["accuracy"] is not None else "; no labels"
        click.echo(f"{res['images']} images queried, results in {res['out']}{acc}")
        return
    pngs = png_names(images) if png_dir else {}
    for path in images:
        notes: list[str] = []
        img = r.read_image(path, _size(resize, "--resize"), notes)
        for note in notes:
            click.echo(f"note: {note}", err=True)
        res, lookup = query_one(r, img, str(path), k=k, patches=patches, classifier=classifier)
        if png_dir:
            png = png_dir / pngs[path]
            pipeline.query_png(r, img, lookup, png, title=Path(path).name)
            res["png"] = str(png)
        if as_json:
            click.echo(json.dumps(res))
            continue
        for line in text_lines(res, str(path)):
            click.echo(line)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (127.0.0.1: this machine only).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--max-upload-mb", type=float, default=16, show_default=True, help="Largest request accepted; larger ones get 413.")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Processes answering, each with the run loaded; 0 = one per core (a process answers one image at a time), 1 with --learn-into.")
@click.option("--learn-into", type=click.Path(path_type=Path), default=None,
              help="Let the page teach the run (POST /learn) and write what it learned as a new run here (POST /save, and at shutdown); RUN is never changed.")
@_unseen_option
def serve(run, host, port, max_upload_mb, workers, unseen, learn_into):
    """Keep RUN loaded and answer queries over HTTP, with a page at / to look at them.

    --workers N answering processes share the port, each with the run loaded.
    --learn-into DIR lets the page teach the run (one worker process): a wrong
    answer corrected there is learned at once, and what was learned is written
    as a new run in DIR on request and at shutdown; RUN is never changed
    (docs/serve.md, "Teaching from the page").

    \b
    Endpoints: GET /health, GET /info, POST /query (multipart field "images"),
    GET /pattern/ID.png, GET /training-image/ROW.png, GET /class/NAME, GET / (the page);
    with --learn-into: POST /learn (fields "image" and "label"), POST /save.
    Needs the serve extra: pip install 'patchhash[serve]'.

    \b
    Example:
      pipe serve artifacts/digits/run --port 8000   # then open http://127.0.0.1:8000/
      pipe serve artifacts/digits/run --learn-into artifacts/digits/taught   # the page can teach it
    """
    try:
        import uvicorn
        from pipeline.serve import app as serving
    except ImportError as e:
        raise click.ClickException(f"pipe serve needs the serve extra ({e.name} is not installed): pip install 'patchhash[serve]'")
    serving.check_upload_mb(max_upload_mb)
    serving.check_port(host, port)
    workers = serving.check_workers(workers or (1 if learn_into else 0), learn_into)
    if learn_into is not None:
        serving.check_learn_into(learn_into, run)
    r = pipeline.load(run, unseen)  # any problem with the run is said here, once, before a worker starts
    loopback = serving.is_loopback(host)
    if not loopback:
        click.echo(f"warning: listening on {host} makes the server reachable from other machines, and it has no "
                   "authentication: anyone who can reach the port can query the run and see its training images", err=True)
    click.echo(f"serving {run} on http://{host}:{port}/ with {workers} worker process(es) (Ctrl-C stops)", err=True)
    if workers == 1:
        serving.warm(r)
        serving.run_server(serving.make_app(r, max_upload_mb, loopback_only=loopback, learn_into=learn_into), host, port)
        return
    del r
    serving.run_workers({"run": str(Path(run).resolve()), "unseen": unseen, "max_upload_mb": max_upload_mb, "loopback_only": loopback},
                        host, port, workers)


def _say_bounds(command: click.Command, bounds: dict) -> None:
    """End the help of each option that sets a bounded config field with the config's own bound."""
    for p in command.params:
        if p.name in bounds and isinstance(p, click.Option):
            p.help = f"{p.help.rstrip()} Values {bounds[p.name].text()}."


_say_bounds(extract, EXTRACT_BOUNDS)
_say_bounds(train, TRAIN_BOUNDS)


if __name__ == "__main__":
    main()
