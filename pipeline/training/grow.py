"""Learning more on top of a finished run: ``pipe train SHARDS --from RUN --out NEW_RUN``.

A step trains on the new shards' images and on a bounded sample of the images the earlier
steps learned from (``replay`` originals per class, read from their shards), starting from
the earlier run's vectors and head:

* **classes by name**: a class the earlier run knows keeps its index, a new one is appended
  and the head grows by a row (initialised like a new run's);
* **vocabulary**: every key of the earlier vocabulary keeps its vector (its row moves only
  so that keys stay ascending); a key of the new images gets a row when its count over the
  new images, plus its earlier count if it had a row, reaches ``min_count``;
* **untouched rows**: the table is updated sparsely, so the row of a pattern that occurs in
  none of the step's images (new or sampled) is bit-identical after the step;
* **look-ups**: the pattern table keeps the earlier rows' statistics and examples and adds
  the new images' counts; the image index keeps the earlier images' vectors and adds the new
  images'; ``run.json`` records the lineage (each step's run and shards).

The earlier run is only read. Its optimizer state is not kept by a finished run, so a step
starts the optimizer afresh.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.table import index as pattern_index
from pipeline import layout
from pipeline.table import patterns, weights
from pipeline.config import DISTILL, REPLAY, TrainConfig  # noqa: F401 (the defaults of train's replay and distill)
from pipeline.data.augment import base_ids, is_original
from pipeline.data.split import is_validation
from pipeline.errors import ParameterError, PipelineError
from pipeline.extraction.shards import KeyBatch, Shards
from pipeline.table import vocab as vocab_mod



@dataclass
class Parent:
    """What a step reads of the earlier run."""

    root: Path
    manifest: dict
    config: TrainConfig
    class_names: list[str]
    vocab: vocab_mod.Vocabulary
    weights: dict[str, np.ndarray]
    lineage: list[dict]  # [{"run": run it grew from or None, "shards": the shards it learned}], oldest first


def load_parent(root: Path | str) -> Parent:
    root = Path(root)
    mpath = root / layout.RUN_MANIFEST
    if not (root / layout.RUN_MANIFEST).is_file():
        raise ParameterError("start", f"{root} is not a finished run (no {layout.RUN_MANIFEST}); train one with pipe train")
    try:
        m = layout.read_json(mpath)
        config = TrainConfig.from_dict(m["train_config"])
        classes = [str(c) for c in m["class_names"]]
        lineage = m.get("lineage") or [{"run": None, "shards": m["shards"]}]
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise PipelineError(f"{mpath} is damaged ({e.__class__.__name__}: {e}); train that run again") from None
    v = vocab_mod.Vocabulary.load(root / layout.VOCAB, m.get("vocabulary"))
    w = weights.load(root / layout.WEIGHTS, "train that run again")
    return Parent(root, m, config, classes, v, w, lineage)


def merged_classes(parent: list[str], new: list[str]) -> list[str]:
    """The earlier classes in their order, then the new ones in theirs."""
    return parent + [c for c in new if c not in parent]


def label_map(names: list[str], merged: list[str]) -> np.ndarray:
    """Label -> merged index for labels 0..len(names)-1, and -1 -> -1 (the last entry)."""
    index = {c: i for i, c in enumerate(merged)}
    return np.asarray([index[c] for c in names] + [-1], np.int64)


class StepShards(Shards):
    """The images a step trains on, read like one shard directory: every image of ``new``, and of
    each earlier shard directory the originals (and their augmented copies) of ``chosen``; labels
    are indices into ``class_names``. Settings, manifest and dictionary are ``new``'s."""

    def __init__(self, new: Shards, class_names: list[str], earlier: list[tuple[Shards, np.ndarray, list]] = ()):
        self.root, self.manifest, self.config, self.fingerprint = new.root, new.manifest, new.config, new.fingerprint
        self.height, self.width = new.height, new.width
        self.class_names = list(class_names)
        self.new = new
        self._parts = [(new, None, label_map(new.class_names, class_names), new.row_groups())]
        self._parts += [(s, ids, label_map(s.class_names, class_names), groups) for s, ids, groups in earlier]
        self._owner = {path: i for i, (s, _, _, _) in enumerate(self._parts) for path in s.files()}

    @property
    def num_images(self) -> int:
        return self.new.num_images + sum(int(np.isin(self._ids(s, g), ids).sum()) for s, ids, _, gs in self._parts[1:] for g in gs)

    @staticmethod
    def _ids(s: Shards, group: tuple[Path, int]) -> np.ndarray:
        return base_ids(s._open(group[0]).read_row_group(group[1], columns=["image_id"]).column("image_id").to_numpy())

    def files(self) -> list[Path]:
        return [p for s, _, _, _ in self._parts for p in s.files()]

    def row_groups(self) -> list[tuple[Path, int]]:
        return [g for _, _, _, groups in self._parts for g in groups]

    def iter_content(self, files=None, groups=None, names: bool = False):
        if groups is None:
            groups = [g for g in self.row_groups() if files is None or g[0] in files]
        for path, rg in groups:
            s, chosen, mapping, _ = self._parts[self._owner[path]]
            b = next(s.iter_content(groups=[(path, rg)], names=names))
            keep = np.arange(len(b.image_ids)) if chosen is None else np.flatnonzero(np.isin(base_ids(b.image_ids), chosen))
            yield KeyBatch(
                b.image_ids[keep], mapping[b.labels[keep]], b.keys[keep],
                None if b.names is None else [b.names[i] for i in keep],
                None if b.weights is None else b.weights[keep], None if b.atoms is None else b.atoms[keep],
            )

    def classes_present(self) -> np.ndarray:
        labels = [b.labels for b in self._labels()]
        got = np.unique(np.concatenate(labels)) if labels else np.zeros(0, np.int64)
        return got[got >= 0]

    def count_training(self, fraction: float) -> int:
        return int(self.class_counts(fraction).sum())

    def class_counts(self, fraction: float) -> np.ndarray:
        """Training images (not held out, labelled) per class."""
        counts = np.zeros(len(self.class_names), np.int64)
        for b in self._labels():
            keep = (~is_validation(b.image_ids, fraction)) & (b.labels >= 0)
            counts += np.bincount(b.labels[keep], minlength=len(counts))
        return counts

    def _labels(self):
        """(image ids, labels) of every image, read from the id and label columns only."""
        for path, rg in self.row_groups():
            s, chosen, mapping, _ = self._parts[self._owner[path]]
            t = s._open(path).read_row_group(rg, columns=["image_id", "label"])
            ids, labels = t.column("image_id").to_numpy().astype(np.int64), t.column("label").to_numpy().astype(np.int64)
            keep = slice(None) if chosen is None else np.isin(base_ids(ids), chosen)
            yield KeyBatch(ids[keep], mapping[labels[keep]], np.empty((0, 0), np.uint64))


