"""Image folders of the two domains, their transforms, and deterministic step-indexed sampling.

Layout: ImageFolder, `DOMAIN/<class>/<image>`; classes are the sorted class-folder names (in
Unicode NFC), two at least. The target is labelled when its class folders are the source's,
and unlabelled when it is a flat folder of images or its subfolders share no name with the
source's classes (then every image below it is used); a target whose folders match only some
classes is an error. A domain folder whose only entry is an `images` folder (Office-31:
`amazon/images/<class>/...`) stands for that folder. Symlinked folders are followed, each
real folder once.

Images are files with an image extension (residual_store.images.EXTENSIONS, the formats the
server accepts); other files (Thumbs.db, notes.txt) are ignored and only counted. Every image
is decoded once up front with the server's decoder: a file it cannot read is skipped with one
warning and counted in the report. A file that breaks after the scan is skipped the same way when
training or evaluation reaches it (reported by the loader to the main process, which warns
once and counts it), so neither an epoch nor the evaluation crashes.

Sampling is a pure function of (seed, domain, step): the images and augmentation seeds of step
t do not depend on what ran before, so `--resume` reproduces an uninterrupted run exactly and
the worker count does not change the data. Each domain is walked through a fresh seeded
permutation after another; a domain smaller than a batch just spans several permutations.

Target labels never reach training: the target training set is a list of files ordered by
file name and content hash (not by class folder), without labels. Only the evaluation set,
built separately, reads the class folders.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import random
import signal
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

from residual_store import images
from residual_store.errors import one_line
from residual_store.preprocess import CLIP_MEAN, CLIP_STD, eval_transform
from trainer.errors import DataError

logger = logging.getLogger(__name__)

SOURCE, TARGET = 1, 2  # domain ids mixed into sampling seeds
_MASK64 = (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out because Pillow could not read it."""

    path: str
    reason: str


@dataclasses.dataclass
class Domain:
    """The readable images of one domain folder."""

    root: Path
    classes: list[str]  # class names (NFC), sorted; for an unlabelled target the source's
    files: list[Path]  # readable images, sorted by (class, relative path)
    labels: list[int] | None  # class index of each file; None: an unlabelled target
    digests: list[str]  # sha256 of each file's bytes
    skipped: list[Skipped]  # image files Pillow could not read
    ignored: int = 0  # files that are not images by their extension (Thumbs.db, notes.txt...)

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def nfc(name: str) -> str:
    """A class name in Unicode NFC: a folder named in NFD (macOS) is the same class."""
    return unicodedata.normalize("NFC", name)


