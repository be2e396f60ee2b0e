"""Procedural growth, space colonization and recombination: anatomy presets, region-constrained regrowth
with Murray radii, each morphology control's effect, the library and make_mask's contract."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_engine import MODALITIES
from data_engine.corpus import EngineConfig, LibraryConfig, MorphologyConfig
from data_engine.graph import VesselGraph, decompose, graph_from_polylines, orient, render_mask, subtree
from data_engine.grow import ProceduralControls, procedural_tree, region_roots, space_colonization
from data_engine.recombine import (
    SOURCES,
    Morphology,
    apply_morphology,
    build_library,
    draw_morphology,
    elastic_warp,
    make_mask,
    place,
    recombine,
    regrow_in_region,
    thin_branches,
    wiggle,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = 96


def components(graph: VesselGraph) -> int:
    """Connected components of a graph, by union-find over its segments."""
    parent = list(range(graph.num_nodes))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in graph.ends_S2.tolist():
        parent[find(a)] = find(b)
    return len({find(int(a)) for a in np.unique(graph.ends_S2)})


def murray_errors(graph: VesselGraph) -> list[float]:
    """|r_parent^3 - sum r_child^3| / r_parent^3 at every junction of an oriented graph (end radii)."""
    assert graph.parent_S is not None
    errors = []
    for s in range(graph.num_segments):
        kids = np.nonzero(graph.parent_S == s)[0]
        if len(kids) >= 2:
            r_parent = float(graph.radius_P[graph.offsets_S1[s + 1] - 1])
            r_kids = graph.radius_P[graph.offsets_S1[kids]].astype(np.float64)
            errors.append(abs(r_parent**3 - float(np.sum(r_kids**3))) / r_parent**3)
    return errors


@pytest.fixture(scope="module")
def cfg() -> EngineConfig:
    return EngineConfig(image_size_px=SIZE, library=LibraryConfig(num_graphs_per_modality=2))


@pytest.fixture(scope="module")
def library(cfg: EngineConfig) -> dict[str, list[VesselGraph]]:
    return build_library(cfg)


@pytest.fixture(scope="module")
def tree_library() -> list[VesselGraph]:
    """Single-tree graphs (one connected component each), decomposed from masks like real ones."""
    graphs = []
    for seed in range(3):
        tree, _ = procedural_tree(
            "xca", 128, np.random.default_rng([5, seed]), ProceduralControls(vessel_count=1)
        )
        g = orient(decompose(render_mask(tree, (128, 128))[0]))
        assert g.parent_S is not None
        largest = int(np.argmax(g.subtree_length_S * (g.parent_S < 0)))
        graphs.append(subtree(g, largest))
        assert graphs[-1].num_segments >= 10 and components(graphs[-1]) == 1
    return graphs


@pytest.mark.parametrize("modality", [*MODALITIES, "ultrasound"])
def test_procedural_trees_for_every_modality(modality: str) -> None:
    graph, params = procedural_tree(modality, SIZE, np.random.default_rng([1, 2]))
    graph.validate()
    json.dumps(params)
    assert params["preset"] == (modality if modality in MODALITIES else "generic")
    mask, radius_px = render_mask(graph, (SIZE, SIZE))
    assert 0.005 < (mask > 0).mean() < 0.6
    assert radius_px.max() >= 0.75  # trunks start at >= 1 px; a segment is drawn at its mean radius
    assert max(murray_errors(graph), default=0.0) < 1e-4


def test_procedural_anatomy_is_recognisable_in_numbers() -> None:
    rng = np.random.default_rng(7)
    fundus, p = procedural_tree("fundus", 256, rng)
    # Every vessel inside the round field of view and none in the macula's avascular zone.
    d_centre = np.hypot(*(fundus.points_P2 - np.asarray(p["fov_center_xy_px"])).T)
    assert d_centre.max() <= p["fov_radius_px"] + 1
    mac = np.asarray(p["macula_xy_px"])
    assert np.hypot(*(fundus.points_P2 - mac).T).min() > 0.04 * 256
    octa, q = procedural_tree("octa", 256, rng)
    faz = np.asarray(q["faz_xy_px"])
    assert np.hypot(*(octa.points_P2 - faz).T).min() > 0.5 * q["faz_radius_px"]
    dsa, _ = procedural_tree("dsa", 256, rng)
    assert dsa.radius_P[dsa.points_P2[:, 1] > 230].max() > dsa.radius_P[dsa.points_P2[:, 1] < 100].max()


def test_space_colonization_fills_region_with_murray_tree() -> None:
    region = np.zeros((120, 160), np.uint8)
    cv2.ellipse(region, (80, 60), (70, 40), 0, 0, 360, 255, -1)
    cv2.circle(region, (80, 60), 15, 0, -1)  # a hole: growth goes around it
    roots = region_roots(region, 2, np.random.default_rng(3))
    top = np.nonzero(region)[0].min()
    assert roots[0, 1] == top and region[int(roots[0, 1]), int(roots[0, 0])]
    border = region - cv2.erode(region, np.ones((3, 3), np.uint8))
    assert all(border[int(y), int(x)] > 0 for x, y in roots)
    tree = space_colonization(region, np.random.default_rng(3), num_roots=2)
    tree.validate()
    assert tree.num_segments > 10 and len(tree.roots_R) == 2
    # The tree's roots: one at the top of the region, both on its border (to within a coarse cell, 4 px).
    root_xy = tree.nodes_N2[tree.roots_R]
    assert abs(float(root_xy[:, 1].min()) - top) <= 4.0
    near_border = cv2.dilate(border, np.ones((9, 9), np.uint8))
    assert all(near_border[int(round(y)), int(round(x))] > 0 for x, y in root_xy)
    # Inside the region (to within the coarse grid's cell, 160 / 40 = 4 px).
    grown = cv2.dilate(region, np.ones((9, 9), np.uint8))
    xy = np.rint(tree.points_P2).astype(int)
    assert np.all(grown[np.clip(xy[:, 1], 0, 119), np.clip(xy[:, 0], 0, 159)] > 0)
    assert max(murray_errors(tree)) < 1e-4
    # Radii never grow from root to tips, and the root is thickest.
    assert tree.parent_S is not None
    has = tree.parent_S >= 0
    r_first = tree.radius_P[tree.offsets_S1[:-1]]
    assert np.all(r_first[has] <= r_first[tree.parent_S[has]] + 1e-6)
    assert r_first.max() == pytest.approx(float(tree.radius_P.max()))
    assert r_first[tree.parent_S < 0].max() > 2 * 0.6


def test_regrow_in_region_on_a_coarse_grid() -> None:
    region = np.zeros((40, 40), bool)
    region[5:35, 10:30] = True
    g = regrow_in_region(region, np.random.default_rng(1), pixel_size=4.0, branch_density=1.3)
    g.validate()
    x, y = g.points_P2.T
    assert x.min() >= 10 * 4 - 4 and x.max() <= 30 * 4 + 4 and y.min() >= 5 * 4 - 4 and y.max() <= 35 * 4 + 4
    sparse = regrow_in_region(region, np.random.default_rng(1), pixel_size=4.0, branch_density=0.6)
    assert sparse.num_segments < g.num_segments


def test_each_morphology_control_moves_its_measure(tree_library: list[VesselGraph]) -> None:
    g = tree_library[0]
    rng = np.random.default_rng
    area = [
        (
            render_mask(apply_morphology(g, rng(0), Morphology(radius_scale=f), size_px=128), (128, 128))[0]
            > 0
        ).sum()
        for f in (0.8, 1.25)
    ]
    assert area[1] > area[0]
    segments = [
        apply_morphology(g, rng(0), Morphology(pruning_depth=d), size_px=128).num_segments for d in (0, 2)
    ]
    assert segments[1] < segments[0]

    def sinuosity(graph: VesselGraph) -> float:
        ends = graph.points_P2[graph.offsets_S1[1:] - 1] - graph.points_P2[graph.offsets_S1[:-1]]
        return float(graph.length_S.sum() / np.hypot(*ends.T).sum())

    wiggly = [sinuosity(wiggle(g, rng(0), t, 15.0)) for t in (0.0, 0.25, 0.5)]
    assert wiggly[0] < wiggly[1] < wiggly[2]
    thinned = thin_branches(g, rng(0), 0.5)
    assert thinned.num_segments < g.num_segments
    warped = elastic_warp(g, rng(0), 4.0, 128)
    shift = np.hypot(*(warped.points_P2 - g.points_P2).T)
    assert 1.0 < float(np.sqrt(np.mean(shift**2))) < 10.0
    # Rotation turns and scale sizes a placed piece.
    a, _ = place(g, rng(0), (128, 128), 0.0, 1.0, (64.0, 64.0))
    b, _ = place(g, rng(0), (128, 128), 90.0, 1.0, (64.0, 64.0))
    c, _ = place(g, rng(0), (128, 128), 0.0, 1.2, (64.0, 64.0))
    assert np.ptp(a.points_P2[:, 0]) == pytest.approx(np.ptp(b.points_P2[:, 1]), rel=1e-3)
    assert np.ptp(c.points_P2[:, 0]) == pytest.approx(1.2 * np.ptp(a.points_P2[:, 0]), rel=1e-3)


def test_recombine_vessel_count_and_branch_density(tree_library: list[VesselGraph]) -> None:
    base = Morphology()
    for n in (1, 2, 3):
        morph = Morphology(vessel_count=n, scale=0.6)
        graphs = [recombine(tree_library, (128, 128), np.random.default_rng([n, k]), morph) for k in range(3)]
        assert all(components(g) == n for g in graphs)
    plain = recombine(tree_library, (128, 128), np.random.default_rng(4), base)
    params: dict[str, object] = {}
    dense = recombine(
        tree_library, (128, 128), np.random.default_rng(4), Morphology(branch_density=1.4), params=params
    )
    assert isinstance(params["grafted_twigs"], int) and params["grafted_twigs"] > 0
    assert dense.num_segments > plain.num_segments
    dense.validate()


def test_recombine_works_on_real_graphs() -> None:
    pairs = DATA / "CIMAT_XCA80" / "pairs.csv"
    if not pairs.is_file():
        pytest.skip(f"real vessel data not found at {pairs} (needs ../shared/data beside the checkout)")
    rows = list(csv.DictReader(pairs.open()))[:3]
    masks = [cv2.imread(str(pairs.parent / r["mask"]), cv2.IMREAD_GRAYSCALE) for r in rows]
    graphs = [decompose(np.asarray(m)) for m in masks if m is not None]
    assert len(graphs) == len(rows)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        morph = draw_morphology(MorphologyConfig(), rng)
        g = recombine(graphs, (300, 300), rng, morph)
        g.validate()
        assert (render_mask(g, (300, 300))[0] > 0).sum() > 200


def test_make_mask_contract(cfg: EngineConfig, library: dict[str, list[VesselGraph]]) -> None:
    assert set(library) == set(cfg.modalities) and all(len(v) == 2 for v in library.values())
    for modality in ("fundus", "octa", "mra"):
        for source in SOURCES:
            mask, radius_px, params = make_mask(cfg, modality, source, np.random.default_rng([9, 1]), library)
            assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) == {0, 255}
            assert radius_px.dtype == np.float32 and np.all((radius_px > 0) == (mask > 0))
            assert params["source"] == source and "fallback" not in params
            assert set(params["morphology"]) == {f for f in MorphologyConfig.__dataclass_fields__}
            json.loads(json.dumps(params))
            again, _, params2 = make_mask(cfg, modality, source, np.random.default_rng([9, 1]), library)
            assert again.tobytes() == mask.tobytes() and params2 == params
            other, _, _ = make_mask(cfg, modality, source, np.random.default_rng([9, 2]), library)
            assert other.tobytes() != mask.tobytes()
    with pytest.raises(ValueError, match="mask source"):
        make_mask(cfg, "fundus", "nonsense", np.random.default_rng(0), library)


def test_build_library_is_deterministic_and_takes_seed_masks(tmp_path: Path) -> None:
    for k in range(2):
        seed_mask = np.zeros((150, 150), np.uint8)
        cv2.line(seed_mask, (10, 20 + 40 * k), (140, 120), 1, 3)  # 1-bit values, another size than the canvas
        cv2.line(seed_mask, (75, 70), (60, 145), 1, 2)
        cv2.imwrite(str(tmp_path / f"mask_{k}.png"), seed_mask)
    cfg = EngineConfig(
        image_size_px=64,
        modalities={"xca": 1.0, "dsa": 1.0},
        library=LibraryConfig(num_graphs_per_modality=1, seed_mask_dir=str(tmp_path)),
    )
    lib = build_library(cfg)
    again = build_library(cfg)
    assert {k: len(v) for k, v in lib.items()} == {"xca": 3, "dsa": 3}
    assert lib["xca"][1] is lib["dsa"][1]  # seed graphs are shared by all modalities
    for a, b in zip(lib["xca"], again["xca"], strict=True):
        assert np.array_equal(a.points_P2, b.points_P2)
    assert lib["xca"][1].points_P2[:, 0].max() < 64
    with pytest.raises(ValueError, match="seed_mask_dir"):
        build_library(
            EngineConfig(image_size_px=64, library=LibraryConfig(seed_mask_dir=str(tmp_path / "nope")))
        )


def test_graph_from_polylines_shares_end_nodes() -> None:
    g = graph_from_polylines(
        [np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([[10.0, 0.0], [20.0, 5.0]])], [np.ones(2), np.ones(2)]
    )
    assert g.num_nodes == 3 and g.degree_N.tolist().count(2) == 1
