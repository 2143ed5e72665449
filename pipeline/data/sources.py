"""Image sources: where images come from, streamed in batches of equal-sized uint8 arrays.

``open_source(spec)`` understands:

* ``digits``: scikit-learn's bundled 8x8 digits; train = first 898, test = last 899;
* a directory ``ROOT/<class>/<file>`` or ``ROOT/<split>/<class>/<file>``;
* a ``.tar`` / ``.tar.gz`` / ``.tgz`` of such a directory, read in memory (never unpacked);
* a CIFAR-10/100 python-batches directory (``data_batch_1`` ... or ``train``/``test``);
* an ``.npz`` with ``x`` (N x H x W [x C] uint8) and ``y`` (or ``x_<split>``/``y_<split>``).

Images are numbered (``image_id``) in source order: sorted paths for a folder,
archive order for a tar, stored order for arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline import layout
from pipeline.errors import ParameterError, PipelineError
from pipeline.data.images import MAX_FILE_BYTES, BadImage, as_nhwc, decode, fit_array, is_image_name, resize_array, to_channels

SPLITS = ("train", "test")


@dataclass
class Batch:
    """A batch of images from a source."""

    images: np.ndarray  # N x H x W x C uint8
    labels: np.ndarray  # int64 class index, -1 when unknown
    ids: np.ndarray  # int64 position in the source order
    names: list[str]  # where each image came from (file path or source:split:index)


@dataclass
class _Item:
    """One image before decoding: a label, a name, and a way to get its pixels."""

    index: int  # position in the source order (the image_id)
    label: int
    name: str
    load: Callable[[], bytes] | None = None  # encoded file bytes
    array: np.ndarray | None = None  # already decoded H x W x C
    ref: tuple | None = None  # where a worker can read the same bytes itself (see read_ref)


@dataclass
class RawImage:
    """One image as read from the source, not yet decoded; plain data, so it can go to a worker process."""

    index: int
    label: int
    name: str
    data: bytes | None = None  # encoded file
    array: np.ndarray | None = None  # already decoded H x W x C
    error: str | None = None  # why it could not even be read (then data and array are None)
    ref: tuple | None = None  # not read yet: where the bytes are (see read_ref)


def read_ref(ref: tuple) -> bytes:
    """The bytes a reference points at: ``("file", path)`` or ``("tar", archive, offset, size)``
    (a member of an uncompressed tar); raises BadImage when they cannot be read."""
    try:
        if ref[0] == "file":
            return read_regular_file(Path(ref[1]))
        _, archive, offset, size = ref
        if size > MAX_FILE_BYTES:
            raise BadImage(f"is {size:,} bytes, more than the {MAX_FILE_BYTES:,} an image file may have")
        with open(archive, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise BadImage(f"cannot open the file ({e.strerror})") from None
    if len(data) != size:
        raise BadImage(f"{archive} ends inside this member; the archive is truncated")
    return data


def read_regular_file(path: Path) -> bytes:
    """A regular file's bytes: FIFOs, devices (a link to /dev/zero) and oversized files are refused
    before anything is read, so they can neither hang nor exhaust memory."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BadImage("is not a regular file (a FIFO, device or directory)")
        if st.st_size > MAX_FILE_BYTES:
            raise BadImage(f"is {st.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} an image file may have")
        return f.read()


def decode_raw(raw: RawImage, channels: int | None, resize: tuple[int, int] | None) -> np.ndarray:
    """Pixels of ``raw`` as H x W x C uint8 in ``channels`` (None keeps the image's own); raises BadImage."""
    if raw.error is not None:
        raise BadImage(raw.error)
    if raw.array is not None:
        arr = as_nhwc(raw.array[None])
        arr = to_channels(arr, channels or (1 if arr.shape[-1] == 1 else 3))[0]
        return resize_array(arr, resize) if resize else arr
    return decode(raw.data if raw.data is not None else read_ref(raw.ref), channels, resize)