def domain_root(root: Path, role: str) -> Path:
    """The folder holding a domain's images: `root`, or its only entry when that is an
    `images` folder (Office-31: DOMAIN/images/...). DataError when it is missing."""
    if not root.exists():
        raise DataError(f"{role} domain folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"{role} domain {str(root)!r} is not a folder")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].name == "images" and entries[0].is_dir():
        return entries[0]  # Office-31: DOMAIN/images/<class>/<image>
    return root


def _subfolders(root: Path) -> list[str]:
    """Non-hidden folder names in `root` (symlinked folders included), sorted by NFC name;
    DataError when two of them are one name in two Unicode forms."""
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(nfc(name), name)
        if other != name:
            raise DataError(f"folders {other!r} and {name!r} in {str(root)!r} are the same name "
                            "in two Unicode forms (NFC and NFD): merge or rename one")
    return sorted(names, key=nfc)


def class_folders(root: Path, role: str) -> tuple[Path, list[str]]:
    """(folder holding the classes, class-folder names as on disk, sorted by NFC name) of a
    labelled domain; DataError when it is missing or has fewer than 2 classes."""
    root = domain_root(root, role)
    classes = _subfolders(root)
    if not classes:
        raise DataError(f"{role} domain folder {str(root)!r} has no class folders: expected "
                        f"{root}/<class>/<image>")
    if len(classes) < 2:
        raise DataError(f"{role} domain folder {str(root)!r} has one class folder, {classes[0]!r}: "
                        f"expected {root}/<class>/<image> with 2 classes or more (is {str(root)!r} "
                        "a class folder rather than a domain?)")
    return root, classes


def target_folders(root: Path, source_classes: list[str], role: str = "target"
                   ) -> tuple[Path, list[str] | None]:
    """(folder of the target's images, its class folders or None when it is unlabelled).

    Labelled: its subfolders are the source's classes (in NFC). Unlabelled: a flat folder of
    images, or subfolders whose names share none of the source's classes (cameras, dates...);
    every image below it is read. Subfolders that match only some classes are an error: a
    typo must not quietly turn a labelled target into an unlabelled one."""
    root = domain_root(root, role)
    folders = _subfolders(root)
    names = [nfc(f) for f in folders]
    source = [nfc(c) for c in source_classes]
    if names == source:
        return root, folders
    if set(names) & set(source):
        check_same_classes(source, names)
    return root, None


def check_same_classes(source: list[str], target: list[str]) -> None:
    """One error listing every difference between the two domains' class folders."""
    source, target = [nfc(c) for c in source], [nfc(c) for c in target]
    if source == target:
        return
    only_s = sorted(set(source) - set(target))
    only_t = sorted(set(target) - set(source))
    raise DataError(f"class folders differ between domains: only in source {only_s}, "
                    f"only in target {only_t}")


def walk_files(top: Path, role: str) -> Iterator[Path]:
    """Every non-hidden file below `top`, sorted per folder, following symlinked folders once:
    a link back to a folder already walked (a loop, or a second link to it) is skipped with a
    warning naming it."""
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as e:
            logger.warning("skipping %s folder %s: %s", role, folder, one_line(e))
            return
        if (st.st_dev, st.st_ino) in seen:
            logger.warning("skipping symlinked %s folder %s: it leads to %s, which is already "
                           "scanned (a loop or a second link)", role, folder, folder.resolve())
            return
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .DS_Store, ._foo.jpg and friends are not data
            if entry.is_dir():
                yield from visit(entry)
            elif entry.is_file() or entry.is_symlink():  # a broken link is reported unreadable
                yield entry

    yield from visit(top)


def scan_domain(root: Path, classes: list[str] | None, role: str, workers: int = 0) -> Domain:
    """Decode every image file once: keep those Pillow can read, skip the rest with a warning.

    `classes`: the class-folder names (as on disk), or None for an unlabelled domain, whose
    images are every image file below `root`. Files that are not images by their extension
    (Thumbs.db, notes.txt) are left out quietly and only counted. Decoding is the slow part of
    a scan; Pillow releases the GIL while it decodes, so up to `workers` threads share it.
    """
    candidates: list[tuple[Path, int]] = []
    ignored: dict[str, int] = {}
    groups = [(root, -1)] if classes is None else [(root / c, i) for i, c in enumerate(classes)]
    for folder, label in groups:
        for path in walk_files(folder, role):
            if images.is_image_name(path):
                candidates.append((path, label))
            else:
                ext = path.suffix.lower() or "(none)"
                ignored[ext] = ignored.get(ext, 0) + 1
    if ignored:
        logger.info("%s domain %s: ignored %d files that are not images (%s)", role, root,
                    sum(ignored.values()), ", ".join(f"{k} {v}" for k, v in sorted(ignored.items())))
    paths = [path for path, _ in candidates]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # map() submits everything at once: in chunks, a 600k-image domain is not 600k futures
        checks = [c for i in range(0, len(paths), 1024)
                  for c in pool.map(_check_image, paths[i:i + 1024])]
    files, labels, digests, skipped = [], [], [], []
    for (path, label), (digest, reason) in zip(candidates, checks):
        if reason is not None:
            logger.warning("skipping unreadable %s image %s: %s", role, path, reason)
            skipped.append(Skipped(str(path), reason))
            continue
        files.append(path)
        labels.append(label)
        digests.append(digest)
    n_ignored = sum(ignored.values())
    if not files:
        raise DataError(f"{role} domain folder {str(root)!r} has no readable images "
                        f"({len(skipped)} unreadable image files skipped, {n_ignored} other files "
                        f"ignored; images are {images.FORMAT_NAMES} files, by extension)")
    names = [nfc(c) for c in classes] if classes is not None else []
    if classes is not None:
        present = set(labels)
        empty = [c for i, c in enumerate(names) if i not in present]
        if empty:
            logger.warning("%s domain %s has no images for classes %s", role, root, empty)
    return Domain(root, names, files, labels if classes is not None else None, digests, skipped,
                  n_ignored)


def _check_image(path: Path) -> tuple[str | None, str | None]:
    """(sha256 of the file, None) when Pillow decodes it completely, else (None, why not)."""
    try:
        data = path.read_bytes()
        images.decode_local(data)  # a truncated JPEG passes verify() and fails only here
        with images.open_image(data) as im:
            im.verify()  # checksums decoding does not look at (PNG chunk CRCs)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
        return None, one_line(e)
    return hashlib.sha256(data).hexdigest(), None


def load_domains(source_dir: Path, target_dir: Path, workers: int = 0) -> tuple[Domain, Domain]:
    """The labelled source and the target, labelled (its class folders are the source's) or
    not (see target_folders)."""
    source_dir, s_classes = class_folders(source_dir, "source")
    target_dir, t_classes = target_folders(target_dir, s_classes)
    source = scan_domain(source_dir, s_classes, "source", workers)
    target = scan_domain(target_dir, t_classes, "target", workers)
    if not target.labelled:
        target.classes = list(source.classes)
    return source, target


def display_names(classes: list[str], classes_file: Path | None) -> list[str]:
    """Class names shown to users and used in prompts: the folder names or --classes FILE
    (UTF-8, a byte-order mark allowed), in NFC; two equal names are refused."""
    if classes_file is None:
        names = [nfc(c) for c in classes]
    else:
        try:
            text = Path(classes_file).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"--classes {str(classes_file)!r} is not UTF-8 text (byte {e.start}: "
                            f"{e.reason}): save it as UTF-8, one name per line") from e
        names = [nfc(line.strip()) for line in text.splitlines() if line.strip()]
        if len(names) != len(classes):
            raise DataError(f"--classes {str(classes_file)!r} has {len(names)} names for "
                            f"{len(classes)} class folders ({', '.join(classes[:5])}...): one "
                            "name per line, in sorted folder order")
    twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if twice:
        where = f"--classes {str(classes_file)!r}" if classes_file else "the class folders"
        raise DataError(f"{where} name the same class twice ({', '.join(map(repr, twice))}): "
                        "each class needs its own name")
    return names