def choose_earlier(lineage: list[dict], class_names: list[str], fingerprint: str, per_class: int) -> tuple[list, list[str]]:
    """Up to ``per_class`` labelled original images of each class from the earlier steps' shards, in
    shard order (so a few row groups are read): [(shards, chosen base ids, row groups)], and notes
    about shards that are gone."""
    taken = {c: 0 for c in range(len(class_names))}
    out, notes = [], []
    for entry in lineage:
        path = Path(entry["shards"])
        try:
            s = Shards(path)
        except PipelineError as e:
            notes.append(f"the earlier shards {path} cannot be read ({e}); this step trains again on none of their images")
            continue
        if s.fingerprint != fingerprint:
            notes.append(f"the earlier shards {path} were extracted with other settings; left out")
            continue
        mapping = label_map(s.class_names, class_names)
        chosen, groups = [], []
        for path_g in s.row_groups():
            t = s._open(path_g[0]).read_row_group(path_g[1], columns=["image_id", "label"])
            ids, labels = t.column("image_id").to_numpy().astype(np.int64), mapping[t.column("label").to_numpy().astype(np.int64)]
            pick = []
            for i in np.flatnonzero(is_original(ids) & (labels >= 0)):
                if taken[int(labels[i])] < per_class:
                    taken[int(labels[i])] += 1
                    pick.append(ids[i])
            if pick:
                chosen += pick
                groups.append(path_g)
        if chosen:
            out.append((s, np.asarray(chosen, np.int64), groups))
    return out, notes


def balanced_weights(step: StepShards, fraction: float) -> np.ndarray:
    """Per class: the step's training images over (classes trained on x that class's images), so
    every class weighs the same in the loss (0 for a class with no image in the step)."""
    counts = step.class_counts(fraction)
    w = np.zeros(len(counts), np.float32)
    seen = counts > 0
    w[seen] = counts.sum() / (seen.sum() * counts[seen])
    return w