def decode_checked(
    raw: RawImage, channels: int, resize: tuple[int, int] | None, skip_bad: bool, size: tuple[int, ...] | None = None
) -> np.ndarray | None:
    """Pixels of ``raw``, or None when it is unreadable and ``skip_bad``; raises when unreadable otherwise,
    or when it is not ``size`` (height, width)."""
    try:
        arr = decode_raw(raw, channels, resize)
    except BadImage as e:
        if skip_bad:
            return None
        raise bad_image_error(raw.name, str(e)) from None
    if size is not None and arr.shape[:2] != tuple(size):
        raise size_error(raw.name, arr.shape, size)
    return arr


def bad_image_error(name: str, reason: str) -> PipelineError:
    return PipelineError(f"cannot read {name}: {reason}; fix or remove the file, or pass `skip_bad` to skip it")


def size_error(name: str, got: tuple[int, ...], size: tuple[int, ...]) -> PipelineError:
    return PipelineError(
        f"{name} is {got[0]}x{got[1]} but earlier images are {size[0]}x{size[1]}; "
        f"pass `resize` {size[0]}x{size[1]} to resize every image"
    )


@dataclass
class Source:
    """A readable set of labelled images; iterate with :meth:`batches`."""

    kind: str
    path: str
    split: str | None
    class_names: list[str]
    count: int
    _items: Callable[[], Iterator[_Item]] = field(repr=False)
    skip_bad: bool = False
    skipped: list[str] = field(default_factory=list)
    fitted: int = 0  # images of the last :meth:`batches` pass fitted to its ``fit`` size
    limit: int | None = None
    per_class: int | None = None
    holdout: float | None = None  # the share held out by name as split 'test' (:func:`held_out`)
    _identity: Callable[[], dict] | None = field(default=None, repr=False)
    _identity_cache: dict | None = field(default=None, repr=False)

    def identity(self) -> dict:
        """What identifies the source's content (see :func:`file_identity`); {} for in-memory images."""
        if self._identity_cache is None:
            self._identity_cache = self._identity() if self._identity else {}
        return self._identity_cache

    def describe(self) -> dict:
        """What the source is, enough for :func:`reopen` to read the same images again and to
        tell whether they are still the same (``identity``)."""
        where = self.path if self.kind in ("digits", "arrays") else str(Path(self.path).resolve())
        return {
            "kind": self.kind, "path": self.path, "split": self.split, "images": self.count,
            "location": where, "limit": self.limit, "per_class": self.per_class, "identity": self.identity(),
            **({"holdout": self.holdout} if self.holdout is not None else {}),
        }

    def __len__(self) -> int:
        return self.count

    def first_channels(self) -> int:
        """1 if the first image is grayscale, else 3 (used to resolve ``color='auto'``)."""
        for item in self._items():
            try:
                arr = self._decode(item, None, None)
            except BadImage as e:
                if self.skip_bad:
                    continue
                raise self._bad(item, e) from None
            return 1 if arr.shape[-1] == 1 else 3
        raise PipelineError(f"{self.path} holds no readable images; check the path and `split`")

    @staticmethod
    def _bad(item: _Item, e: BadImage) -> PipelineError:
        return bad_image_error(item.name, str(e))

    @staticmethod
    def _raw(item: _Item, by_reference: bool = False) -> RawImage:
        if item.array is not None:
            return RawImage(item.index, item.label, item.name, array=item.array)
        if by_reference and item.ref is not None:
            return RawImage(item.index, item.label, item.name, ref=item.ref)
        try:
            return RawImage(item.index, item.label, item.name, data=item.load())
        except BadImage as e:
            return RawImage(item.index, item.label, item.name, error=str(e))

    def _decode(self, item: _Item, channels: int | None, resize: tuple[int, int] | None) -> np.ndarray:
        return decode_raw(self._raw(item), channels, resize)

    def raw_images(
        self, wanted: Callable[[int], bool] | None = None, by_reference: bool = False
    ) -> Iterator[tuple[int, RawImage | None]]:
        """Yield (rank, image) for every image in source order; ``None`` where ``wanted(rank)`` is False.

        Nothing is decoded here: this is what a parallel extract hands to its workers. With
        ``by_reference``, files a worker can open itself (an image folder's files, the members
        of an uncompressed tar) are not even read: the image carries a reference
        (:func:`read_ref`) and the worker reads it. Arrays (digits, CIFAR batches, ``.npz``)
        and the members of a compressed tar (a stream read in order) come as data.
        """
        for rank, item in enumerate(self._items()):
            yield rank, (self._raw(item, by_reference) if wanted is None or wanted(rank) else None)

    def batches(
        self, batch_size: int, channels: int, resize: tuple[int, int] | None = None, start: int = 0,
        fit: tuple[int, int] | None = None,
    ) -> Iterator[Batch]:
        """Yield batches of ``batch_size`` images converted to ``channels`` (1 or 3), from ``start`` on.

        Images of a size different from the first raise :class:`PipelineError` naming the file,
        unless ``resize`` makes them equal, or ``fit`` (without ``resize``) fits each image of
        another size to it (:func:`pipeline.data.images.fit_array`; counted in :attr:`fitted`).
        Unreadable files raise, or with ``skip_bad`` are recorded in :attr:`skipped` and left out
        (later images keep their ids).
        """
        size = tuple(resize) if resize else None
        fit = None if resize else fit
        self.skipped = []  # each pass records its own skips
        self.fitted = 0
        imgs: list[np.ndarray] = []
        labels: list[int] = []
        ids: list[int] = []
        names: list[str] = []
        for item in self._items():
            if item.index < start:
                continue
            arr = decode_checked(self._raw(item), channels, resize, self.skip_bad, None if fit else size)
            if arr is None:
                self.skipped.append(item.name)
                continue
            if fit and arr.shape[:2] != tuple(fit):
                arr = fit_array(arr, fit)
                self.fitted += 1
            size = size or arr.shape[:2]
            imgs.append(arr)
            labels.append(item.label)
            ids.append(item.index)
            names.append(item.name)
            if len(imgs) == batch_size:
                yield Batch(np.stack(imgs), np.asarray(labels, np.int64), np.asarray(ids, np.int64), names)
                imgs, labels, ids, names = [], [], [], []
        if imgs:
            yield Batch(np.stack(imgs), np.asarray(labels, np.int64), np.asarray(ids, np.int64), names)