# -- transforms --------------------------------------------------------------------------------

def train_transform(size: int, hflip: bool = True, crop: str = "random",
                    crop_scale: tuple[float, float] = (0.08, 1.0)) -> transforms.Compose:
    """A training view at input size S (METHOD.md, scaled to S):

    - crop "random": resize to round(S*256/224) square, random crop S (the paper's recipe);
    - crop "random-resized": RandomResizedCrop(S, scale=crop_scale) (the authors' digits);
    - crop "none": resize to S square (the authors' VisDA);
    then a random horizontal flip when `hflip`.
    """
    steps: list = [transforms.Lambda(_to_rgb)]
    if crop == "random":
        steps += [transforms.Resize((round(size * 256 / 224),) * 2), transforms.RandomCrop(size)]
    elif crop == "random-resized":
        steps.append(transforms.RandomResizedCrop((size, size), scale=tuple(crop_scale)))
    elif crop == "none":
        steps.append(transforms.Resize((size, size)))
    else:
        raise ValueError(f"unknown crop {crop!r}: expected random, random-resized or none")
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def strong_transform(size: int, hflip: bool = True, crop: str = "random") -> transforms.Compose:
    """FixMatch's strong view as the authors build it: resize to round(S*256/224) and centre
    crop S (crop "none": resize to S), flip, colour jitter 0.4, then timm's RandAugment
    `rand-n2-m10-mstd0.5` (translations up to 0.45 S, fill with the CLIP mean). `hflip=False`
    also keeps the strong view unflipped (the authors flip it even for digits)."""
    from timm.data.auto_augment import rand_augment_transform

    resize = size if crop == "none" else round(size * 256 / 224)
    steps: list = [transforms.Lambda(_to_rgb), transforms.Resize((resize, resize)),
                   transforms.CenterCrop(size)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    fill = tuple(min(255, round(255 * m)) for m in CLIP_MEAN)
    steps += [transforms.ColorJitter(0.4, 0.4, 0.4, 0.0),
              rand_augment_transform("rand-n2-m10-mstd0.5",
                                     {"translate_const": int(size * 0.45), "img_mean": fill}),
              transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)]
    return transforms.Compose(steps)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _load(path: Path) -> Image.Image:
    """The image as 8-bit RGB, decoded as the server decodes uploads (residual_store.images)."""
    return images.read_image(path)


# -- datasets ----------------------------------------------------------------------------------

