"""Image folders of the two domains, their transforms, and deterministic step-indexed sampling.

Layout: ImageFolder, `DOMAIN/<class>/<image>`; classes are the sorted class-folder names and
must be the same in both domains. Every file is checked once up front: a file Pillow cannot
read is skipped with one warning and counted in the report, so an epoch never crashes on it.

Sampling is a pure function of (seed, domain, step): the images and augmentation seeds of step
t do not depend on what ran before, so `--resume` reproduces an uninterrupted run exactly and
the worker count does not change the data. Each domain is walked through a fresh seeded
permutation after another; a domain smaller than a batch just spans several permutations.

Target labels never reach training: the target training set is a list of files ordered by
file name and content hash (not by class folder), without labels. Only the evaluation set,
built separately, reads the class folders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

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
    classes: list[str]  # sorted class-folder names
    files: list[Path]  # readable images, sorted by (class, relative path)
    labels: list[int]  # class index of each file (evaluation and source training only)
    digests: list[str]  # sha256 of each file's bytes
    skipped: list[Skipped]


def class_folders(root: Path, role: str) -> list[str]:
    """Sorted class-folder names of a domain; DataError when missing or empty."""
    if not root.exists():
        raise DataError(f"{role} domain folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"{role} domain {str(root)!r} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{role} domain folder {str(root)!r} has no class folders: expected "
                        f"{root}/<class>/<image>")
    return classes


def check_same_classes(source: list[str], target: list[str]) -> None:
    """One error listing every difference between the two domains' class folders."""
    if source == target:
        return
    only_s = sorted(set(source) - set(target))
    only_t = sorted(set(target) - set(source))
    raise DataError(f"class folders differ between domains: only in source {only_s}, "
                    f"only in target {only_t}")


def scan_domain(root: Path, classes: list[str], role: str) -> Domain:
    """Read every file once: keep the images Pillow can open, skip the rest with a warning."""
    files, labels, digests, skipped = [], [], [], []
    for label, cls in enumerate(classes):
        for path in sorted(p for p in (root / cls).rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue  # .DS_Store, ._foo.jpg and friends are not data
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError)
                reason = " ".join(str(e).split()) or type(e).__name__
                logger.warning("skipping unreadable %s image %s: %s", role, path, reason)
                skipped.append(Skipped(str(path), reason))
                continue
            files.append(path)
            labels.append(label)
            digests.append(hashlib.sha256(data).hexdigest())
    if not files:
        raise DataError(f"{role} domain folder {str(root)!r} has no readable images "
                        f"({len(skipped)} unreadable files skipped)")
    present = set(labels)
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        logger.warning("%s domain %s has no images for classes %s", role, root, empty)
    return Domain(root, classes, files, labels, digests, skipped)


def load_domains(source_dir: Path, target_dir: Path) -> tuple[Domain, Domain]:
    s_classes = class_folders(source_dir, "source")
    t_classes = class_folders(target_dir, "target")
    check_same_classes(s_classes, t_classes)
    return scan_domain(source_dir, s_classes, "source"), scan_domain(target_dir, t_classes, "target")


def display_names(classes: list[str], classes_file: Path | None) -> list[str]:
    """Class names shown to users and used in prompts: the folder names or --classes FILE."""
    if classes_file is None:
        return list(classes)
    names = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
    if len(names) != len(classes):
        raise DataError(f"--classes {str(classes_file)!r} has {len(names)} names for "
                        f"{len(classes)} class folders ({', '.join(classes[:5])}...): one name "
                        "per line, in sorted folder order")
    return names


# -- transforms --------------------------------------------------------------------------------

def train_transform(size: int) -> transforms.Compose:
    """METHOD.md's train recipe scaled to input size S: resize round(S*256/224), crop S, flip."""
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((round(size * 256 / 224),) * 2),
        transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def strong_transform(size: int) -> transforms.Compose:
    """FixMatch's strong view: the train recipe plus colour jitter 0.4 and RandAugment(2, 10)."""
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((round(size * 256 / 224),) * 2),
        transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.4, 0.4, 0.4),
        transforms.RandAugment(num_ops=2, magnitude=10),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")  # a loaded copy, so the file can close


# -- datasets ----------------------------------------------------------------------------------

class TrainImages(Dataset):
    """Training views of a list of files. Indexed by (file index, augmentation seed), so the
    random crop/flip of a sample is fixed by its seed, whatever process loads it."""

    def __init__(self, files: list[Path], labels: list[int] | None, views: list[transforms.Compose]):
        self.files = files
        self.labels = labels  # None for the target domain: it carries no labels at all
        self.views = views
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image = self._read(index)
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for view in self.views:
                out.append(view(image))
        if self.labels is not None:
            out.append(self.labels[index])
        return tuple(out)

    def _read(self, index: int) -> Image.Image:
        # The up-front scan verified every file; one that broke since is replaced by its
        # neighbour (deterministically) rather than crashing the epoch.
        for k in range(len(self.files)):
            path = self.files[(index + k) % len(self.files)]
            try:
                return _load(path)
            except Exception as e:  # PIL raises many types
                if path not in self._warned:  # once per file, not once per epoch
                    self._warned.add(path)
                    logger.warning("skipping unreadable image %s: %s", path, e)
        raise DataError("no image of the domain is readable any more")


class EvalImages(Dataset):
    """Labelled evaluation images with the shared evaluation transform."""

    def __init__(self, domain: Domain, size: int):
        self.domain = domain
        self.transform = eval_transform(size)

    def __len__(self) -> int:
        return len(self.domain.files)

    def __getitem__(self, index: int):
        return self.transform(_load(self.domain.files[index])), self.domain.labels[index]


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
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=False)


def eval_loader(domain: Domain, size: int, batch: int, workers: int) -> DataLoader:
    return DataLoader(EvalImages(domain, size), batch_size=batch, shuffle=False,
                      num_workers=workers)