def held_out(names: list[str], share: float) -> np.ndarray:
    """True for the images of the held-out part: the first 8 bytes of ``blake2b(name)`` modulo 10,000
    below ``share * 10,000``; ``name`` is the image's path below its split folder (``class/file``)
    or, for arrays, its index, so the part depends on neither the archive's order nor its place."""
    cut = round(share * 10000)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(n.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little") % 10000 < cut
         for n in names), dtype=bool, count=len(names))


def _select(labels: np.ndarray, keep: np.ndarray, limit: int | None, per_class: int | None, names: list[str] | None) -> np.ndarray:
    """``keep`` narrowed to the first ``per_class`` images of each class, then the first ``limit``, counted
    in sorted-name order (``names``; the source's order for arrays, which have none)."""
    keep = keep.copy()
    order = np.arange(len(labels)) if names is None else np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
    if per_class is not None:
        seen: dict[int, int] = {}
        for i in order.tolist():
            if keep[i]:
                lab = int(labels[i])
                seen[lab] = seen.get(lab, 0) + 1
                keep[i] = seen[lab] <= per_class
    if limit is not None:
        kept = np.cumsum(keep[order])
        keep[order[kept > limit]] = False
    return keep


def open_source(
    spec: str,
    split: str | None = None,
    limit: int | None = None,
    per_class: int | None = None,
    skip_bad: bool = False,
    holdout: float | None = None,
) -> Source:
    """Open ``spec`` (``digits``, a folder, a tar, a CIFAR batches folder or an ``.npz``).

    ``split`` picks ``train`` or ``test`` where the source has them (default ``train``). A source
    with one split (or none) is divided by ``holdout`` instead: that share of its images, chosen
    by a hash of each image's name (:func:`held_out`), is ``test``, the rest ``train``.
    ``limit`` keeps the first N images, ``per_class`` the first N of each class, in sorted-name order.
    """
    if split is not None and split not in SPLITS:
        raise ParameterError("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ParameterError("limit", f"{limit} must be at least 1")
    if per_class is not None and per_class < 1:
        raise ParameterError("per_class", f"{per_class} must be at least 1")
    if holdout is not None and not 0 < holdout < 1:
        raise ParameterError("holdout", f"{holdout} must be a share between 0 and 1, e.g. 0.1")
    asked = split
    path = Path(spec)
    if spec == "digits" and not path.exists():
        _no_holdout(holdout, "digits", "train and test")
        kind, split, names, labels, items, files = _digits(split)
    elif not path.exists():
        raise PipelineError(f"source {spec!r} does not exist; give 'digits', an image folder, a .tar(.gz), a CIFAR batches folder or an .npz")
    elif path.is_dir() and (path / layout.MANIFEST).exists():
        raise PipelineError(f"{spec} is a shard directory, not an image source; pass the images it was extracted from")
    elif path.is_dir() and _is_cifar(path):
        _no_holdout(holdout, spec, "train and test batches")
        kind, split, names, labels, items, files = _cifar(path, split)
    elif path.is_dir():
        kind, split, names, labels, items, files = _folder(path, split, holdout is not None)
    elif path.name.endswith((".tar", ".tar.gz", ".tgz")):
        kind, split, names, labels, items, files = _tar(path, split, holdout is not None)
    elif path.suffix == ".npz":
        kind, split, names, labels, items, files = _npz(path, None if holdout is not None else split)
    else:
        raise PipelineError(f"{spec} is not a source I can read; give 'digits', an image folder, a .tar(.gz), a CIFAR batches folder or an .npz")

    labels = np.asarray(labels, dtype=np.int64)
    keep = np.ones(len(labels), dtype=bool)
    if holdout is not None:
        split = asked or "train"
        held = held_out(files if files is not None else [str(i) for i in range(len(labels))], holdout)
        keep = held if split == "test" else ~held
    keep = _select(labels, keep, limit, per_class, files)

    def make() -> Iterator[_Item]:
        return items(keep)

    count = int(keep.sum())
    if count == 0:
        raise PipelineError(f"{spec} holds no images{' in split ' + repr(split) if split else ''}; check the path and `split`")
    return Source(kind, str(spec), split, names, count, make, skip_bad=skip_bad, limit=limit, per_class=per_class,
                  holdout=holdout, _identity=lambda: _identity(kind, path))


def _no_holdout(holdout: float | None, where: str, splits: str) -> None:
    if holdout is not None:
        raise PipelineError(f"{where} has its own {splits}; choose one with `split` and leave out `holdout`")


def file_identity(path: Path) -> dict:
    """Size, modification time and SHA-256 of one file."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def _identity(kind: str, path: Path) -> dict:
    """A source's content identity: each archive or array file hashed whole; for an image folder,
    the names, sizes and modification times of its files (reading every image twice would
    double the cost of an extract)."""
    if kind == "digits":
        return {"digits": "scikit-learn load_digits"}
    if kind in ("tar", "npz"):
        return file_identity(path)
    h = hashlib.sha256()
    n = 0
    for dp, dirs, files in _walk(path):
        for f in sorted(files):
            full = Path(dp, f)
            try:
                st = full.stat()
            except OSError:
                continue
            if kind == "cifar":
                h.update(json.dumps([f, file_identity(full)["sha256"]]).encode())
            else:
                h.update(json.dumps([shown_name(str(full.relative_to(path))), st.st_size, st.st_mtime_ns]).encode())
            n += 1
    return {"files": n, "sha256": h.hexdigest()}


def reopen(described: dict) -> Source:
    """The source a manifest's ``source`` entry (:meth:`Source.describe`) was read from.

    Raises :class:`PipelineError` when it is gone or no longer holds the same number of images.
    """
    if described.get("kind") == "arrays":
        raise PipelineError("the images were passed in memory and were not saved")
    spec = described.get("location") or described["path"]
    if not (spec == "digits" or Path(spec).exists()):
        raise PipelineError(f"{spec} is no longer there")
    src = open_source(spec, described.get("split"), described.get("limit"), described.get("per_class"), skip_bad=True,
                      holdout=described.get("holdout"))
    if len(src) != described.get("images"):
        raise PipelineError(f"{spec} now holds {len(src)} images, not {described.get('images')}")
    if described.get("identity") and src.identity() != described["identity"]:
        raise PipelineError(f"{spec} has changed since the images were read from it")
    return src


def from_arrays(images: np.ndarray, labels: np.ndarray | None = None, class_names: list[str] | None = None, name: str = "arrays") -> Source:
    """A source over images already in memory (N x H x W [x C] uint8), e.g. for benchmarks and notebooks."""
    arr = as_nhwc(images)
    y = np.full(len(arr), -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(y) != len(arr):
        raise PipelineError(f"{len(arr)} images but {len(y)} labels")
    if len(arr) == 0:
        raise PipelineError("no images given")
    if class_names is None:
        class_names = [str(c) for c in range(int(y.max()) + 1)] if (y >= 0).any() else []

    def items() -> Iterator[_Item]:
        for i in range(len(arr)):
            yield _Item(i, int(y[i]), f"{name}:{i}", array=arr[i])

    return Source("arrays", name, None, list(class_names), len(arr), items)


# ------------------------------------------------------------------ digits

def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: images (N x 8 x 8, values 0..16) and targets. Read from the CSV
    scikit-learn ships, without importing it (importing it takes longer than the rest of a small
    run's reading); through ``load_digits`` where that file is not where it ships."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec and spec.submodule_search_locations else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def _digits(split: str | None):
    split = split or "train"
    images, y = digits_arrays()
    x = np.rint(images * 255 / 16).astype(np.uint8)
    sl = slice(0, 898) if split == "train" else slice(898, None)
    x, y = x[sl], y[sl]

    def items(keep: np.ndarray) -> Iterator[_Item]:
        for i in np.flatnonzero(keep):
            yield _Item(int(i), int(y[i]), f"digits:{split}:{i}", array=x[i])

    return "digits", split, [str(c) for c in range(10)], y, items, None


# ------------------------------------------------------------------ image folders and tars

def _labelled_paths(rel_paths: Iterable[str], where: str, split: str | None, by_name: bool = False):
    """Split-filter relative paths ``[wrapper/][split/]class/.../file``; returns (split, class names,
    [(path, class)], names), a name being the path below the split folder (``class/.../file``).
    With ``by_name`` (a share held out by name) the source's one split folder, if any, is read
    whatever ``split`` says, and a source with two is refused.

    The class of a file is the first folder below the root (below the split folder, where there
    is one), however deep the file sits inside it. A single top folder holding everything (a
    tar packed from its parent folder) is looked through. A folder whose images all sit at its
    top level, with no class folders, is a source of unlabelled images (class -1).
    """
    paths = []
    for rel in rel_paths:
        parts = PurePosixPath(rel).parts
        if not any(p.startswith(".") for p in parts):
            paths.append((rel, parts))
    while (paths and len({p[0] for _, p in paths}) == 1 and paths[0][1][0] not in SPLITS
           and all(len(p) >= 3 for _, p in paths)):
        paths = [(rel, p[1:]) for rel, p in paths]
    entries, loose = [], []
    for rel, parts in paths:
        if len(parts) < 2:
            if is_image_name(rel):
                loose.append(rel)
            continue  # other files at the top level carry no class (e.g. a README)
        if parts[0] in SPLITS and len(parts) >= 3:
            entries.append((rel, parts[0], shown_name(parts[1]), "/".join(parts[1:])))
        else:
            entries.append((rel, None, shown_name(parts[0]), "/".join(parts)))
    if loose and not entries:
        if split is not None and not by_name:
            raise PipelineError(f"{where} has no train/ or test/ folders; leave out `split` to read all of it, "
                                "or hold out a share of it by name with `holdout` 0.1")
        return None, [], [(rel, -1) for rel in loose], list(loose)
    if loose:
        raise PipelineError(f"{where} holds {len(loose)} images at its top level ({loose[0]}, ...) beside class folders; "
                            "move them into their class's folder, or query them as a folder of their own")
    present = sorted({e[1] for e in entries if e[1]})
    if by_name:
        if len(present) > 1:
            raise PipelineError(f"{where} has its own {' and '.join(present)} folders; choose one with `split` and leave out `holdout`")
        split = present[0] if present else None
    if split is not None and present and split not in present:
        raise PipelineError(f"{where} has no {split}/ folder; available: {', '.join(present)}; "
                            "to hold out a share of it by name, add `holdout` 0.1")
    if split is not None and not present:
        raise PipelineError(f"{where} has no train/ or test/ folders; leave out `split` to read all of it, "
                            "or hold out a share of it by name with `holdout` 0.1")
    chosen = split or ("train" if present else None)
    if chosen and present:
        entries = [e for e in entries if e[1] == chosen]
    classes = sorted({e[2] for e in entries})
    index = {c: i for i, c in enumerate(classes)}
    return chosen, classes, [(rel, index[c]) for rel, _, c, _ in entries], [e[3] for e in entries]


def shown_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by the OS as surrogates) shown as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` that follows links to folders (a class folder may be a link), each real folder once."""
    seen: set[str] = set()
    for dp, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dp)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield dp, dirs, files


