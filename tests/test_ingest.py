"""data_engine.ingest: task manifests and folders, case loading checks, samples with their meta."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_engine.corpus import Sample
from data_engine.ingest import Case, ingest_samples, load_case, read_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Split counts from ../shared/data/README.md.
REAL_SETS = {
    "CHASE_DB1": {"train": 20, "test": 8},
    "CIMAT_XCA80": {"train": 40, "test": 40},
    "OCTA500_3M": {"train": 140, "val": 10, "test": 50},
}


def real_csv(name: str) -> Path:
    path = DATA / name / "pairs.csv"
    if not path.is_file():
        pytest.skip(f"real data set {name} not found at {path} (only present beside the dev checkout)")
    return path


@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_real_manifests_read_with_the_documented_splits(name: str) -> None:
    task = read_task(real_csv(name))
    assert task.name == name
    assert Counter(c.split for c in task.cases) == REAL_SETS[name]
    assert len({c.name for c in task.cases}) == len(task.cases)
    assert all(c.image_path.is_file() and c.mask_path.is_file() for c in task.cases)
    assert all((c.fov_path is not None) == (name == "CHASE_DB1") for c in task.cases)


def test_repeated_file_names_get_their_folder_in_the_case_name() -> None:
    task = read_task(real_csv("CIMAT_XCA80"))
    names = {c.name for c in task.cases}
    assert {"train_1", "test_1", "train_40", "test_40"} <= names


@pytest.mark.parametrize(
    "name, modality", [("CHASE_DB1", "fundus"), ("CIMAT_XCA80", "xca"), ("OCTA500_3M", "octa")]
)
def test_real_cases_load_as_samples(name: str, modality: str) -> None:
    task = read_task(real_csv(name))
    samples = ingest_samples(task, modality, splits=["test"])
    sample = next(samples)
    assert isinstance(sample, Sample)
    assert sample.mask.dtype == np.uint8 and set(np.unique(sample.mask)) == {0, 255}
    assert sample.image.shape[:2] == sample.mask.shape
    vessel_share = (sample.mask > 0).mean()
    assert 0.02 < vessel_share < 0.15, vessel_share  # the READMEs give 3-11 %
    assert sample.meta["modality"] == modality and sample.meta["source"] == name
    assert sample.meta["split"] == "test"
    assert sample.meta["licence"] == f"research use only, see {task.root / 'SOURCE.md'}"
    assert (sample.fov is not None) == (name == "CHASE_DB1")
    if name == "CHASE_DB1":
        assert sample.image.ndim == 3  # colour JPEG, BGR
        assert sample.meta["files"]["fov"].startswith("fov/")
    else:
        assert sample.image.ndim == 2  # grey PNG / BMP


# ---- a temporary task


def write_case(folder: Path, stem: str, size: tuple[int, int] = (24, 32), vessels: bool = True) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem))
    cv2.imwrite(str(folder / "images" / f"{stem}.png"), (rng.random(size) * 255).astype(np.uint8))
    mask = np.zeros(size, np.uint8)
    if vessels:
        mask[size[0] // 2, :] = 1  # a 0/1 mask, as some data sets store it
    cv2.imwrite(str(folder / "masks" / f"{stem}.png"), mask)


def write_csv(folder: Path, text: str) -> Path:
    path = folder / "pairs.csv"
    path.write_text(text)
    return path


def test_folder_task_pairs_by_stem(tmp_path: Path) -> None:
    root = tmp_path / "my_task"
    for stem in ("b", "a", "c"):
        write_case(root, stem)
    (root / "fov").mkdir()
    cv2.imwrite(str(root / "fov" / "a.png"), np.full((24, 32), 255, np.uint8))
    (root / "images" / "notes.txt").write_text("ignored")
    task = read_task(root)
    assert task.name == "my_task" and task.root == root.resolve()
    assert [c.name for c in task.cases] == ["a", "b", "c"]
    assert all(c.split == "none" for c in task.cases)
    assert task.cases[0].fov_path == (root / "fov" / "a.png").resolve() and task.cases[1].fov_path is None
    samples = list(ingest_samples(task, "ultrasound"))  # a modality the corpus never had is fine
    assert len(samples) == 3
    assert samples[0].fov is not None and samples[1].fov is None
    assert samples[0].meta["licence"] == "unknown: see the data set's terms"
    assert set(np.unique(samples[0].mask)) == {0, 255}


def test_csv_task_with_extra_columns_blank_lines_and_empty_fov(tmp_path: Path) -> None:
    root = tmp_path / "t"
    write_case(root, "x")
    write_case(root, "y")
    (root / "SOURCE.md").write_text("terms")
    csv = write_csv(
        root,
        "image,mask,fov,split,notes\nimages/x.png,masks/x.png,,Train,hello\n\nimages/y.png,masks/y.png,,,\n",
    )
    task = read_task(csv)
    assert [(c.name, c.split, c.fov_path) for c in task.cases] == [("x", "train", None), ("y", "none", None)]
    assert [s.meta["case"] for s in ingest_samples(task, "xca", splits=["train"])] == ["x"]
    sample = next(ingest_samples(task, "xca"))
    assert sample.meta["files"] == {"image": "images/x.png", "mask": "masks/x.png"}
    assert sample.meta["licence"] == f"research use only, see {root.resolve() / 'SOURCE.md'}"


# ---- bad input: each error names the file and says what is allowed


def test_missing_file_names_csv_line_and_file(tmp_path: Path) -> None:
    write_case(tmp_path, "x")
    csv = write_csv(
        tmp_path, "image,mask,fov,split\nimages/x.png,masks/x.png,,train\nimages/gone.png,masks/x.png,,test\n"
    )
    with pytest.raises(ValueError, match=r"pairs\.csv, line 3: image file images/gone\.png not found"):
        read_task(csv)


def test_unknown_split_names_line_and_allowed_values(tmp_path: Path) -> None:
    write_case(tmp_path, "x")
    csv = write_csv(tmp_path, "image,mask,fov,split\nimages/x.png,masks/x.png,,training\n")
    with pytest.raises(
        ValueError, match=r"pairs\.csv, line 2: split 'training' must be one of train, val, test, none"
    ):
        read_task(csv)


def test_missing_column_names_the_csv(tmp_path: Path) -> None:
    write_case(tmp_path, "x")
    csv = write_csv(tmp_path, "image,fov,split\nimages/x.png,,train\n")
    with pytest.raises(ValueError, match=r"pairs\.csv, line 1: missing column\(s\) mask"):
        read_task(csv)


def test_missing_task_path() -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_task("/nonexistent/nowhere.csv")


def test_unpaired_folder_files_are_listed(tmp_path: Path) -> None:
    write_case(tmp_path, "a")
    write_case(tmp_path, "b")
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "bb.png")  # no separator: not b's
    with pytest.raises(ValueError, match=r"images without a mask.*b\.png.*masks without an image.*bb\.png"):
        read_task(tmp_path)


def test_folder_masks_and_fovs_may_add_a_suffix_to_the_image_stem(tmp_path: Path) -> None:
    # as public sets name them: CHASE_DB1 Image_01L_1stHO, DCA1 1_gt, STARE im0001.ah, DRIVE 21_training_mask
    for image, mask in (
        ("Image_01L", "Image_01L_1stHO"),
        ("1", "1_gt"),
        ("1_2", "1_2_gt"),
        ("im0001", "im0001.ah"),
    ):
        write_case(tmp_path, image)
        (tmp_path / "masks" / f"{image}.png").rename(tmp_path / "masks" / f"{mask}.png")
    write_case(tmp_path, "same")  # an exact stem still pairs
    (tmp_path / "fov").mkdir()
    cv2.imwrite(str(tmp_path / "fov" / "1_2-fov.png"), np.full((24, 32), 255, np.uint8))
    task = read_task(tmp_path)
    assert [(c.name, c.mask_path.name) for c in task.cases] == [
        ("1", "1_gt.png"),
        ("1_2", "1_2_gt.png"),  # the longest image stem it extends, not "1"
        ("Image_01L", "Image_01L_1stHO.png"),
        ("im0001", "im0001.ah.png"),
        ("same", "same.png"),
    ]
    assert [c.fov_path.name if c.fov_path else None for c in task.cases] == [
        None,
        "1_2-fov.png",
        None,
        None,
        None,
    ]
    assert all(load_case(c)[1].max() == 255 for c in task.cases)


def test_chase_db1_as_distributed_reads_as_a_folder_task_with_its_manifests_pairs() -> None:
    # images/Image_01L.jpg, masks/Image_01L_1stHO.png, fov/Image_01L.png: the suffix rule pairs them as
    # the set's own pairs.csv does (its second observer's masks sit in another folder, unread)
    folder = real_csv("CHASE_DB1").parent
    by_csv = {c.name: (c.image_path, c.mask_path, c.fov_path) for c in read_task(folder / "pairs.csv").cases}
    by_folder = {c.name: (c.image_path, c.mask_path, c.fov_path) for c in read_task(folder).cases}
    assert len(by_folder) == 28 and by_folder == by_csv


def test_two_masks_for_one_image_name_both(tmp_path: Path) -> None:
    write_case(tmp_path, "Image_01L")
    (tmp_path / "masks" / "Image_01L.png").rename(tmp_path / "masks" / "Image_01L_1stHO.png")
    write_case(tmp_path, "x")
    (tmp_path / "masks" / "x.png").rename(tmp_path / "masks" / "Image_01L_2ndHO.png")
    (tmp_path / "images" / "x.png").unlink()
    with pytest.raises(
        ValueError,
        match=r"two files belong to the image Image_01L\.png: Image_01L_1stHO\.png and Image_01L_2ndHO",
    ):
        read_task(tmp_path)


def test_many_unpaired_files_are_counted_past_the_first_five(tmp_path: Path) -> None:
    for k in range(8):
        write_case(tmp_path, f"{k:02d}_training")
        (tmp_path / "masks" / f"{k:02d}_training.png").rename(tmp_path / "masks" / f"{k:02d}_manual1.png")
    with pytest.raises(ValueError) as err:
        read_task(tmp_path)
    message = str(err.value)
    named = ", ".join(f"{k:02d}_training.png" for k in range(5))
    assert f"{named} and 3 more" in message
    assert "05_training" not in message
    assert "list the pairs in a CSV" in message


def test_size_mismatch_names_both_files_and_sizes(tmp_path: Path) -> None:
    write_case(tmp_path, "a")
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.full((20, 30), 255, np.uint8))
    case = read_task(tmp_path).cases[0]
    with pytest.raises(ValueError, match=r"masks/a\.png is 30x20 px but image .*images/a\.png is 32x24 px"):
        load_case(case)


def test_empty_mask_names_the_file(tmp_path: Path) -> None:
    write_case(tmp_path, "a", vessels=False)
    with pytest.raises(ValueError, match=r"masks/a\.png is empty"):
        load_case(read_task(tmp_path).cases[0])


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    write_case(tmp_path, "a")
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"images/a\.png: not a readable image"):
        load_case(read_task(tmp_path).cases[0])


def test_load_case_checks_fov_size(tmp_path: Path) -> None:
    write_case(tmp_path, "a")
    cv2.imwrite(str(tmp_path / "fov.png"), np.full((5, 5), 255, np.uint8))
    case = read_task(tmp_path).cases[0]
    bad = Case(case.name, case.image_path, case.mask_path, tmp_path / "fov.png", "none")
    with pytest.raises(ValueError, match=r"fov .*fov\.png is 5x5 px"):
        load_case(bad)


def test_unknown_split_filter_is_an_error(tmp_path: Path) -> None:
    write_case(tmp_path, "a")
    with pytest.raises(ValueError, match="unknown split.*training"):
        next(ingest_samples(read_task(tmp_path), "xca", splits=["training"]))


@pytest.mark.parametrize(
    "name, modality, low, high",
    # Vessel fractions stated in each set's SOURCE.md.
    [
        ("CHASE_DB1", "fundus", 0.051, 0.085),
        ("CIMAT_XCA80", "xca", 0.030, 0.109),
        ("OCTA500_3M", "octa", 0.044, 0.094),
    ],
)
def test_every_real_case_loads_with_the_documented_vessel_fraction(
    name: str, modality: str, low: float, high: float
) -> None:
    shares = [float((s.mask > 0).mean()) for s in ingest_samples(read_task(real_csv(name)), modality)]
    assert len(shares) == sum(REAL_SETS[name].values())
    assert low - 0.0015 <= min(shares) and max(shares) <= high + 0.0015, (min(shares), max(shares))


def test_csv_without_fov_and_split_columns_means_no_fov_and_split_none(tmp_path: Path) -> None:
    write_case(tmp_path, "x")
    task = read_task(write_csv(tmp_path, "mask,image\nmasks/x.png,images/x.png\n"))
    assert [(c.name, c.split, c.fov_path) for c in task.cases] == [("x", "none", None)]


def test_image_listed_twice_names_both_lines(tmp_path: Path) -> None:
    write_case(tmp_path, "x")
    csv = write_csv(
        tmp_path, "image,mask,fov,split\nimages/x.png,masks/x.png,,train\nimages/x.png,masks/x.png,,test\n"
    )
    with pytest.raises(ValueError, match=r"line 3: image .*x\.png is already listed on line 2"):
        read_task(csv)
