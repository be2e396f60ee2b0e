"""New vessel masks from a library of vessel graphs: grafting, geometric and morphological changes, regrowth.

    library = build_library(cfg)                                   # per modality, oriented VesselGraphs
    mask, radius_px, params = make_mask(cfg, "fundus", "recombined", rng, library)

    morph = draw_morphology(cfg.morphology, rng)                   # one draw of every control
    graph = recombine(graphs, (512, 512), rng, morph)             # any graphs, e.g. decomposed real masks
    graph = regrow_in_region(region_mask, rng, branch_density=1.2) # space colonization in a region
    graph = apply_morphology(graph, rng, morph, size_px=512)

Mask sources (`make_mask`):
  procedural  a fresh tree from the modality's anatomy preset (`grow.procedural_tree`), then morphology.
  recombined  `vessel_count` sub-trees (or whole graphs) from the modality's library, rotated, scaled,
              mirrored and placed on the canvas; extra twigs grafted on when branch_density > 1; then
              morphology. Works on any graphs, so few-shot code can pass graphs decomposed from real masks.
  regrowth    space colonization inside the region of a library graph (its vessels rendered coarsely,
              dilated and hole-filled), rooted where that graph's trees are rooted; then morphology.
OCTA masks of every source also get a capillary mesh: a crop of a per-process mesh tile (built from a
constant seed) with the foveal zone cleared, so the per-sample cost stays small.

Morphology controls (`Morphology`, drawn from `MorphologyConfig` ranges): radius_scale (factor on every
radius), tortuosity (smooth lateral wiggle: each segment bends sideways by up to tortuosity * 0.35 of each
half-wave's length), branch_density (< 1 drops side twigs, > 1 grafts twigs; growth makes more or fewer
branches), pruning_depth (generations of side branches removed from the periphery), vessel_count (grafted
pieces / trees / regrowth roots),
rotation_deg and scale (of grafted pieces), elastic_px (amplitude of a smooth warp of all centrelines).

Speed: a call to `make_mask` at 512 px costs a few milliseconds on one core (`benchmarks/bench_masks.py`):
library graphs are resampled to ~3 px point spacing and their orientation, sub-tree sizes and regions are
computed once in `build_library` (cached per graph object).
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_engine import MODALITIES
from data_engine.corpus import EngineConfig, MorphologyConfig
from data_engine.graph import (
    VesselGraph,
    affine,
    bounding_box,
    decompose,
    merge_graphs,
    orient,
    point_normals,
    prune_terminal_generations,
    render_mask,
    resample_centrelines,
    scale,
    select_segments,
    side_twigs,
    split_segments_at,
    subtree,
    to_complex,
    to_xy,
    with_geometry,
)
from data_engine.grow import (
    Colonization,
    ProceduralControls,
    capillary_mesh,
    chaikin,
    procedural_tree,
    space_colonization,
)

SOURCES: tuple[str, ...] = ("procedural", "recombined", "regrowth")
# Point spacing (px at 512) that library graphs are resampled to: smooth enough to draw, few points to move.
_LIBRARY_SPACING_PX = 3.0
# Wavelength (share of the canvas) of the tortuosity wiggle: a segment gets round(length / this) half-waves.
_WIGGLE_WAVELENGTH = 0.12
# Coarse grid (cells on the long side) for regrowth regions.
_REGION_CELLS = 40
# Dilation (share of the canvas) of a library graph's vessels into its regrowth region.
_REGION_DILATION = 0.045
# Plane waves summed into the smooth elastic displacement field.
_ELASTIC_WAVES = 4
# Capillary mesh tiles per process: this many, each twice the canvas, from constant seeds.
_NUM_MESH_TILES = 2
_MESH_SEED = 20251122
_MASK_EXTENSIONS = (".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".ppm", ".pgm")


@dataclass(frozen=True)
class Morphology:
    """One draw of the morphology controls (meaning and ranges: data_engine.corpus.MorphologyConfig)."""

    radius_scale: float = 1.0  # factor on every vessel radius
    tortuosity: float = 0.0  # lateral wiggle, as a share of each half-wave's length (x 0.35)
    branch_density: float = 1.0  # factor on branches grown or grafted; < 1 also drops side twigs
    pruning_depth: int = 0  # generations of side branches removed from the periphery
    vessel_count: int = 1  # grafted pieces / trees / regrowth roots per canvas
    rotation_deg: float = 0.0  # rotation of grafted pieces (piece k adds k * 360 / vessel_count)
    scale: float = 1.0  # isotropic scale of grafted pieces
    elastic_px: float = 0.0  # amplitude of the smooth elastic warp of the centrelines

    def to_params(self) -> dict[str, float | int]:
        """JSON-ready values (plain floats, rounded to 4 decimals, and ints)."""
        return {
            "radius_scale": round(self.radius_scale, 4),
            "tortuosity": round(self.tortuosity, 4),
            "branch_density": round(self.branch_density, 4),
            "pruning_depth": int(self.pruning_depth),
            "vessel_count": int(self.vessel_count),
            "rotation_deg": round(self.rotation_deg, 4),
            "scale": round(self.scale, 4),
            "elastic_px": round(self.elastic_px, 4),
        }


def draw_morphology(cfg: MorphologyConfig, rng: np.random.Generator) -> Morphology:
    """Each control drawn uniformly from its [low, high] range (integer ranges inclusive)."""
    u = rng.random(6)
    ints = rng.integers(
        [cfg.pruning_depth[0], cfg.vessel_count[0]], [cfg.pruning_depth[1] + 1, cfg.vessel_count[1] + 1]
    )

    def lerp(r: tuple[float, float], t: float) -> float:
        return float(r[0] + (r[1] - r[0]) * t)

    return Morphology(
        radius_scale=lerp(cfg.radius_scale, u[0]),
        tortuosity=lerp(cfg.tortuosity, u[1]),
        branch_density=lerp(cfg.branch_density, u[2]),
        pruning_depth=int(ints[0]),
        vessel_count=max(int(ints[1]), 1),
        rotation_deg=lerp(cfg.rotation_deg, u[3]),
        scale=lerp(cfg.scale, u[4]),
        elastic_px=lerp(cfg.elastic_px, u[5]),
    )


# --- morphology ----------------------------------------------------------------------------------------


def thin_branches(graph: VesselGraph, rng: np.random.Generator, density: float) -> VesselGraph:
    """Drop each side twig (graph.side_twigs: a thin branch with a free end) with probability 1 - density."""
    if density >= 1.0 or graph.num_segments == 0:
        return graph
    drop = side_twigs(graph) & (rng.random(graph.num_segments) >= density)
    return select_segments(graph, ~drop) if drop.any() else graph


def wiggle(
    graph: VesselGraph, rng: np.random.Generator, tortuosity: float, wavelength_px: float
) -> VesselGraph:
    """Smooth lateral wiggle: segment s of length L gets k = max(1, round(L / wavelength)) half-waves of
    amplitude tortuosity * 0.35 * L / k (random sign and a 0.5-1 factor per segment, a random second
    harmonic); segment ends stay put, so junctions and nodes do not move."""
    if tortuosity <= 0 or graph.num_segments == 0:
        return graph
    length = graph.length_S
    seg = graph.segment_of_point_P
    step = graph.step_length_P
    cum = np.cumsum(step) - step
    t = (cum - cum[graph.offsets_S1[:-1]][seg]) / np.maximum(length[seg], 1e-9)
    k = np.maximum(np.rint(length / wavelength_px), 1.0)
    draws = rng.random((3, graph.num_segments))
    amp = tortuosity * 0.35 * length / k * (0.5 + 0.5 * draws[0]) * np.where(draws[1] < 0.5, -1.0, 1.0)
    second = 0.3 * (draws[2] - 0.5)
    phase = math.pi * k[seg] * t
    offset = amp[seg] * (np.sin(phase) + second[seg] * np.sin(2 * phase))
    pts = graph.points_P2.astype(np.float64) + point_normals(graph) * offset[:, None]
    return with_geometry(graph, pts, nodes_N2=graph.nodes_N2)


def elastic_warp(
    graph: VesselGraph, rng: np.random.Generator, amplitude_px: float, size_px: float
) -> VesselGraph:
    """Smooth random displacement of every point and node: four plane waves (random directions of travel
    and of displacement, wavelengths of 0.5-1.5 canvas sizes), scaled so the RMS displacement is
    amplitude_px."""
    if amplitude_px <= 0 or graph.num_points == 0:
        return graph
    d = rng.random((5, _ELASTIC_WAVES))
    wl = size_px * (0.5 + d[0])
    # Wave k displaces along a random direction e^(i a_k) as it varies along another, e^(i b_k).
    k_vec = np.exp(2j * math.pi * d[2]) * (2 * math.pi / wl)
    coef = np.exp(2j * math.pi * d[1]) * (d[3] - 0.5) * 2.0
    # Sine waves with coefficients c_k have an RMS of sqrt(sum |c_k|^2 / 2) over space: normalise that.
    coef *= amplitude_px / max(math.sqrt(0.5 * float(np.sum(np.abs(coef) ** 2))), 1e-6)
    z = to_complex(graph.points_P2)
    # k . p for wave vector k and point p, both as complex numbers: Re(conj(k) * p). Single precision is
    # plenty for a displacement of a few pixels and halves the cost of the sines.
    arg = (np.conj(k_vec).astype(np.complex64)[None, :] * z.astype(np.complex64)[:, None]).real
    arg += (2 * math.pi * d[4]).astype(np.float32)
    # (An explicit sum, not a matrix product: BLAS would start threads for this.)
    z += (np.sin(arg) * coef.astype(np.complex64)).sum(axis=1)
    # Nodes follow the segment ends they sit on (with_geometry), so the field is evaluated once.
    return with_geometry(graph, to_xy(z))


def scale_radii(graph: VesselGraph, factor: float) -> VesselGraph:
    """Every radius times factor, never below the drawable 0.5 px."""
    if factor == 1.0:
        return graph
    return with_geometry(graph, graph.points_P2, np.maximum(graph.radius_P * factor, 0.5), graph.nodes_N2)


def apply_morphology(
    graph: VesselGraph,
    rng: np.random.Generator,
    morph: Morphology,
    *,
    size_px: float,
    thin: bool = True,
) -> VesselGraph:
    """Pruning, branch thinning (density < 1, when `thin`), tortuosity wiggle, elastic warp and radius
    scale, in that order. Rotation, scale and vessel_count belong to `recombine`."""
    g = prune_terminal_generations(graph, morph.pruning_depth)
    if thin:
        g = thin_branches(g, rng, morph.branch_density)
    g = wiggle(g, rng, morph.tortuosity, _WIGGLE_WAVELENGTH * size_px)
    g = elastic_warp(g, rng, morph.elastic_px, size_px)
    return scale_radii(g, morph.radius_scale)


# --- recombination -------------------------------------------------------------------------------------


def _oriented(graph: VesselGraph) -> VesselGraph:
    return graph if graph.parent_S is not None else orient(graph)


def pick_piece(graph: VesselGraph, rng: np.random.Generator, share: tuple[float, float]) -> VesselGraph:
    """A sub-tree of the (oriented) graph holding a share of its total length within `share` (the whole
    graph when share reaches 1), drawn with probability proportional to its length."""
    g = _oriented(graph)
    if g.num_segments == 0:
        return g
    total = float(g.length_S.sum())
    lo, hi = share
    if hi >= 1.0 and rng.random() < 0.5:
        return g
    sub = g.subtree_length_S
    cand = np.nonzero((sub >= lo * total) & (sub <= hi * total))[0]
    if len(cand) == 0:
        # Nothing in range: the sub-tree closest to the middle of it.
        cand = np.array([int(np.argmin(np.abs(sub - 0.5 * (lo + hi) * total)))])
    w = sub[cand]
    s = int(cand[np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right").clip(0, len(cand) - 1)])
    return subtree(g, s)


def place(
    piece: VesselGraph,
    rng: np.random.Generator,
    shape: tuple[int, int],
    angle_deg: float,
    factor: float,
    centre_xy: tuple[float, float] | None = None,
) -> tuple[VesselGraph, dict[str, Any]]:
    """Rotate the piece about its bounding-box centre, scale it, mirror it left-right with probability
    1/2, and move that centre to centre_xy (default: a random point in the middle half of the canvas)."""
    h, w = shape
    x0, y0, x1, y1 = bounding_box(piece)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    mirror = bool(rng.random() < 0.5)
    if centre_xy is None:
        centre_xy = (float(rng.uniform(0.25, 0.75) * w), float(rng.uniform(0.25, 0.75) * h))
    a = math.radians(angle_deg)
    c, s = math.cos(a) * factor, math.sin(a) * factor
    # x' = R S M (x - centre) + target, with M mirroring x when asked.
    m = -1.0 if mirror else 1.0
    lin = np.array([[c * m, s], [-s * m, c]])
    t = np.array(centre_xy) - lin @ np.array([cx, cy])
    placed = affine(piece, np.column_stack([lin, t]))
    return placed, {"mirror": mirror, "centre_xy_px": [round(centre_xy[0], 2), round(centre_xy[1], 2)]}


def crop_to_canvas(graph: VesselGraph, shape: tuple[int, int], margin_px: float = 2.0) -> VesselGraph:
    """Drop segments with no point on the canvas (they would draw nothing)."""
    if graph.num_segments == 0:
        return graph
    h, w = shape
    p = graph.points_P2
    on = (
        (p[:, 0] >= -margin_px)
        & (p[:, 0] <= w - 1 + margin_px)
        & (p[:, 1] >= -margin_px)
        & (p[:, 1] <= h - 1 + margin_px)
    )
    keep = np.bincount(graph.segment_of_point_P, on, minlength=graph.num_segments) > 0
    return graph if keep.all() else select_segments(graph, keep)


def graft_twigs(
    host: VesselGraph,
    donors: list[VesselGraph],
    rng: np.random.Generator,
    count: int,
) -> VesselGraph:
    """Graft `count` terminal branches (single segments with a free end) of one donor graph onto random
    points of the host's vessels (radius >= 0.9 px).

    Each twig is turned to leave its host at 35-75 degrees to either side, its radii scaled so it starts
    at 0.4-0.7 of the host's radius there, and the host segment is split so the graft point becomes a
    junction. The result is unoriented (the host's tree changed).
    """
    if count <= 0 or host.num_points == 0 or not donors:
        return host
    interior = np.ones(host.num_points, bool)
    interior[host.offsets_S1[:-1]] = False
    interior[host.offsets_S1[1:] - 1] = False
    sites = np.nonzero(interior & (host.radius_P >= 0.9))[0]
    donor = _oriented(donors[int(rng.integers(len(donors)))])
    deg = donor.degree_N
    free_end = (deg[donor.ends_S2[:, 1]] == 1) & (donor.num_points_S >= 2) & (donor.length_S > 2.0)
    twigs = np.nonzero(free_end)[0]
    if len(sites) == 0 or len(twigs) == 0:
        return host
    draws = rng.random((5, count))
    points = np.unique(sites[(draws[0] * len(sites)).astype(np.int64)])
    k = len(points)
    picked = twigs[(draws[1, :k] * len(twigs)).astype(np.int64)]
    host2, graft_nodes = split_segments_at(host, points)

    # Each twig: chord direction (first -> last point) turned to leave the host at the drawn angle.
    counts = donor.num_points_S[picked]
    src = np.repeat(donor.offsets_S1[:-1][picked], counts) + (
        np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    )
    z = donor.points_P2[src, 0].astype(np.float64) + 1j * donor.points_P2[src, 1]
    first = donor.points_P2[donor.offsets_S1[:-1][picked]]
    last = donor.points_P2[donor.offsets_S1[1:][picked] - 1]
    z0 = first[:, 0].astype(np.float64) + 1j * first[:, 1]
    chord = (last[:, 0] + 1j * last[:, 1]) - z0
    normal = point_normals(host)[points]
    side = np.where(draws[2, :k] < 0.5, -1.0, 1.0)
    leave = np.radians(35.0 + 40.0 * draws[3, :k]) * side
    # Host tangent t = normal turned by -90 deg; leaving direction = t turned by `leave`.
    tangent = (normal[:, 0] + 1j * normal[:, 1]) * -1j
    target = tangent * np.exp(1j * leave)
    turn = (
        target / np.maximum(np.abs(target), 1e-9) / np.where(np.abs(chord) > 1e-9, chord / np.abs(chord), 1.0)
    )
    graft_xy = host.points_P2[points, 0].astype(np.float64) + 1j * host.points_P2[points, 1]
    twig_of = np.repeat(np.arange(k), counts)
    moved = graft_xy[twig_of] + turn[twig_of] * (z - z0[twig_of])
    r_first = donor.radius_P[donor.offsets_S1[:-1][picked]]
    factor = (0.4 + 0.3 * draws[4, :k]) * host.radius_P[points] / np.maximum(r_first, 1e-6)
    radius = np.maximum(donor.radius_P[src] * factor[twig_of], 0.5)
    # New nodes at the twigs' free ends; each twig starts at its graft node.
    twig_end_nodes = host2.num_nodes + np.arange(k)
    end_xy = moved[np.cumsum(counts) - 1]
    return VesselGraph(
        np.concatenate([host2.nodes_N2, np.stack([end_xy.real, end_xy.imag], 1)]),
        np.concatenate([host2.points_P2, np.stack([moved.real, moved.imag], 1)]),
        np.concatenate([host2.radius_P, radius]),
        np.concatenate([host2.offsets_S1, host2.num_points + np.cumsum(counts)]),
        np.concatenate([host2.ends_S2, np.stack([graft_nodes, twig_end_nodes], 1)]),
    )


def recombine(
    graphs: list[VesselGraph],
    shape: tuple[int, int],
    rng: np.random.Generator,
    morph: Morphology,
    *,
    params: dict[str, Any] | None = None,
) -> VesselGraph:
    """A new vessel graph on an HxW canvas from `morph.vessel_count` pieces of the given graphs.

    With one piece it is a whole graph or a large sub-tree (>= 30 % of a graph's length), placed in the
    middle half of the canvas; with more, each is a sub-tree holding 10-50 % of its graph's length, piece
    k centred at 22 % of the canvas from its centre in direction spread + k * 360 / n. Piece k is rotated
    by rotation_deg + k * 360 / n and scaled by `scale` (mirrored at random); twigs are grafted
    on when branch_density > 1; then `apply_morphology`. Works on any graphs (procedural or decomposed
    from real masks; unoriented ones are oriented first). Piece choices go into `params` if given.
    """
    if not graphs:
        raise ValueError("recombine needs at least one graph")
    h, w = shape
    n = max(int(morph.vessel_count), 1)
    share = (0.3, 1.0) if n == 1 else (0.1, 0.5)
    pieces = []
    record = []
    # Several pieces are spread around the canvas centre (evenly in angle) so they do not pile up.
    spread = rng.uniform(0.0, 2 * math.pi)
    for k in range(n):
        gi = int(rng.integers(len(graphs)))
        piece = pick_piece(graphs[gi], rng, share)
        centre = None
        if n > 1:
            a = spread + 2 * math.pi * k / n
            centre = (w * (0.5 + 0.22 * math.cos(a)), h * (0.5 + 0.22 * math.sin(a)))
        placed, info = place(piece, rng, (h, w), morph.rotation_deg + k * 360.0 / n, morph.scale, centre)
        pieces.append(crop_to_canvas(placed, (h, w)))
        record.append({"graph": gi, "num_segments": int(piece.num_segments), **info})
    g = merge_graphs(pieces)
    if morph.branch_density > 1.0 and g.num_segments:
        terminals = int(np.count_nonzero(g.degree_N == 1))
        extra = min(int(round((morph.branch_density - 1.0) * 0.5 * terminals)), 16)
        g = graft_twigs(g, graphs, rng, extra)
        if params is not None:
            params["grafted_twigs"] = extra
    g = apply_morphology(g, rng, morph, size_px=min(h, w))
    if params is not None:
        params["pieces"] = record
    return crop_to_canvas(g, (h, w))


# --- regrowth ------------------------------------------------------------------------------------------

_REGIONS: weakref.WeakKeyDictionary[VesselGraph, dict[tuple[int, int], np.ndarray]] = (
    weakref.WeakKeyDictionary()
)


def region_of(graph: VesselGraph, size_px: int, cells: int = _REGION_CELLS) -> np.ndarray:
    """Where a graph's vessels are, as a region to regrow in: its mask drawn on a cells x cells grid over a
    size_px canvas, dilated by ~4.5 % of the canvas and with holes filled (bool, cached per graph)."""
    cache = _REGIONS.setdefault(graph, {})
    key = (int(size_px), int(cells))
    if key in cache:
        return cache[key]
    f = cells / size_px
    small = scale(graph, f) if graph.num_segments else graph
    mask, _ = render_mask(small, (cells, cells))
    r = max(int(round(_REGION_DILATION * cells)), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    region = cv2.dilate(mask, kernel)
    # Fill holes: flood the background from a 1-cell frame; what it cannot reach is inside.
    framed = cv2.copyMakeBorder(region, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    flood = framed.copy()
    cv2.floodFill(flood, np.zeros((cells + 4, cells + 4), np.uint8), (0, 0), 255)
    filled = (framed > 0) | (flood == 0)
    out = filled[1:-1, 1:-1]
    out.flags.writeable = False
    cache[key] = out
    return out


def regrow_in_region(
    region_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    branch_density: float = 1.0,
    num_roots: int = 1,
    roots_xy: np.ndarray | None = None,
    pixel_size: float = 1.0,
    terminal_radius_px: float = 0.6,
) -> VesselGraph:
    """A new tree filling the foreground of region_mask (HxW, non-zero = inside) by space colonization.

    Roots: roots_xy (region pixels) if given, else the topmost point of each connected component plus up
    to num_roots - 1 more on its border. Output coordinates are region pixels times pixel_size (pass a
    coarse region and canvas_px / region_px to grow on a coarse grid for a full-size canvas). Radii
    follow Murray's law from terminal_radius_px (output pixels); centrelines are smoothed once.
    """
    settings = Colonization(terminal_radius_px=terminal_radius_px)
    g = space_colonization(
        np.asarray(region_mask),
        rng,
        branch_density=branch_density,
        num_roots=num_roots,
        roots_xy=roots_xy,
        settings=settings,
        pixel_size=pixel_size,
    )
    return chaikin(g)


def _regrow_from_library(
    base: VesselGraph,
    size_px: int,
    rng: np.random.Generator,
    morph: Morphology,
    params: dict[str, Any],
) -> VesselGraph:
    region = region_of(base, size_px)
    cells = region.shape[0]
    f = cells / size_px
    # Roots where the base graph's largest trees are rooted (anatomy: the optic disc, an ostium, ...).
    roots = base.roots_R
    if len(roots) and base.parent_S is not None:
        top = base.parent_S < 0
        lengths = np.bincount(base.ends_S2[top, 0], base.subtree_length_S[top], minlength=base.num_nodes)[
            roots
        ]
        roots = roots[np.argsort(-lengths, kind="stable")[: morph.vessel_count]]
        roots_xy = base.nodes_N2[roots].astype(np.float64) * f
    else:
        roots_xy = None
    params["num_roots"] = 0 if roots_xy is None else len(roots_xy)
    return regrow_in_region(
        region,
        rng,
        branch_density=morph.branch_density,
        num_roots=morph.vessel_count,
        roots_xy=roots_xy,
        pixel_size=1.0 / f,
    )


# --- capillaries (OCTA) --------------------------------------------------------------------------------

_MESH_TILES: dict[int, list[np.ndarray]] = {}


def _mesh_tiles(size_px: int) -> list[np.ndarray]:
    """Per-process capillary mesh tiles (radius maps, 0.5 px on capillaries), twice the canvas, from
    constant seeds; each also transposed, for more variety per crop."""
    if size_px not in _MESH_TILES:
        tiles = []
        u = size_px / 512.0
        for t in range(_NUM_MESH_TILES):
            rng = np.random.default_rng([_MESH_SEED, size_px, t])
            spacing = (16.0 + 4.0 * t) * max(u, 0.3)
            mesh = capillary_mesh(2.0 * size_px, rng, spacing)
            tile = render_mask(mesh, (2 * size_px, 2 * size_px))[1]
            tiles.extend([tile, np.ascontiguousarray(tile.T)])
        _MESH_TILES.clear()
        _MESH_TILES[size_px] = tiles
    return _MESH_TILES[size_px]


def capillary_background(
    shape: tuple[int, int], rng: np.random.Generator, faz_xy: tuple[float, float], params: dict[str, Any]
) -> np.ndarray:
    """A radius map (HxW float32) holding a capillary mesh: a random crop of a mesh tile (or of its
    transpose), cleared inside a foveal zone of radius 6-9 % of the canvas at faz_xy. Draw vessels over
    it."""
    h, w = shape
    tiles = _mesh_tiles(min(h, w))
    d = rng.random(4)
    tile = tiles[int(d[0] * len(tiles))]
    y0 = int(d[1] * (tile.shape[0] - h))
    x0 = int(d[2] * (tile.shape[1] - w))
    # A plain copy of a crop (rows are contiguous): mirrored views would copy several times slower.
    crop = np.array(tile[y0 : y0 + h, x0 : x0 + w])
    faz_r = float((0.06 + 0.03 * d[3]) * min(h, w))
    cv2.circle(crop, (int(round(faz_xy[0])), int(round(faz_xy[1]))), int(round(faz_r)), 0.0, -1)
    params["capillaries"] = {
        "faz_xy_px": [round(float(faz_xy[0]), 2), round(float(faz_xy[1]), 2)],
        "faz_radius_px": round(faz_r, 2),
    }
    return crop


def roomiest_point(graph: VesselGraph, size_px: int, cells: int = 32) -> tuple[float, float]:
    """The point within 15 % of the canvas centre farthest from the graph's centrelines (on a coarse grid):
    where a foveal avascular zone fits."""
    cell = size_px / cells
    occupied = np.zeros((cells, cells), np.uint8)
    if graph.num_points:
        ij = np.clip((graph.points_P2 / cell).astype(np.int64), 0, cells - 1)
        occupied[ij[:, 1], ij[:, 0]] = 1
    dist = cv2.distanceTransform(1 - occupied, cv2.DIST_L2, 3)
    dist[~_CENTRE_DISC.get(cells, _centre_disc(cells))] = -1.0
    j = int(np.argmax(dist))
    return ((j % cells + 0.5) * cell, (j // cells + 0.5) * cell)


_CENTRE_DISC: dict[int, np.ndarray] = {}


def _centre_disc(cells: int) -> np.ndarray:
    yy, xx = np.mgrid[0:cells, 0:cells] + 0.5
    disc = (yy - cells / 2) ** 2 + (xx - cells / 2) ** 2 <= (0.15 * cells) ** 2
    _CENTRE_DISC[cells] = disc
    return disc


# --- the two functions the corpus calls ----------------------------------------------------------------


def _library_rng(cfg: EngineConfig, modality: str, i: int) -> np.random.Generator:
    # The modality's place among the built-in ones (not among cfg.modalities): its library does not
    # change when another modality is added to or removed from a corpus.
    return np.random.default_rng([cfg.seed, 0x11B, MODALITIES.index(modality), i])


def library_graph(graph: VesselGraph, size_px: int) -> VesselGraph:
    """A graph ready for the library: resampled to ~3 px point spacing, oriented, caches warmed."""
    g = resample_centrelines(graph, max(_LIBRARY_SPACING_PX * size_px / 512.0, 1.0))
    g = _oriented(g)
    _ = g.subtree_length_S, g.degree_N, g.segment_of_point_P
    region_of(g, size_px)
    return g


def read_seed_masks(folder: str | Path, size_px: int) -> list[np.ndarray]:
    """Every mask image in folder (sorted by name), binarised at half its max and resized to size_px."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"library.seed_mask_dir={str(folder)!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _MASK_EXTENSIONS)
    if not files:
        raise ValueError(
            f"library.seed_mask_dir={str(folder)!r} holds no mask images ({', '.join(_MASK_EXTENSIONS)})"
        )
    masks = []
    for f in files:
        m = cv2.imread(os.fspath(f), cv2.IMREAD_GRAYSCALE)
        if m is None or m.max() == 0:
            raise ValueError(f"seed mask {f} could not be read or has no vessel pixels")
        binary = (m > m.max() / 2).astype(np.float32)
        # Area-averaged resize keeps thin vessels that nearest-neighbour would break up.
        small = cv2.resize(binary, (size_px, size_px), interpolation=cv2.INTER_AREA)
        masks.append(np.where(small >= 0.5, 255, 0).astype(np.uint8))
    return masks


def build_library(cfg: EngineConfig) -> dict[str, list[VesselGraph]]:
    """Per modality in cfg.modalities, num_graphs_per_modality procedural masks decomposed into graphs
    (deterministic in cfg.seed), plus graphs from every mask in library.seed_mask_dir, shared by all."""
    size = cfg.image_size_px
    library: dict[str, list[VesselGraph]] = {}
    for modality in cfg.modalities:
        graphs = []
        for i in range(cfg.library.num_graphs_per_modality):
            rng = _library_rng(cfg, modality, i)
            controls = ProceduralControls(
                branch_density=float(rng.uniform(0.8, 1.2)),
                vessel_count=int(rng.integers(1, 4)),
                capillaries=False,
            )
            tree, _ = procedural_tree(modality, size, rng, controls)
            mask, _ = render_mask(tree, (size, size))
            graphs.append(library_graph(decompose(mask), size))
        library[modality] = graphs
    if cfg.library.seed_mask_dir:
        seeds = [library_graph(decompose(m), size) for m in read_seed_masks(cfg.library.seed_mask_dir, size)]
        for modality in library:
            library[modality].extend(seeds)
    return library


def make_mask(
    cfg: EngineConfig,
    modality: str,
    source: str,
    rng: np.random.Generator,
    library: dict[str, list[VesselGraph]],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A vessel mask from `source` for `modality`: (mask HxW uint8 {0,255}, radius_px HxW float32, params).

    params (JSON-ready) records the source, the morphology draw and the source's own choices. The output
    is a pure function of (cfg, modality, source, library, rng state).
    """
    if source not in SOURCES:
        raise ValueError(f"mask source {source!r} is not one of {list(SOURCES)}")
    size = cfg.image_size_px
    shape = (size, size)
    morph = draw_morphology(cfg.morphology, rng)
    params: dict[str, Any] = {"source": source, "morphology": morph.to_params()}
    graphs = library.get(modality) or []
    faz_xy: tuple[float, float] | None = None
    if source == "recombined" and graphs:
        g = recombine(graphs, shape, rng, morph, params=params)
    elif source == "regrowth" and graphs:
        gi = int(rng.integers(len(graphs)))
        params["library_graph"] = gi
        g = _regrow_from_library(graphs[gi], size, rng, morph, params)
        g = apply_morphology(g, rng, morph, size_px=size, thin=False)
    else:
        if source != "procedural":
            params["fallback"] = "procedural (empty library)"
        controls = ProceduralControls(
            branch_density=morph.branch_density,
            vessel_count=morph.vessel_count,
            tortuosity=morph.tortuosity,
            capillaries=False,
        )
        g, anatomy = procedural_tree(modality, size, rng, controls)
        params["anatomy"] = anatomy
        if "faz_xy_px" in anatomy:
            faz_xy = (float(anatomy["faz_xy_px"][0]), float(anatomy["faz_xy_px"][1]))
        g = apply_morphology(g, rng, morph, size_px=size, thin=False)
    background = None
    if modality == "octa":
        background = capillary_background(shape, rng, faz_xy or roomiest_point(g, size), params)
    mask, radius_px = render_mask(g, shape, background)
    if not mask.any():
        # Never hand out an empty mask (a piece pruned or placed away): fall back to a procedural tree.
        g, _ = procedural_tree(modality, size, rng)
        mask, radius_px = render_mask(g, shape)
        params["fallback"] = "procedural (empty mask)"
    params["num_segments"] = int(g.num_segments)
    return mask, radius_px, params


__all__ = [
    "SOURCES",
    "Morphology",
    "capillary_background",
    "apply_morphology",
    "build_library",
    "crop_to_canvas",
    "draw_morphology",
    "elastic_warp",
    "graft_twigs",
    "library_graph",
    "make_mask",
    "pick_piece",
    "place",
    "read_seed_masks",
    "recombine",
    "region_of",
    "roomiest_point",
    "regrow_in_region",
    "scale_radii",
    "thin_branches",
    "wiggle",
]
