"""Real image/mask collections in, as cases and as the corpus's `Sample` form.

    task = read_task("../shared/data/CHASE_DB1/pairs.csv")   # or a folder holding images/ and masks/
    for sample in ingest_samples(task, "fundus", splits=["train"]):
        ...

A task is either
- a manifest CSV with columns `image,mask,fov,split` (extra columns ignored; paths relative to the CSV;
  `fov` may be missing or empty; `split` one of train/val/test/none, an empty split meaning none), or
- a folder with `images/` and `masks/` (and optionally `fov/`) whose files pair up by file stem; every
  case gets split `none`. A mask or FOV file may add a suffix to its image's stem after `_`, `-` or `.`
  (`Image_01L_1stHO.png`, `1_gt.pgm`, `im0001.ah.ppm`, `21_training_mask.gif`), as public sets name them,
  as long as each file then has exactly one image.

Case names are the image file stems; where stems repeat (CIMAT_XCA80 reuses 1..40 in train/ and test/)
every name gets as many parent folders as it takes to tell them apart, joined by `_` (`train_1`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_engine.corpus import Sample
from data_engine.io import IMAGE_SUFFIXES, read_image, read_mask

SPLITS: tuple[str, ...] = ("train", "val", "test", "none")
_REQUIRED_COLUMNS = ("image", "mask")


@dataclass(frozen=True)
class Case:
    """One labelled image of a task; paths are absolute."""

    name: str  # unique within the task; letters, digits, '_', '-', '.' as in the file names
    image_path: Path
    mask_path: Path
    fov_path: Path | None  # field-of-view mask, or None
    split: str  # one of SPLITS


@dataclass(frozen=True)
class Task:
    """A real collection: its name (the folder's name), its root folder and its cases, in file order."""

    name: str
    root: Path
    cases: list[Case] = field(default_factory=list)

    def split(self, split: str) -> list[Case]:
        """The cases of one split."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} must be one of {', '.join(SPLITS)}")
        return [c for c in self.cases if c.split == split]


def read_task(path: str | Path) -> Task:
    """Read a task from a manifest CSV or from a folder with images/ and masks/ (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such task manifest or folder")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(
            f"{path}: a task is a .csv manifest (image,mask,fov,split) or a folder with images/ and masks/"
        )
    return _read_csv(path)


def _read_csv(csv_path: Path) -> Task:
    root = csv_path.resolve().parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as e:
        raise ValueError(f"{csv_path}: not UTF-8 text ({e})") from e
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{csv_path}, line 1: missing column(s) {', '.join(missing)}; the header must hold image,mask "
            f"(and optionally fov,split), got {','.join(columns) or 'nothing'}"
        )
    reader.fieldnames = columns
    rows: list[tuple[int, Path, Path, Path | None, str]] = []
    for row in reader:
        line = reader.line_num
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not any(values.values()):
            continue  # blank line
        where = f"{csv_path}, line {line}"
        split = values.get("split", "").lower() or "none"
        if split not in SPLITS:
            raise ValueError(f"{where}: split {values.get('split')!r} must be one of {', '.join(SPLITS)}")
        image = _existing(root, values.get("image", ""), "image", where, required=True)
        mask = _existing(root, values.get("mask", ""), "mask", where, required=True)
        fov = _existing(root, values.get("fov", ""), "fov", where, required=False)
        assert image is not None and mask is not None
        rows.append((line, image, mask, fov, split))
    if not rows:
        raise ValueError(f"{csv_path}: no cases (the manifest has a header but no rows)")
    seen: dict[Path, int] = {}
    for line, image, *_ in rows:
        if image in seen:
            raise ValueError(
                f"{csv_path}, line {line}: image {image} is already listed on line {seen[image]}"
            )
        seen[image] = line
    names = _unique_names([image for _, image, *_ in rows], root)
    cases = [
        Case(name=name, image_path=image, mask_path=mask, fov_path=fov, split=split)
        for name, (_, image, mask, fov, split) in zip(names, rows, strict=True)
    ]
    return Task(name=root.name, root=root, cases=cases)