def _check_image_name(rel: str, where: str) -> None:
    if not is_image_name(rel):
        raise BadImage(f"not an image file (unknown extension); remove it from {where}")


def _folder(root: Path, split: str | None, by_name: bool = False):
    rels = sorted(
        str(PurePosixPath(*Path(dp, f).relative_to(root).parts))
        for dp, _, files in _walk(root)
        for f in files
    )
    split, classes, entries, names = _labelled_paths(rels, str(root), split, by_name)

    def items(keep: np.ndarray) -> Iterator[_Item]:
        for i in np.flatnonzero(keep):
            rel, label = entries[i]
            full = root / rel

            def load(full=full, rel=rel) -> bytes:
                _check_image_name(rel, str(root))
                return read_ref(("file", str(full)))

            ref = ("file", os.path.abspath(full)) if is_image_name(rel) else None  # a bad name is reported by load
            yield _Item(int(i), label, shown_name(str(full)), load=load, ref=ref)

    return "folder", split, classes, [lab for _, lab in entries], items, names


def _safe_member(name: str, archive: Path) -> str:
    parts = name.split("/")  # tar member names always use '/'; plain string work keeps listing 50k members fast
    if name.startswith("/") or ".." in parts:
        raise PipelineError(f"{archive} holds an unsafe member path {name!r} (absolute or with '..'); refusing to read it")
    return "/".join(p for p in parts if p not in ("", "."))


