"""Learning one image in a loaded run, in memory: a person's correction of a wrong answer.

``learn(run, image, "cat")`` changes exactly two things and answers the image as ``cat``:

* the rows of the image's own patterns (the keys with a row of their own; a shared bucket
  row and a pattern without a row stay as they are) move by gradient steps on the image's
  cross-entropy for the taught class, each row's step divided by how often its pattern
  occurred in training: of all the changes that move the image's pooled vector the same way,
  this one disturbs the training images least, since a pattern many of them share moves
  little and one the image nearly alone holds moves most;
* a class the run does not know gets a head row: imprinted (Qi, Brown & Lowe 2018), i.e. the
  direction from the training images' mean to this image in the head's input space, with
  the norm of the other classes' rows and the bias that ties it with the image's best class.

The steps stop once the taught class has probability :data:`TARGET` or more (the answer a
person sees), or after :data:`STEPS`. Every other table row and every known class's head
row are bit-identical afterwards, so another image's answer moves only through the patterns
it shares with the taught one. The image is pooled as the run predicts it (its patches with a
row; unseen ones left out; with the run's mirror vote, its patches and its mirror's as one bag,
so the mirror's patterns are among the image's own here). Nothing on disk changes: :mod:`pipeline.teach.save` writes a new
run with the lessons.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError
from pipeline.table import pooling
from pipeline.table.vocab import pattern_stats

TARGET = 0.6  # the taught class's probability at which the steps stop
STEPS = 400  # at most this many steps
STEP = 0.02  # each step moves the pooled vector by this fraction of its length
IMPRINT_MARGIN = 1.0  # a new class starts this far (in logit) below the image's best class; its rows close the gap
MAX_CLASS_NAME = 64  # characters of a new class's name


@dataclass
class Lesson:
    """One image a run was taught: what :mod:`pipeline.teach.save` writes."""

    name: str
    label: str
    image: np.ndarray  # H x W x C uint8, as the run reads it
    keys: np.ndarray  # K uint64
    weights: np.ndarray | None  # K float32 (a code view's), or None
    before: dict  # the run's answer before: {"prediction", "probability"}
    after: dict  # and after
    steps: int
    rows: int  # table rows moved
    new_class: bool


def check_label(label: str) -> str:
    """A class name a person typed: refused when empty, too long or holding control characters."""
    label = str(label).strip()
    if not label or len(label) > MAX_CLASS_NAME or any(ord(ch) < 32 or ord(ch) == 127 for ch in label):
        raise PipelineError(f"label {label[:80]!r} must be a class name of 1 to {MAX_CLASS_NAME} printable characters")
    return label


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, the last layer's input) of one pooled vector."""
    f = x
    for w, b in layers[:-1]:
        f = np.maximum(w @ f + b, 0)
    return layers[-1][0] @ f + layers[-1][1], f


def _softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max())
    return p / p.sum()