def _existing(root: Path, value: str, column: str, where: str, required: bool) -> Path | None:
    if not value:
        if required:
            raise ValueError(f"{where}: column {column} is empty; give a path relative to the CSV")
        return None
    resolved = (root / value).resolve()
    if not resolved.is_file():
        raise ValueError(f"{where}: {column} file {value} not found (looked for {resolved})")
    return resolved


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem, hidden and non-image files skipped; a repeated stem is an error."""
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in by_stem:
            raise ValueError(
                f"{folder}: two files share the stem {p.stem!r} ({by_stem[p.stem].name}, {p.name})"
            )
        by_stem[p.stem] = p.resolve()
    return by_stem


# Unpaired files named in an error before the rest are counted (a 1,000-image set stays readable).
_MAX_NAMED = 5


_SUFFIX_SEPARATORS = ("_", "-", ".")


def _by_image_stem(files: dict[str, Path], images: dict[str, Path], folder: Path) -> dict[str, Path]:
    """`files` (masks or FOVs by stem) keyed by the image stem each belongs to: its own stem where an image
    has it, else the longest image stem it extends after a separator (`Image_01L_1stHO` -> `Image_01L`).
    Files that match no image keep their stem (the caller lists them as unpaired); two files for one image
    are an error naming both."""
    paired: dict[str, Path] = {}
    for stem, path in files.items():
        owner = stem
        if stem not in images:  # the longest image stem it extends: cut at separators from the right
            cuts = (k for k in range(len(stem) - 1, 0, -1) if stem[k] in _SUFFIX_SEPARATORS)
            owner = next((stem[:k] for k in cuts if stem[:k] in images), stem)
        if owner in paired:
            raise ValueError(
                f"{folder}: two files belong to the image {images[owner].name}: {paired[owner].name} and "
                f"{path.name} (e.g. two annotators' masks); keep one, or list the pairs in a CSV "
                "(image,mask,fov,split) and pass that instead"
            )
        paired[owner] = path
    return paired


def _read_folder(root: Path) -> Task:
    root = root.resolve()
    images_dir, masks_dir, fov_dir = root / "images", root / "masks", root / "fov"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise ValueError(
            f"{root}: a task folder needs images/ and masks/ subfolders (optional fov/), "
            "or pass its .csv manifest instead"
        )
    images, masks = _image_files(images_dir), _image_files(masks_dir)
    fovs = _image_files(fov_dir) if fov_dir.is_dir() else {}
    masks = _by_image_stem(masks, images, masks_dir)
    fovs = _by_image_stem(fovs, images, fov_dir)
    problems = []
    for what, files, others, other_dir in (
        ("images without a mask", images, masks, masks_dir),
        ("masks without an image", masks, images, images_dir),
        ("fov files without an image", fovs, images, images_dir),
    ):
        unpaired = sorted(set(files) - set(others))
        if unpaired:
            names = ", ".join(files[s].name for s in unpaired[:_MAX_NAMED])
            more = f" and {len(unpaired) - _MAX_NAMED} more" if len(unpaired) > _MAX_NAMED else ""
            problems.append(f"{what} in {other_dir}: {names}{more}")
    if problems:
        raise ValueError(
            f"{root}: files do not pair up by stem; " + "; ".join(problems) + ". Give each mask its "
            "image's name (a suffix after _, - or . may follow it: Image_01L_1stHO.png for Image_01L.jpg), "
            "or list the pairs in a CSV (image,mask,fov,split; paths relative to it) and pass that instead"
        )
    if not images:
        raise ValueError(f"{root}: {images_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    cases = [Case(stem, images[stem], masks[stem], fovs.get(stem), "none") for stem in sorted(images)]
    return Task(name=root.name, root=root, cases=cases)


def _unique_names(image_paths: list[Path], root: Path) -> list[str]:
    """File stems, prefixed by as many parent folders (joined by '_') as it takes to make them unique."""
    parts = []
    for p in image_paths:
        try:
            rel = p.relative_to(root)
        except ValueError:  # an image outside the task root: its absolute path tells it apart
            rel = Path(*p.parts[1:])
        parts.append((*rel.parent.parts, rel.stem))
    longest = max(len(q) for q in parts)
    for depth in range(1, longest + 1):
        names = ["_".join(q[-depth:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    raise AssertionError("distinct image paths always give distinct names")  # paths were deduplicated


def unlabelled_images(path: str | Path) -> tuple[str, list[tuple[str, Path, Path | None]]]:
    """Images to use without their labels: (a one-line description, [(name, image path, fov path or None)]).

    `path` is a task (manifest CSV, or a folder with images/ and masks/): its cases outside the test split,
    with their FOVs, masks never read; or a folder of image files (directly in it, or in its images/
    subfolder), without FOVs. Names are the task's case names, or the file stems.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such task manifest or image folder")
    if path.is_file() or (path / "masks").is_dir():
        task = read_task(path)
        kept = [c for c in task.cases if c.split != "test"]
        if not kept:
            raise ValueError(
                f"{path}: every case of {task.name} is in its test split; no image is left to use"
            )
        splits = "+".join(s for s in SPLITS if any(c.split == s for c in kept))
        return (
            f"{task.name} ({len(kept)} image(s) of its {splits} split, labels never read)",
            [(c.name, c.image_path, c.fov_path) for c in kept],
        )
    folder = path / "images" if (path / "images").is_dir() else path
    files = _image_files(folder)
    if not files:
        raise ValueError(f"{folder}: holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return f"{folder} ({len(files)} image(s))", [(stem, p, None) for stem, p in files.items()]


def load_case(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image uint8 HxW or HxWx3 BGR, mask uint8 HxW {0,255}, fov uint8 HxW {0,255} or None), checked.

    Raises ValueError naming the files when the image, mask and fov sizes differ or the mask is empty.
    """
    image = read_image(case.image_path)
    mask = read_mask(case.mask_path)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"case {case.name}: mask {case.mask_path} is {mask.shape[1]}x{mask.shape[0]} px but image "
            f"{case.image_path} is {image.shape[1]}x{image.shape[0]} px (width x height); they must match"
        )
    if not mask.any():
        raise ValueError(
            f"case {case.name}: mask {case.mask_path} is empty (no pixel above half its maximum)"
        )
    fov = None
    if case.fov_path is not None:
        fov = read_mask(case.fov_path)
        if fov.shape != mask.shape:
            raise ValueError(
                f"case {case.name}: fov {case.fov_path} is {fov.shape[1]}x{fov.shape[0]} px but image "
                f"{case.image_path} is {image.shape[1]}x{image.shape[0]} px (width x height); they must match"
            )
    return image, mask, fov


def _licence(root: Path) -> str:
    source = root / "SOURCE.md"
    return f"research use only, see {source}" if source.is_file() else "unknown: see the data set's terms"


def ingest_samples(task: Task, modality: str, splits: Iterable[str] | None = None) -> Iterator[Sample]:
    """The task's cases (all, or those in `splits`) as `Sample`s, in case order.

    `modality` is any name: a real task may bring one the corpus never had (e.g. 'ultrasound').
    """
    if not isinstance(modality, str) or not modality.strip():
        raise ValueError(f"ingest_samples: modality must be a non-empty name, got {modality!r}")
    wanted = set(SPLITS) if splits is None else set([splits] if isinstance(splits, str) else splits)
    unknown = sorted(wanted - set(SPLITS))
    if unknown:
        raise ValueError(
            f"ingest_samples: unknown split(s) {', '.join(unknown)}; allowed: {', '.join(SPLITS)}"
        )
    licence = _licence(task.root)
    for case in task.cases:
        if case.split not in wanted:
            continue
        image, mask, fov = load_case(case)
        files = {"image": _relative(case.image_path, task.root), "mask": _relative(case.mask_path, task.root)}
        if case.fov_path is not None:
            files["fov"] = _relative(case.fov_path, task.root)
        meta = {
            "modality": modality,
            "source": task.name,
            "case": case.name,
            "split": case.split,
            "files": files,
            "licence": licence,
        }
        yield Sample(image=image, mask=mask, fov=fov, meta=meta)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