def _plain_tar(archive: Path) -> bool:
    """True for an uncompressed tar, whose members can be read at their offsets in any order."""
    try:
        with open(archive, "rb") as f:
            head = f.read(6)
    except OSError:
        return False
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) and tarfile.is_tarfile(archive)


def _tar_members(archive: Path, plain: bool) -> Iterator[tuple[str, tarfile.TarFile, tarfile.TarInfo]]:
    """Members in archive order: an uncompressed tar (``plain``) is listed by seeking from header
    to header, a compressed one is read as a stream."""
    try:
        with tarfile.open(archive, "r:" if plain else "r|*") as tf:
            for m in tf:
                if m.isfile():
                    yield _safe_member(m.name, archive), tf, m
            end = tf.offset
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise PipelineError(f"{archive} is truncated or not a tar archive ({e}); download or pack it again") from None
    if plain and not _has_end_marker(archive, end):
        raise PipelineError(f"{archive} is truncated (it ends without the tar end-of-archive marker); download or pack it again")


def _has_end_marker(archive: Path, offset: int) -> bool:
    """True when a zero block follows the last member, as every tar writer ends an archive; a tar
    cut at a member boundary (a partial download) has nothing there."""
    with open(archive, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def _tar(archive: Path, split: str | None, by_name: bool = False):
    plain, where = _plain_tar(archive), os.path.abspath(archive)
    rels = [name for name, _, _ in _tar_members(archive, plain)]
    if len(set(rels)) != len(rels):
        seen: set[str] = set()
        twice = next(r for r in rels if r in seen or seen.add(r))
        raise PipelineError(f"{archive} holds the member {shown_name(twice)!r} more than once (a later copy hides the earlier one); "
                            "pack it again without duplicates")
    split, classes, entries, names = _labelled_paths(rels, str(archive), split, by_name)
    position = {name: i for i, (name, _) in enumerate(entries)}

    def items(keep: np.ndarray) -> Iterator[_Item]:
        left = int(keep.sum())
        for name, tf, m in _tar_members(archive, plain):
            if left == 0:
                return
            i = position.get(name)
            if i is None or not keep[i]:
                continue
            left -= 1
            ref = ("tar", where, m.offset_data, m.size) if plain and is_image_name(name) else None
            too_big = m.size > MAX_FILE_BYTES
            data = None if ref or too_big else tf.extractfile(m).read()  # a stream must be read now, in order
            if too_big and not ref:
                ref = ("tar", where, m.offset_data, m.size)  # read_ref refuses it by its size

            def load(data=data, ref=ref, name=name) -> bytes:
                _check_image_name(name, str(archive))
                return data if ref is None else read_ref(ref)

            yield _Item(i, entries[i][1], shown_name(f"{archive}:{name}"), load=load, ref=ref)

    return "tar", split, classes, [lab for _, lab in entries], items, names


# ------------------------------------------------------------------ CIFAR python batches

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: CIFAR batches need nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise PipelineError(f"{path} is not a readable CIFAR batch ({e}); download the python version again") from None
    if not isinstance(d, dict):
        raise PipelineError(f"{path} holds a {type(d).__name__}, not a CIFAR batch dict; download the python version again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _batch_part(path: Path, key: str) -> np.ndarray:
    """One entry of a CIFAR batch: ``data`` as N x 32 x 32 x 3 uint8, or a label list as a 1-D array."""
    d = _load_batch(path)
    if key not in d:
        raise PipelineError(f"{path} has no {key!r} entry; it is not a CIFAR batch: download the python version again")
    try:
        if key == "data":
            return np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.asarray(list(d[key]))
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{path}: its {key!r} entry is malformed ({e}); download the python version again") from None


def _is_cifar(path: Path) -> bool:
    return (path / "batches.meta").exists() or ((path / "meta").exists() and (path / "train").exists())


def _cifar(root: Path, split: str | None):
    split = split or "train"
    if (root / "batches.meta").exists():  # CIFAR-10
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _batch_part(root / "batches.meta", "label_names")]
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        label_key = "labels"
    else:  # CIFAR-100
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _batch_part(root / "meta", "fine_label_names")]
        files = [root / split]
        label_key = "fine_labels"
    files = [f for f in files if f.exists()]
    if not files:
        raise PipelineError(f"{root} has no {split} batches; check the folder or `split`")

    per_file = [check_labels(_batch_part(f, label_key), f"{f} {label_key}", classes) for f in files]
    labels = np.concatenate(per_file)

    def items(keep: np.ndarray) -> Iterator[_Item]:
        n = 0
        for f, lab in zip(files, per_file):
            x = _batch_part(f, "data")
            if len(x) != len(lab):
                raise PipelineError(f"{f} holds {len(x)} images but {len(lab)} labels; download the python version again")
            for i in range(len(x)):
                if keep[n]:
                    yield _Item(n, int(labels[n]), f"{root}:{split}:{n}", array=x[i])
                n += 1

    return "cifar", split, classes, labels, items, None