def _grad_pooled(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(gradient of -log p_c with respect to the pooled vector, probabilities)."""
    if len(layers) == 1:
        p = _softmax(layers[0][0] @ x + layers[0][1])
        e = p.copy()
        e[c] -= 1
        return layers[0][0].T @ e, p
    (w1, b1), (w2, b2) = layers
    a = w1 @ x + b1
    p = _softmax(w2 @ np.maximum(a, 0) + b2)
    e = p.copy()
    e[c] -= 1
    return w1.T @ ((w2.T @ e) * (a > 0)), p


def _training_mean(run) -> np.ndarray:
    """The mean of the head's input over the training images of the image index."""
    idx = run.training_images.index
    n = idx.ntotal
    vectors = idx.reconstruct_n(0, n) if n else np.zeros((1, run.train_config.dim), np.float32)
    f = vectors.astype(np.float64)
    for w, b in run.classifier.head_layers[:-1]:
        f = np.maximum(f @ w.T + b, 0)
    return f.mean(0)


def _imprint(run, layers: list, x: np.ndarray) -> list:
    """``layers`` with one more class: its last-layer row points from the training images' mean to
    the image (in the last layer's input space), as long as the other rows on average, and its
    bias puts its logit on the image :data:`IMPRINT_MARGIN` below the best class's."""
    z, f = _forward(layers, x)
    w, b = layers[-1]
    direction = f - _training_mean(run)
    norm = np.linalg.norm(direction)
    row = (direction / norm if norm > 0 else np.zeros_like(f)) * float(np.linalg.norm(w, axis=1).mean())
    bias = float(z.max() - row @ f) - IMPRINT_MARGIN
    return layers[:-1] + [(np.vstack([w, row[None]]).astype(np.float32), np.append(b, bias).astype(np.float32))]


def learn(run, image: np.ndarray, label: str, name: str = "image", by_count: bool = True) -> Lesson:
    """Teach ``run`` (loaded) that ``image`` (H x W x C uint8 at the run's size) is ``label`` (a class
    name, known or new); returns the :class:`Lesson`. The run answers from the new state at once.
    ``by_count`` = False takes plain gradient steps instead (a row's step in proportion to its share
    of the image alone, not divided by its training count): the baseline benchmarks/teach.py
    compares with."""
    label = check_label(label)
    keys, weights, vote_keys, vote_weights = run.scoring_keys(image)
    rows, offsets, counts = run.vocab.bags(vote_keys, vote_weights)
    own = (rows < run.vocab.size) & (counts > 0)  # a pattern weighing nothing in the image cannot move it
    if not own.any():
        raise PipelineError(f"{name}: none of its patterns has a learned row, so there is nothing of it to update "
                            "(its patterns were never seen in training)")
    total = pooling.bag_totals(counts, offsets)
    share = (counts / pooling.divisor(total, run.train_config.bag)[0]).astype(np.float64)  # each row's weight in the pooled vector
    table = run.table.vectors
    moving = rows[own]
    v = table[moving].astype(np.float64)
    fixed = share[~own] @ table[rows[~own]].astype(np.float64) if (~own).any() else np.zeros(table.shape[1])
    a = share[own]
    scale = a / np.maximum(run.vocab.counts[moving], 1) if by_count else a  # a row's step: its share over its training count
    layers = [(w.astype(np.float64), b.astype(np.float64)) for w, b in run.classifier.head_layers]
    classes = list(run.class_names)
    new_class = label not in classes
    x = a @ v + fixed
    p0 = _softmax(_forward(layers, x)[0])
    before = {"prediction": classes[int(p0.argmax())], "probability": float(p0.max())}
    if new_class:
        classes.append(label)
        layers = [(w.astype(np.float64), b.astype(np.float64)) for w, b in _imprint(run, layers, x)]
    c = classes.index(label)
    length = max(float(np.linalg.norm(x)), 1e-6)
    steps = 0
    for steps in range(STEPS + 1):
        x = a @ v + fixed
        g, p = _grad_pooled(layers, x, c)
        if (p[c] >= TARGET and p.argmax() == c) or steps == STEPS or not np.any(g):
            break
        # preconditioned gradient step on the rows (dL/dv_r = a_r g, divided by the row's count),
        # sized so that the pooled vector moves by STEP of its length
        eta = STEP * length / (np.linalg.norm(g) * (a @ scale))
        v -= eta * scale[:, None] * g[None]
    after = {"prediction": classes[int(p.argmax())], "probability": float(p.max())}
    new_rows = v.astype(np.float32)
    changed = np.any(new_rows != table[moving], axis=1)
    cc = pattern_stats(run.vocab, [(keys, np.full(1, c, np.int64), np.zeros(1, np.int64))], len(classes))["class_counts"]
    run.learned(moving[changed], new_rows[changed], [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers], classes, cc)
    return Lesson(name, label, np.asarray(image), keys[0], None if weights is None else weights[0], before, after, steps,
                  int(changed.sum()), new_class)