@contextlib.contextmanager
def seeded_augmentation(seed: int):
    """Every random source a view draws from seeded by `seed`, and restored afterwards:
    torchvision draws from torch, timm's RandAugment from `random` and numpy."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TrainImages(Dataset):
    """Training views of a list of files. Indexed by (file index, augmentation seed), so the
    random crop/flip of a sample is fixed by its seed, whatever process loads it.

    An item is `(views..., label), unreadable`: label only for the source domain, and
    `unreadable` the Skipped records of files that failed on the way (see `_read`).
    """

    def __init__(self, files: list[Path], labels: list[int] | None, views: list[transforms.Compose]):
        self.files = files
        self.labels = labels  # None for the target domain: it carries no labels at all
        self.views = views

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        index, image, unreadable = self._read(index)
        out = []
        with seeded_augmentation(seed):
            for view in self.views:
                out.append(view(image))
        if self.labels is not None:
            out.append(self.labels[index])
        return tuple(out), unreadable

    def _read(self, index: int) -> tuple[int, Image.Image, list[Skipped]]:
        """(index of the file read, its image, the files that failed before it)."""
        # A file that broke after the up-front scan is replaced by the next readable one, so
        # the batch keeps its size and stays the same on a rerun. A worker process cannot
        # count it in the report: it goes back with the item (see readable_batches).
        unreadable = []
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            path = self.files[i]
            try:
                return i, _load(path), unreadable
            except Exception as e:  # PIL raises many types
                unreadable.append(Skipped(str(path), one_line(e)))
        raise DataError(f"none of the {len(self.files)} images of the domain is readable any more "
                        f"(first: {unreadable[0].path}: {unreadable[0].reason})")


class EvalImages(Dataset):
    """Labelled evaluation images with the shared evaluation transform. An item is
    `(image, label), []`, or `None, [Skipped]` for a file that broke after the scan."""

    def __init__(self, domain: Domain, size: int):
        self.domain = domain
        self.transform = eval_transform(size)

    def __len__(self) -> int:
        return len(self.domain.files)

    def __getitem__(self, index: int):
        path = self.domain.files[index]
        try:
            image = _load(path)
        except Exception as e:  # PIL raises many types
            return None, [Skipped(str(path), one_line(e))]
        return (self.transform(image), self.domain.labels[index]), []  # type: ignore[index]


def collate_readable(items: list[tuple]) -> tuple[Any, list[Skipped]]:
    """(default_collate of the readable samples or None if there are none, the Skipped records)."""
    unreadable = [s for _, found in items for s in found]
    readable = [sample for sample, _ in items if sample is not None]
    return (default_collate(readable) if readable else None), unreadable


def readable_batches(loader: DataLoader, skipped: list[Skipped]) -> Iterator[Any]:
    """The loader's batches without unreadable files. Each file that failed is appended to
    `skipped` (the run's report) with one warning, however often it is sampled."""
    for batch, found in loader:
        if found:
            known = {s.path for s in skipped}
            for s in found:
                if s.path not in known:
                    known.add(s.path)
                    skipped.append(s)
                    logger.warning("skipping unreadable image %s: %s", s.path, s.reason)
        if batch is not None:
            yield batch


def target_training_order(domain: Domain) -> list[Path]:
    """Target files ordered by file name then content hash: independent of class folders."""
    order = sorted(range(len(domain.files)),
                   key=lambda i: (domain.files[i].name, domain.digests[i]))
    return [domain.files[i] for i in order]


# -- sampling ----------------------------------------------------------------------------------

def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & _MASK64


class StepSampler:
    """Batches of (file index, augmentation seed) for global steps [start, stop).

    Semantics: sample position p = step * batch + slot reads permutation k = p // n of the
    domain (seeded by seed, domain, stream, k) at p % n; its augmentation seed is
    mix(seed, domain, stream, step, slot).
    """

    def __init__(self, n: int, batch: int, seed: int, domain: int, start: int, stop: int,
                 stream: int = 0):
        self.n, self.batch, self.seed, self.domain = n, batch, seed, domain
        self.start, self.stop, self.stream = start, stop, stream
        self._perm_k, self._perm = -1, None

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch_at(step)

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        out = []
        for slot in range(self.batch):
            pos = step * self.batch + slot
            out.append((int(self._permutation(pos // self.n)[pos % self.n]),
                        _mix(self.seed, self.domain, self.stream, step, slot)))
        return out

    def _permutation(self, k: int) -> torch.Tensor:
        if k != self._perm_k:
            g = torch.Generator().manual_seed(_mix(self.seed, self.domain, self.stream, "perm", k))
            self._perm, self._perm_k = torch.randperm(self.n, generator=g), k
        return self._perm


def step_loader(dataset: Dataset, sampler: StepSampler, workers: int, pin: bool) -> DataLoader:
    """Batches `(samples, unreadable)`: read them through readable_batches."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=False, collate_fn=collate_readable,
                      worker_init_fn=_ignore_interrupts)


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C reaches the loader's workers too; a worker that died of it would fail the step the
    # main process finishes before it stops (trainer/interrupt.py).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_loader(domain: Domain, size: int, batch: int, workers: int) -> DataLoader:
    """Batches `((images, labels) or None, unreadable)`: read them through readable_batches."""
    return DataLoader(EvalImages(domain, size), batch_size=batch, shuffle=False,
                      num_workers=workers, collate_fn=collate_readable)