# ------------------------------------------------------------------ npz

def _npy_rows(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, Callable[[], Iterator[np.ndarray]]]:
    """Shape, dtype and a row iterator of one .npy inside a zip, read without loading it whole."""
    fmt = np.lib.format

    def header(f):
        version = fmt.read_magic(f)
        return fmt.read_array_header_1_0(f) if version == (1, 0) else fmt.read_array_header_2_0(f)

    with zf.open(member) as f:
        shape, fortran, dtype = header(f)
    if fortran:
        raise PipelineError(f"{member} is stored in Fortran order; save it with np.ascontiguousarray")

    def rows() -> Iterator[np.ndarray]:
        with zf.open(member) as f:
            header(f)
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for _ in range(shape[0]):
                yield np.frombuffer(f.read(row_bytes), dtype=dtype).reshape(shape[1:])

    return shape, dtype, rows


def _npz(path: Path, split: str | None):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PipelineError(f"{path} is not a readable .npz ({e}); save it with np.savez") from None
    names = set(zf.namelist())
    xk, yk = ("x", "y") if split is None else (f"x_{split}", f"y_{split}")
    if f"{xk}.npy" not in names or f"{yk}.npy" not in names:
        raise PipelineError(f"{path} has no arrays {xk!r} and {yk!r}; save images as {xk}= and labels as {yk}=")
    shape, dtype, rows = _npy_rows(zf, f"{xk}.npy")
    if dtype != np.uint8 or len(shape) not in (3, 4):
        raise PipelineError(f"{path}: {xk} must be uint8 N x H x W or N x H x W x C, got {dtype} {shape}")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw_y = np.asarray(z[yk])
            classes = [str(c) for c in z["class_names"]] if "class_names.npy" in names else None
    except (ValueError, OSError, zipfile.BadZipFile, zlib.error) as e:
        raise PipelineError(f"{path}: cannot read {yk} or class_names ({e}); save plain numeric arrays with np.savez") from None
    y = check_labels(raw_y, f"{path}: {yk}", classes)
    if len(y) != shape[0]:
        raise PipelineError(f"{path}: {xk} has {shape[0]} images but {yk} has {len(y)} labels")
    if classes is None:
        classes = [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]

    def items(keep: np.ndarray) -> Iterator[_Item]:
        for i, row in enumerate(rows()):
            if keep[i]:
                yield _Item(i, int(y[i]), f"{path}:{xk}:{i}", array=row)

    return "npz", split, classes, y, items, None