class Teacher:
    """The earlier run's answers for the earlier classes, which a step's loss keeps its model close to
    (distillation, as in Learning without Forgetting, Li & Hoiem 2016): a frozen copy of the table
    and head as the step starts. It adds the divergence between the earlier and the current model's
    class probabilities over the earlier classes (at ``temperature``, times ``weight``) to the loss,
    so a pattern shared with the new classes moves only as far as the earlier classes allow."""

    def __init__(self, model, classes: int, temperature: float = 2.0, weight: float = 1.0):
        self.table = model.table.weight.detach().clone()
        self.head = copy.deepcopy(model.head).eval()
        for q in self.head.parameters():
            q.requires_grad_(False)
        self.classes, self.temperature, self.weight = classes, temperature, weight

    def loss(self, rows: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The distillation term for a batch (``w``: the weights its rows were pooled with)."""
        with torch.no_grad():
            pooled = torch.nn.functional.embedding_bag(rows, self.table, offsets[:-1], mode="sum", per_sample_weights=w.detach())
            target = torch.softmax(self.head(pooled)[:, : self.classes] / self.temperature, 1)
        student = torch.log_softmax(logits[:, : self.classes] / self.temperature, 1)
        return self.weight * self.temperature ** 2 * torch.nn.functional.kl_div(student, target, reduction="batchmean")


def calibrate(model, batches, ridge: float = 1e-3) -> np.ndarray:
    """Offsets for the head's class biases that make the model's answers on ``batches`` (a step's
    validation images) best on every class alike: minimise the class-balanced cross-entropy of the
    logits plus the offsets (with a small ``ridge`` on the offsets) over the offsets alone. A step
    sees its new classes' images many times more often than the earlier ones', which leaves
    the new classes' logits too high on the whole; one number per class removes that bias and
    nothing else. Classes with no validation image keep offset 0."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for b in batches:
            rows, offsets, counts, y = b.tensors(torch.device("cpu"))
            logits.append(model(rows, offsets, counts))
            labels.append(y)
    c = model.output_layer().out_features
    if not labels:
        return np.zeros(c, np.float32)
    z, y = torch.cat(logits).double(), torch.cat(labels)
    n = torch.bincount(y, minlength=c).double()
    present = n > 0
    w = torch.where(present, 1.0 / n.clamp(min=1), torch.zeros_like(n))
    free = torch.zeros(int(present.sum()), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([free], lr=1.0, max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        delta = torch.zeros(c, dtype=torch.float64).masked_scatter(present, free)
        loss = torch.nn.functional.cross_entropy(z + delta, y, weight=w, reduction="sum") / present.sum() + ridge * (free ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    centred = free.detach() - free.detach().mean()  # offsets of the classes present, summing to 0
    return torch.zeros(c, dtype=torch.float64).masked_scatter(present, centred).float().numpy()


def grown_vocabulary(parent: vocab_mod.Vocabulary, new: Shards, fraction: float, min_count: int, memory_mb: int | None,
                     progress: Callable[[int], None] | None = None) -> vocab_mod.Vocabulary:
    """The earlier vocabulary plus the new images' keys that reach ``min_count``."""
    counted = vocab_mod.build(functools.partial(new.part_keys, False, fraction), 1, 0, progress, memory_mb)
    keys = np.union1d(parent.keys, counted.keys[counted.counts >= min_count])
    counts = np.zeros(len(keys), np.int64)
    counts[np.searchsorted(keys, parent.keys)] += parent.counts
    seen = np.searchsorted(keys, counted.keys)
    inside = (seen < len(keys)) & (keys[np.minimum(seen, len(keys) - 1)] == counted.keys)
    counts[seen[inside]] += counted.counts[inside]
    stats = dict(parent.stats, vocabulary=int(len(keys)), rows=int(len(keys) + parent.buckets),
                 grown_from=int(parent.size), new_keys=int(len(keys) - parent.size),
                 step_distinct_keys=int(counted.stats.get("distinct_keys", counted.size)))
    return vocab_mod.Vocabulary(keys, counts, parent.buckets, min_count, stats)


def earlier_rows(parent: vocab_mod.Vocabulary, grown: vocab_mod.Vocabulary) -> np.ndarray:
    """The row in ``grown`` of each row of ``parent`` (own rows, then the buckets)."""
    return np.concatenate([np.searchsorted(grown.keys, parent.keys), grown.size + np.arange(parent.buckets)])


def initialise(model, parent: Parent, rows: np.ndarray) -> None:
    """Copy the earlier run's tensors into ``model``: table rows to their new places, the head's
    rows of the earlier classes; new rows and classes keep their fresh initialisation."""
    c_old = len(parent.class_names)
    last = "head.weight" if parent.config.hidden == 0 else "head.2.weight"
    state = model.state_dict()
    with torch.no_grad():
        for name, value in parent.weights.items():
            src = torch.from_numpy(np.array(value))
            dst = state[name]
            if name == "table.weight":
                dst[torch.from_numpy(rows)] = src
            elif name in (last, last.replace("weight", "bias")):
                dst[:c_old] = src
            elif dst.shape == src.shape:
                dst.copy_(src)
            else:
                raise PipelineError(f"{parent.root} holds {name} of shape {tuple(src.shape)}, which this step cannot grow from")


def merge_lookups(out: Path, parent: Parent, rows: np.ndarray, lookups: dict, num_classes: int, seed: int) -> dict:
    """Fold the earlier run's pattern table and image index into the ones written for the new images."""
    new_t = pq.read_table(out / layout.PATTERNS)
    old_t = pq.read_table(parent.root / layout.PATTERNS)
    n, own = new_t.num_rows, rows[: parent.vocab.size]
    at_old = np.full(n, -1, np.int64)
    at_old[own] = np.arange(len(own))
    old = at_old >= 0
    pick = np.where(old, at_old, np.arange(n) + old_t.num_rows)  # rows of concat(old, new) to take
    merged = {}
    for name in new_t.column_names:
        if name in ("pattern_id", "key", "count", "class_counts"):
            continue
        both = pa.concat_arrays([old_t.column(name).combine_chunks().cast(new_t.schema.field(name).type), new_t.column(name).combine_chunks()])
        merged[name] = both.take(pa.array(pick))
    cc = patterns.columns(new_t.select(["class_counts"]))["class_counts"]
    cc_old = patterns.columns(old_t.select(["class_counts"]))["class_counts"]
    cc[own, : cc_old.shape[1]] += cc_old
    table = pa.table({
        "pattern_id": new_t.column("pattern_id"), "key": new_t.column("key"),
        **{k: merged[k] for k in ("h", "w", "cell", "view", "atom")}, "count": new_t.column("count"),
        "class_counts": patterns.class_counts_column(cc.reshape(-1, num_classes)),
        **{k: merged[k] for k in ("example_image", "example_y", "example_x", "example_pixels")},
    })
    patterns.write(table, out / layout.PATTERNS)
    # the image index: the earlier images' vectors as they were, then the new images'
    old_info = pattern_index.IndexInfo.from_dict(parent.manifest["image_index"])
    old_idx = pattern_index.load(parent.root / layout.IMAGE_INDEX, old_info, gpu=False)
    new_info = pattern_index.IndexInfo.from_dict(lookups["image_index"])
    new_idx = pattern_index.load(out / layout.IMAGE_INDEX, new_info, gpu=False)
    vectors = np.concatenate([old_idx.reconstruct_n(0, old_idx.ntotal), new_idx.reconstruct_n(0, new_idx.ntotal)]).astype(np.float32)
    info = pattern_index.build(vectors, out / layout.IMAGE_INDEX, "flat", seed=seed)
    images = pa.concat_tables([pq.read_table(parent.root / layout.IMAGES), pq.read_table(out / layout.IMAGES)], promote_options="default")
    patterns.write(images, out / layout.IMAGES)
    return dict(lookups, image_index=info.to_dict())


def step_config(start: Path | str, **overrides) -> TrainConfig:
    """The settings of a step on top of ``start``: that run's, with ``overrides``."""
    return TrainConfig.from_dict({**load_parent(start).config.to_dict(), **overrides})


def step_images(shards: Shards, start: Path | str, replay: int, fraction: float) -> int:
    """How many images each epoch of a step trains on: the new shards' and the earlier ones chosen again."""
    p = load_parent(start)
    classes = merged_classes(p.class_names, shards.class_names)
    earlier, _ = choose_earlier(p.lineage, classes, shards.fingerprint, replay)
    return StepShards(shards, classes, earlier).count_training(fraction)