MAX_CLASSES = 1 << 16  # without class names, labels above this are taken for a mistake, not for classes


def check_labels(labels, where: str, class_names: list[str] | None) -> np.ndarray:
    """Labels as int64: one whole number per image, -1 for unknown, each below the number of
    ``class_names`` (or :data:`MAX_CLASSES` without them); anything else is refused in one line."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise PipelineError(f"{where} must hold one label per image (1-D), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise PipelineError(f"{where} holds labels that are not whole numbers; labels are class indices 0, 1, ... (-1 = unknown)")
    elif y.dtype.kind not in "iub":
        raise PipelineError(f"{where} holds {y.dtype} labels; labels are integer class indices 0, 1, ... (-1 = unknown)")
    y = y.astype(np.int64)
    if (y < -1).any():
        raise PipelineError(f"{where} holds the label {int(y.min())}; labels are class indices 0, 1, ..., and -1 for unknown")
    bound = len(class_names) if class_names is not None else MAX_CLASSES
    if len(y) and y.max() >= bound:
        what = f"only {bound} class names" if class_names is not None else f"the most this tool takes without class_names ({bound:,})"
        raise PipelineError(f"{where} holds the label {int(y.max())}, past {what}; relabel the classes 0 .. C-1 or fix class_names")
    return y
