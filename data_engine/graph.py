"""Vessel graphs: a binary vessel mask <-> centreline segments with radii, joined at nodes.

    graph = decompose(mask)                          # HxW, vessel > 0 (after thresholding at half the max)
    mask2, radius_px = render_mask(graph, mask.shape)  # uint8 {0,255}, float32 radius at each vessel pixel
    tree = orient(graph)                             # roots chosen, segments directed away from them

Layout. A graph is stored flat, so a geometric change is one vectorised array operation:
  nodes_N2    float32 (x, y) px of junctions, end points, isolated dots and loop anchors
  points_P2   float32 (x, y) px: the centrelines of all segments, concatenated in segment order
  radius_P    float32 px: vessel radius at each centreline point
  offsets_S1  int64, S + 1 entries: segment s is points_P2[offsets_S1[s]:offsets_S1[s + 1]]
  ends_S2     int64 node ids (start, end) of each segment; its first and last points lie on those nodes
  parent_S    int64 parent segment (-1: a root segment; always a smaller id than the child's), or None
              while the graph is not oriented
Legend: N nodes, P centreline points, S segments. Coordinates: pixel centres at integers, x = column,
y = row. A segment of one point is an isolated dot (start node == end node); a segment whose start and
end node are the same with several points is a loop.

In an oriented graph every segment runs away from its tree's root and its parent is the segment that
ends where it starts. Sub-trees are found through a depth-first preorder computed once per graph
(`preorder_S`), in which the sub-tree of segment s is a contiguous range: grafting and pruning are then
slices and masks, not graph walks, which keeps recombination within its per-sample budget.

Arrays are never copied on construction but made read-only, so graphs can share them safely.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, cast

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.morphology import skeletonize

# Sub-pixel precision of OpenCV drawing: coordinates carry this many fractional bits (1/16 px).
_SHIFT = 4
_ONE = 1 << _SHIFT
# Segments thinner than this everywhere are drawn as 1-px lines: a vessel one pixel wide has a
# measured area/length radius of 0.5, the next width up (2 px) 1.0; 0.7 was best on the real masks.
_THIN_RADIUS_PX = 0.7
# cv2.fillPoly covers pixels up to ~0.5 px beyond a polygon's outline (filled discs of radius r have
# the area of discs of radius r + 0.5), so outlines are drawn this much inside the radius; 0.4 gave the
# best round-trip Dice on the real masks (CHASE_DB1, CIMAT_XCA80, OCTA500_3M).
_FILL_GROWTH_PX = 0.4
# Vertices of each half-disc that rounds a segment's ends (besides the two side vertices).
_CAP_VERTICES = 4
# Connected blobs at most this many pixels across are kept as dots (one-point segments).
_DOT_SPAN_PX = 3
# Vertices of the polygons drawn for dots (unit circle).
_DISC_C = np.exp(2j * np.pi * np.arange(8) / 8)
# Vessels at least this wide (radius, px, by the distance transform at the skeleton) take their centreline
# and radius from the skeleton and the distance transform: past ~10 px the area/length estimate and the
# centroid refinement, which suit thin vessels, follow the shape's outline more than its axis.
_FAT_RADIUS_PX = 10.0
# Dots at least this wide (radius, px) are drawn as many-sided polygons of their area (_round_disc): an
# 8-gon is a visible octagon, 10 % short of the disc's area, by a lumen 40 px across.
_ROUND_DOT_PX = 4.0
# Half-width (points) of the window along a centreline over which area/length radii are averaged.
_RADIUS_WINDOW = 3

# Rotations (clockwise, from the left normal toward the tangent and on) of the cap vertices.
_CAP_TURNS_C = np.exp(-1j * np.pi * np.arange(1, _CAP_VERTICES + 1) / (_CAP_VERTICES + 1))


def _frozen(a: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    # Read-only, so graphs may share arrays; converted (copied) only when the dtype or layout differs.
    if not (type(a) is np.ndarray and a.dtype == dtype and a.ndim == len(shape) and a.flags.c_contiguous):
        a = np.ascontiguousarray(np.reshape(a, shape), dtype=dtype)
    if a.ndim == 2 and a.shape[1] != shape[1]:
        raise ValueError(f"expected an array of shape {shape}, got {a.shape}")
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class VesselGraph:
    """Vessel centrelines with radii, joined at nodes (layout in the module docstring)."""

    nodes_N2: np.ndarray  # float32 (x, y) px
    points_P2: np.ndarray  # float32 (x, y) px, segments concatenated
    radius_P: np.ndarray  # float32 px, radius at each centreline point
    offsets_S1: np.ndarray  # int64, S + 1 entries, segment s = points[offsets[s]:offsets[s+1]]
    ends_S2: np.ndarray  # int64 (start node, end node) of each segment
    parent_S: np.ndarray | None = None  # int64 parent segment, -1 for roots; None: not oriented

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "nodes_N2", _frozen(self.nodes_N2, np.float32, (-1, 2)))
        set_(self, "points_P2", _frozen(self.points_P2, np.float32, (-1, 2)))
        set_(self, "radius_P", _frozen(self.radius_P, np.float32, (-1,)))
        set_(self, "offsets_S1", _frozen(self.offsets_S1, np.int64, (-1,)))
        set_(self, "ends_S2", _frozen(self.ends_S2, np.int64, (-1, 2)))
        if self.parent_S is not None:
            set_(self, "parent_S", _frozen(self.parent_S, np.int64, (-1,)))
        # Cheap shape checks on every construction (graphs are built per sample); `validate` does the rest.
        num_s = len(self.ends_S2)
        assert len(self.offsets_S1) == num_s + 1 and self.offsets_S1[0] == 0, (
            "offsets_S1 needs S + 1 entries from 0"
        )
        assert self.offsets_S1[-1] == len(self.points_P2) == len(self.radius_P), (
            "points/radius/offsets disagree"
        )
        assert self.parent_S is None or len(self.parent_S) == num_s, "parent_S needs one entry per segment"

    def validate(self) -> None:
        """Check every invariant (O(size); construction only checks shapes). Raises AssertionError."""
        num_s = self.num_segments
        assert num_s == 0 or bool(np.all(np.diff(self.offsets_S1) >= 1)), "every segment needs a point"
        assert num_s == 0 or (self.ends_S2.min() >= 0 and self.ends_S2.max() < self.num_nodes), "bad node id"
        assert np.isfinite(self.points_P2).all() and np.isfinite(self.radius_P).all(), "non-finite geometry"
        if self.parent_S is not None:
            assert bool(np.all(self.parent_S < np.arange(num_s))), "a parent must come before its children"
            has = self.parent_S >= 0
            assert bool(np.all(self.ends_S2[self.parent_S[has], 1] == self.ends_S2[has, 0])), (
                "a segment must start where its parent ends"
            )

    # --- sizes and per-segment views ------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.nodes_N2)

    @property
    def num_segments(self) -> int:
        return len(self.ends_S2)

    @property
    def num_points(self) -> int:
        return len(self.points_P2)

    def segment(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Centreline points (n, 2) and radii (n,) of segment s."""
        a, b = int(self.offsets_S1[s]), int(self.offsets_S1[s + 1])
        return self.points_P2[a:b], self.radius_P[a:b]

    @cached_property
    def num_points_S(self) -> np.ndarray:
        """Centreline points of each segment."""
        return self.offsets_S1[1:] - self.offsets_S1[:-1]

    @cached_property
    def segment_of_point_P(self) -> np.ndarray:
        """Segment id of each centreline point."""
        return np.arange(self.num_segments).repeat(self.num_points_S)

    @cached_property
    def step_length_P(self) -> np.ndarray:
        """Length (px) from each point to the next point of its segment; 0 at each segment's last point."""
        if self.num_points < 2:
            return np.zeros(self.num_points, np.float64)
        step = np.zeros(self.num_points, np.float64)
        p = self.points_P2.astype(np.float64)
        step[:-1] = np.abs((p[1:, 0] - p[:-1, 0]) + 1j * (p[1:, 1] - p[:-1, 1]))
        step[self.offsets_S1[1:] - 1] = 0.0
        return step

    @cached_property
    def length_S(self) -> np.ndarray:
        """Centreline length (px) of each segment."""
        return np.bincount(self.segment_of_point_P, self.step_length_P, minlength=self.num_segments)

    @cached_property
    def mean_radius_S(self) -> np.ndarray:
        """Mean radius (px) of each segment's points."""
        sums = np.bincount(self.segment_of_point_P, self.radius_P, minlength=self.num_segments)
        return sums / np.maximum(self.num_points_S, 1)

    @cached_property
    def degree_N(self) -> np.ndarray:
        """Segment ends at each node (a loop counts twice, a dot once)."""
        dots = self.ends_S2[self.num_points_S == 1, 0]
        ends = np.concatenate([self.ends_S2[self.num_points_S > 1].ravel(), dots])
        return np.bincount(ends, minlength=self.num_nodes)

    @property
    def roots_R(self) -> np.ndarray:
        """Start nodes of root segments (empty while not oriented)."""
        if self.parent_S is None:
            return np.zeros(0, np.int64)
        return np.unique(self.ends_S2[self.parent_S < 0, 0])

    # --- oriented graphs: parents, sub-trees, depths ---------------------------------------------------
    def _require_oriented(self) -> np.ndarray:
        if self.parent_S is None:
            raise ValueError("this needs an oriented graph: call orient(graph) first")
        return self.parent_S

    @cached_property
    def subtree_size_S(self) -> np.ndarray:
        """Segments in the sub-tree hanging from each segment, itself included (oriented graphs)."""
        parent = self._require_oriented().tolist()
        size = [1] * self.num_segments
        # Parents come before children, so one backward pass accumulates sizes.
        for s in range(self.num_segments - 1, -1, -1):
            if parent[s] >= 0:
                size[parent[s]] += size[s]
        return np.asarray(size, np.int64)

    @cached_property
    def preorder_S(self) -> np.ndarray:
        """Depth-first preorder position of each segment (oriented graphs): the sub-tree of s takes the
        positions preorder_S[s] .. preorder_S[s] + subtree_size_S[s] - 1; siblings keep their id order."""
        parent = self._require_oriented().tolist()
        size = self.subtree_size_S.tolist()
        pos = [0] * self.num_segments
        next_free = [0] * self.num_segments
        free_root = 0
        for s in range(self.num_segments):
            p = parent[s]
            if p < 0:
                pos[s] = free_root
                free_root += size[s]
            else:
                pos[s] = next_free[p]
                next_free[p] += size[s]
            next_free[s] = pos[s] + 1
        return np.asarray(pos, np.int64)

    def subtree_mask(self, s: int) -> np.ndarray:
        """Bool per segment: in the sub-tree hanging from segment s (s included; oriented graphs)."""
        pos = self.preorder_S
        lo = int(pos[s])
        return np.asarray((pos >= lo) & (pos < lo + int(self.subtree_size_S[s])))

    @cached_property
    def subtree_length_S(self) -> np.ndarray:
        """Total centreline length (px) of the sub-tree hanging from each segment (oriented graphs)."""
        pos = self.preorder_S
        by_pos = np.zeros(self.num_segments)
        by_pos[pos] = self.length_S
        cum = np.concatenate([[0.0], np.cumsum(by_pos)])
        return np.asarray(cum[pos + self.subtree_size_S] - cum[pos])

    @cached_property
    def generation_S(self) -> np.ndarray:
        """Branchings passed from the root to each segment: root segments 0 (oriented graphs)."""
        parent = self._require_oriented()
        start_branches = (self.degree_N[self.ends_S2[:, 0]] >= 3).tolist()
        gen = [0] * self.num_segments
        parent_list = parent.tolist()
        for s in range(self.num_segments):
            p = parent_list[s]
            if p >= 0:
                gen[s] = gen[p] + (1 if start_branches[s] else 0)
        return np.asarray(gen, np.int64)

    @cached_property
    def height_S(self) -> np.ndarray:
        """Branch generations from the terminals: segments at a free end 0, then peel layer by layer.

        Works on any graph (see `terminal_layers`); segments on loops get a large value.
        """
        return terminal_layers(self, np.iinfo(np.int32).max)


def terminal_layers(graph: VesselGraph, max_layers: int) -> np.ndarray:
    """Peeling round in which each segment first touches a free end (degree-1 node), capped at max_layers.

    Round 0 takes every segment with a free end (and every dot); removing them frees the next layer, and
    so on. Segments on loops are never freed and keep max_layers, as does everything deeper than that.
    """
    num_s = graph.num_segments
    height = np.full(num_s, max_layers, np.int64)
    if num_s == 0:
        return height
    dots = graph.num_points_S == 1
    height[dots] = 0
    alive = ~dots
    ends = graph.ends_S2
    loops = (ends[:, 0] == ends[:, 1]) & ~dots
    peelable = alive & ~loops
    layer = 0
    while layer < max_layers and peelable.any():
        deg = np.bincount(ends[peelable].ravel(), minlength=graph.num_nodes)
        free = peelable & ((deg[ends[:, 0]] <= 1) | (deg[ends[:, 1]] <= 1))
        if not free.any():
            break
        height[free] = layer
        peelable &= ~free
        layer += 1
    return height


# --- building and editing graphs ----------------------------------------------------------------------


def empty_graph() -> VesselGraph:
    """A graph with no nodes and no segments (oriented, trivially)."""
    return VesselGraph(
        np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(1, np.int64), np.zeros((0, 2)), np.zeros(0)
    )


def graph_from_polylines(
    polylines: list[np.ndarray],
    radii: list[np.ndarray],
    *,
    snap_px: float = 0.01,
) -> VesselGraph:
    """An unoriented graph from centreline polylines; end points closer than `snap_px` share a node."""
    if len(polylines) != len(radii):
        raise ValueError(f"got {len(polylines)} polylines but {len(radii)} radius arrays")
    if not polylines:
        return empty_graph()
    points = np.concatenate([np.reshape(p, (-1, 2)) for p in polylines]).astype(np.float64)
    radius = np.concatenate([np.reshape(r, (-1,)) for r in radii]).astype(np.float64)
    counts = np.array([len(np.reshape(p, (-1, 2))) for p in polylines])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ends_xy = np.concatenate([points[offsets[:-1]], points[offsets[1:] - 1]])
    key = np.round(ends_xy / max(snap_px, 1e-6)).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    nodes = ends_xy[first]
    num_s = len(polylines)
    ends = np.stack([inverse.ravel()[:num_s], inverse.ravel()[num_s:]], 1)
    return VesselGraph(nodes, points, radius, offsets, ends)


def _gather_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + counts[i]) over i, vectorised."""
    cum = counts.cumsum()
    total = int(cum[-1]) if len(cum) else 0
    if total == 0:
        return np.zeros(0, np.int64)
    return (starts - (cum - counts)).repeat(counts) + np.arange(total)


def select_segments(graph: VesselGraph, keep_S: np.ndarray) -> VesselGraph:
    """The graph restricted to the segments where keep_S is True; unused nodes are dropped.

    Orientation is kept; a kept segment whose parent is dropped becomes a root.
    """
    keep = np.asarray(keep_S, bool)
    if keep.shape != (graph.num_segments,):
        raise ValueError(f"keep_S must have one entry per segment ({graph.num_segments}), got {keep.shape}")
    counts = graph.num_points_S[keep]
    idx = _gather_ranges(graph.offsets_S1[:-1][keep], counts)
    nodes, ends = compact_nodes(graph.nodes_N2, graph.ends_S2[keep])
    parent = None
    if graph.parent_S is not None:
        new_id = keep.cumsum() - 1
        par = graph.parent_S[keep]
        parent = np.where((par >= 0) & keep[np.maximum(par, 0)], new_id[np.maximum(par, 0)], -1)
    return VesselGraph(nodes, graph.points_P2[idx], graph.radius_P[idx], _offsets(counts), ends, parent)


def _offsets(counts: np.ndarray) -> np.ndarray:
    """Segment offsets (S + 1 entries from 0) from per-segment point counts."""
    out = np.zeros(len(counts) + 1, np.int64)
    counts.cumsum(out=out[1:])
    return out


def compact_nodes(nodes_N2: np.ndarray, ends_S2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Only the nodes some segment uses, and the segment ends renumbered to match (order kept)."""
    used = np.zeros(len(nodes_N2), bool)
    used[ends_S2.ravel()] = True
    if used.all():
        return nodes_N2, ends_S2
    return nodes_N2[used], (used.cumsum() - 1)[ends_S2]


def merge_graphs(graphs: list[VesselGraph]) -> VesselGraph:
    """All graphs side by side in one (node and segment ids shifted); oriented if all inputs are."""
    graphs = [g for g in graphs if g.num_segments > 0]
    if not graphs:
        return empty_graph()
    if len(graphs) == 1:
        return graphs[0]
    node_shift = np.cumsum([0] + [g.num_nodes for g in graphs[:-1]])
    seg_shift = np.cumsum([0] + [g.num_segments for g in graphs[:-1]])
    point_shift = np.cumsum([0] + [g.num_points for g in graphs[:-1]])
    oriented = all(g.parent_S is not None for g in graphs)
    parent = None
    if oriented:
        parent = np.concatenate(
            [np.where(g.parent_S >= 0, g.parent_S + k, -1) for g, k in zip(graphs, seg_shift, strict=True)]  # type: ignore[operator]
        )
    return VesselGraph(
        np.concatenate([g.nodes_N2 for g in graphs]),
        np.concatenate([g.points_P2 for g in graphs]),
        np.concatenate([g.radius_P for g in graphs]),
        np.concatenate([[0]] + [g.offsets_S1[1:] + k for g, k in zip(graphs, point_shift, strict=True)]),
        np.concatenate([g.ends_S2 + k for g, k in zip(graphs, node_shift, strict=True)]),
        parent,
    )


def with_geometry(
    graph: VesselGraph,
    points_P2: np.ndarray,
    radius_P: np.ndarray | None = None,
    nodes_N2: np.ndarray | None = None,
) -> VesselGraph:
    """Same topology, new centreline points (and radii / node positions, when given)."""
    if nodes_N2 is None:
        # Nodes follow the centreline ends they sit on.
        nodes = graph.nodes_N2.copy()
        nodes[graph.ends_S2[:, 0]] = points_P2[graph.offsets_S1[:-1]]
        nodes[graph.ends_S2[:, 1]] = points_P2[graph.offsets_S1[1:] - 1]
        nodes_N2 = nodes
    return VesselGraph(
        nodes_N2,
        points_P2,
        graph.radius_P if radius_P is None else radius_P,
        graph.offsets_S1,
        graph.ends_S2,
        graph.parent_S,
    )


def subtree(graph: VesselGraph, s: int) -> VesselGraph:
    """Segment s of an oriented graph and everything downstream of it, as a graph rooted at s's start."""
    return select_segments(graph, graph.subtree_mask(s))


def subtree_from_node(graph: VesselGraph, node: int) -> VesselGraph:
    """Every segment leaving `node` (downstream, oriented graph) with its sub-tree."""
    graph._require_oriented()
    keep = np.zeros(graph.num_segments, bool)
    for s in np.nonzero(graph.ends_S2[:, 0] == node)[0].tolist():
        keep |= graph.subtree_mask(s)
    return select_segments(graph, keep)


def side_twigs(graph: VesselGraph) -> np.ndarray:
    """Bool per segment: a side branch with a free end, i.e. a segment with one end of degree 1 whose
    other end is a junction where it is not among the two thickest vessels (by radius at that node).

    So at a fork the parent and the continuing vessel stay and the thinner branch is the twig; the tip
    of a vessel past its last fork is not a twig. Works on any graph, oriented or not.
    """
    num_s = graph.num_segments
    if num_s == 0:
        return np.zeros(0, bool)
    deg = graph.degree_N
    ends = graph.ends_S2
    first, last = graph.offsets_S1[:-1], graph.offsets_S1[1:] - 1
    # Every segment end: (node, radius there, segment); rank the ends at each node, thickest first.
    node = ends.T.ravel()
    radius = np.concatenate([graph.radius_P[first], graph.radius_P[last]])
    seg = np.concatenate([np.arange(num_s), np.arange(num_s)])
    order = np.lexsort((seg, -radius, node))
    sorted_node = node[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_node[1:] != sorted_node[:-1]]))
    rank = np.empty(2 * num_s, np.int64)
    group = np.cumsum(np.concatenate([[True], sorted_node[1:] != sorted_node[:-1]])) - 1
    rank[order] = np.arange(2 * num_s) - starts[group]
    rank_start, rank_end = rank[:num_s], rank[num_s:]
    free_start, free_end = deg[ends[:, 0]] == 1, deg[ends[:, 1]] == 1
    multi = graph.num_points_S > 1
    twig_at_end = free_start & (deg[ends[:, 1]] >= 3) & (rank_end >= 2)
    twig_at_start = free_end & (deg[ends[:, 0]] >= 3) & (rank_start >= 2)
    return np.asarray(multi & (twig_at_end | twig_at_start))


def prune_terminal_generations(graph: VesselGraph, depth: int) -> VesselGraph:
    """Remove `depth` generations of side branches from the periphery: `side_twigs` go, then the twigs
    that this frees, and so on. Main vessels (and their tips past the last fork) stay."""
    g = graph
    for _ in range(max(depth, 0)):
        twigs = side_twigs(g)
        if not twigs.any():
            break
        g = select_segments(g, ~twigs)
    return g


# --- geometry -------------------------------------------------------------------------------------------


def affine(graph: VesselGraph, matrix_23: np.ndarray) -> VesselGraph:
    """Apply the 2x3 affine map [A | t] to (x, y); radii scale by sqrt|det A|."""
    m = np.asarray(matrix_23, np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"matrix_23 must be 2x3, got {m.shape}")
    lin, t = m[:, :2], m[:, 2]
    radius_factor = math.sqrt(abs(float(np.linalg.det(lin))))

    def apply(xy: np.ndarray) -> np.ndarray:
        # Written out rather than a matrix product, which would start BLAS threads for large graphs.
        x, y = xy[:, 0].astype(np.float64), xy[:, 1]
        out = np.empty((len(xy), 2))
        out[:, 0] = lin[0, 0] * x + lin[0, 1] * y + t[0]
        out[:, 1] = lin[1, 0] * x + lin[1, 1] * y + t[1]
        return out

    return VesselGraph(
        apply(graph.nodes_N2),
        apply(graph.points_P2),
        graph.radius_P * radius_factor,
        graph.offsets_S1,
        graph.ends_S2,
        graph.parent_S,
    )


def translate(graph: VesselGraph, dx_px: float, dy_px: float) -> VesselGraph:
    """Shift by (dx, dy) px."""
    return affine(graph, np.array([[1.0, 0.0, dx_px], [0.0, 1.0, dy_px]]))


def rotate(graph: VesselGraph, angle_deg: float, centre_xy: tuple[float, float]) -> VesselGraph:
    """Rotate by angle_deg (counter-clockwise as seen on screen, y down) about centre_xy."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    cx, cy = centre_xy
    # With y pointing down, x' = c x + s y turns the picture counter-clockwise on screen.
    lin = np.array([[c, s], [-s, c]])
    t = np.array([cx, cy]) - lin @ np.array([cx, cy])
    return affine(graph, np.column_stack([lin, t]))


def scale(graph: VesselGraph, factor: float, centre_xy: tuple[float, float] = (0.0, 0.0)) -> VesselGraph:
    """Scale positions and radii by `factor` about centre_xy."""
    cx, cy = centre_xy
    return affine(graph, np.array([[factor, 0.0, cx * (1 - factor)], [0.0, factor, cy * (1 - factor)]]))


def flip(graph: VesselGraph, axis: Literal["x", "y"], size_px: int) -> VesselGraph:
    """Mirror left-right (axis='x': x -> size_px-1-x) or top-bottom (axis='y')."""
    if axis == "x":
        return affine(graph, np.array([[-1.0, 0.0, size_px - 1.0], [0.0, 1.0, 0.0]]))
    if axis == "y":
        return affine(graph, np.array([[1.0, 0.0, 0.0], [0.0, -1.0, size_px - 1.0]]))
    raise ValueError(f"axis={axis!r} must be 'x' or 'y'")


def point_normals(graph: VesselGraph) -> np.ndarray:
    """Unit normal (P, 2) at each centreline point: the tangent (central difference within its segment)
    turned by +90 degrees; (0, 0) where a segment has no length."""
    z = to_complex(graph.points_P2)
    seg = graph.segment_of_point_P
    i = np.arange(graph.num_points)
    t = z[np.minimum(i + 1, graph.offsets_S1[1:][seg] - 1)] - z[np.maximum(i - 1, graph.offsets_S1[:-1][seg])]
    return to_xy(1j * t / np.maximum(np.abs(t), 1e-9))


def to_complex(xy_N2: np.ndarray) -> np.ndarray:
    """(N, 2) (x, y) -> complex128 x + iy (complex arithmetic keeps 2-D geometry to few numpy calls)."""
    return xy_N2[:, 0].astype(np.float64) + 1j * xy_N2[:, 1]


def to_xy(z: np.ndarray) -> np.ndarray:
    """complex128 x + iy -> (N, 2) float64 (x, y), as a view where possible."""
    return np.ascontiguousarray(z, np.complex128).view(np.float64).reshape(-1, 2)


def resample_centrelines(graph: VesselGraph, spacing_px: float) -> VesselGraph:
    """Every segment re-sampled at even arc-length steps of about spacing_px (its ends kept exactly);
    radii interpolated. Dots and zero-length segments stay as they are."""
    if graph.num_segments == 0:
        return graph
    length = graph.length_S
    counts = graph.num_points_S
    new_counts = np.where(
        (counts >= 2) & (length > 0), np.maximum(np.ceil(length / spacing_px).astype(np.int64) + 1, 2), counts
    )
    seg = graph.segment_of_point_P
    step = graph.step_length_P
    cum = np.cumsum(step) - step  # arc length from the first point of all, at each point
    local = cum - cum[graph.offsets_S1[:-1]][seg]
    # One increasing key over all segments: segment index * span + arc length along it.
    span = float(length.max()) + 1.0
    key = seg * span + local
    new_seg = np.repeat(np.arange(graph.num_segments), new_counts)
    new_off = np.concatenate([[0], np.cumsum(new_counts)])
    k = np.arange(int(new_off[-1])) - new_off[:-1][new_seg]
    frac = k / np.maximum(new_counts[new_seg] - 1, 1)
    qkey = new_seg * span + frac * length[new_seg]
    pts = graph.points_P2.astype(np.float64)
    x = np.interp(qkey, key, pts[:, 0])
    y = np.interp(qkey, key, pts[:, 1])
    r = np.interp(qkey, key, graph.radius_P.astype(np.float64))
    # Unchanged segments (dots, zero length) copy their points, including any duplicates.
    same = (new_counts == counts)[new_seg] & ((counts < 2) | (length <= 0))[new_seg]
    if same.any():
        src = graph.offsets_S1[:-1][new_seg[same]] + k[same]
        x[same], y[same], r[same] = pts[src, 0], pts[src, 1], graph.radius_P[src]
    return VesselGraph(graph.nodes_N2, np.stack([x, y], 1), r, new_off, graph.ends_S2, graph.parent_S)


def split_segments_at(graph: VesselGraph, point_ids: np.ndarray) -> tuple[VesselGraph, np.ndarray]:
    """Turn interior centreline points into nodes (junctions to be): each splits its segment in two.

    Returns the new graph (unoriented: grafting onto the new nodes changes the tree) and the node id of
    each given point. Points that are a segment's first or last point keep that segment's node.
    """
    pid = np.asarray(point_ids, np.int64).ravel()
    if pid.size == 0:
        return graph, np.zeros(0, np.int64)
    seg = graph.segment_of_point_P
    first = graph.offsets_S1[:-1][seg[pid]]
    last = graph.offsets_S1[1:][seg[pid]] - 1
    at_start, at_end = pid == first, pid == last
    node_of = np.where(at_start, graph.ends_S2[seg[pid], 0], graph.ends_S2[seg[pid], 1])
    interior, inverse = np.unique(pid[~at_start & ~at_end], return_inverse=True)
    if interior.size == 0:
        return graph, node_of
    num_new = len(interior)
    new_node_ids = graph.num_nodes + np.arange(num_new)
    is_split = np.zeros(graph.num_points, bool)
    is_split[interior] = True
    # Each split point appears twice: the end of the first part and the start of the second.
    copies = 1 + is_split
    src = np.repeat(np.arange(graph.num_points), copies)
    pos_of_point = np.cumsum(copies) - copies
    starts = np.concatenate([pos_of_point[graph.offsets_S1[:-1]], pos_of_point[interior] + 1])
    split_node_at_start = np.concatenate([np.full(graph.num_segments, -1), new_node_ids])
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    start_node = np.where(
        split_node_at_start[order] >= 0,
        split_node_at_start[order],
        graph.ends_S2[:, 0][np.minimum(order, graph.num_segments - 1)],
    )
    # A part ends at the next part's start node when that part continues the same original segment.
    orig_seg = seg[src[starts]]
    cont = np.concatenate([orig_seg[1:] == orig_seg[:-1], [False]])
    end_node = np.where(cont, np.concatenate([start_node[1:], [0]]), graph.ends_S2[orig_seg, 1])
    new_nodes = np.concatenate([graph.nodes_N2, graph.points_P2[interior]])
    node_of[~at_start & ~at_end] = new_node_ids[inverse]
    return (
        VesselGraph(
            new_nodes,
            graph.points_P2[src],
            graph.radius_P[src],
            np.concatenate([starts, [len(src)]]),
            np.stack([start_node, end_node], 1),
        ),
        node_of,
    )


def bounding_box(graph: VesselGraph) -> tuple[float, float, float, float]:
    """(x_min, y_min, x_max, y_max) of the centreline points widened by their radii."""
    if graph.num_points == 0:
        return (0.0, 0.0, 0.0, 0.0)
    p, r = graph.points_P2, graph.radius_P
    return (
        float((p[:, 0] - r).min()),
        float((p[:, 1] - r).min()),
        float((p[:, 0] + r).max()),
        float((p[:, 1] + r).max()),
    )


def summary_stats(graph: VesselGraph) -> dict[str, float | int]:
    """JSON-ready counts and sizes: segments, nodes, junctions, end points, roots, connected components,
    total centreline length (px) and length-weighted mean radius (px)."""
    length = float(graph.length_S.sum())
    if length > 0:
        # Length-weighted, so a long thin vessel counts more than a one-pixel stub.
        step = graph.step_length_P
        r = graph.radius_P.astype(np.float64)
        mean_r = float(np.sum(step * r) / length)
    else:
        mean_r = float(graph.radius_P.mean()) if graph.num_points else 0.0
    return {
        "num_segments": int(graph.num_segments),
        "num_nodes": int(graph.num_nodes),
        "num_junctions": int(np.count_nonzero(graph.degree_N >= 3)),
        "num_end_points": int(np.count_nonzero(graph.degree_N == 1)),
        "num_roots": int(len(graph.roots_R)),
        "num_components": int(len(np.unique(_components(graph)[1][graph.ends_S2[:, 0]]))),
        "total_length_px": round(length, 3),
        "mean_radius_px": round(mean_r, 4),
    }


# --- orientation ------------------------------------------------------------------------------------


def _components(graph: VesselGraph) -> tuple[int, np.ndarray]:
    n = graph.num_nodes
    e = graph.ends_S2
    adj = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    num, labels = connected_components(adj, directed=False)
    return int(num), labels


def infer_roots(graph: VesselGraph) -> np.ndarray:
    """One root node per connected component: where its vessels are thickest.

    Vessel trees are thickest at their inflow, so each component is rooted at the free end (degree 1)
    with the thickest vessel if that is at least 80 % of the component's thickest vessel, else at the
    node with the thickest vessel (an optic disc, say, where several trunks meet).
    """
    if graph.num_nodes == 0:
        return np.zeros(0, np.int64)
    num, labels = _components(graph)
    # Thickest incident radius per node, from the segment ends.
    first = graph.offsets_S1[:-1]
    last = graph.offsets_S1[1:] - 1
    end_r = np.zeros(graph.num_nodes)
    np.maximum.at(end_r, graph.ends_S2[:, 0], graph.radius_P[first])
    np.maximum.at(end_r, graph.ends_S2[:, 1], graph.radius_P[last])
    free = graph.degree_N == 1
    roots = np.zeros(num, np.int64)
    comp_max = np.zeros(num)
    np.maximum.at(comp_max, labels, end_r)
    # Rank nodes by (component, is-qualifying free end, radius) and take the best of each component.
    qualifies = free & (end_r >= 0.8 * comp_max[labels])
    score = end_r + np.where(qualifies, 1e6, 0.0)
    order = np.lexsort((-score, labels))
    first_of_comp = np.concatenate([[True], labels[order][1:] != labels[order][:-1]])
    roots[labels[order][first_of_comp]] = order[first_of_comp]
    return roots


def orient(graph: VesselGraph, roots: np.ndarray | None = None) -> VesselGraph:
    """Direct every segment away from the roots and store segments in depth-first preorder.

    `roots`: node ids to grow from (default: the graph's own roots if oriented, else `infer_roots`).
    Components without a given root get an inferred one. Each segment's parent is the segment by which
    a breadth-first search from the roots first reached its start node.
    """
    if graph.num_segments == 0:
        return empty_graph()
    if roots is None:
        roots = graph.roots_R if graph.parent_S is not None else infer_roots(graph)
    roots = np.asarray(roots, np.int64)
    num_comp, labels = _components(graph)
    have = np.zeros(num_comp, bool)
    have[labels[roots]] = True
    if not have.all():
        extra = infer_roots(graph)
        roots = np.concatenate([roots, extra[~have[labels[extra]]]])

    n = graph.num_nodes
    incident: list[list[int]] = [[] for _ in range(n)]
    ends = graph.ends_S2.tolist()
    for s, (a, b) in enumerate(ends):
        incident[a].append(s)
        if b != a:
            incident[b].append(s)
    depth = [-1] * n
    parent_seg_of_node = [-1] * n
    seg_parent = [-2] * graph.num_segments
    reverse = [False] * graph.num_segments
    queue: deque[int] = deque()
    for r in roots.tolist():
        if depth[r] < 0:
            depth[r] = 0
            queue.append(r)
    while queue:
        u = queue.popleft()
        for s in incident[u]:
            if seg_parent[s] != -2:
                continue
            a, b = ends[s]
            v = b if a == u else a
            reverse[s] = a != u
            seg_parent[s] = parent_seg_of_node[u]
            if depth[v] < 0:
                depth[v] = depth[u] + 1
                parent_seg_of_node[v] = s
                queue.append(v)
    assert min(seg_parent) >= -1, "every segment is reachable from a root of its component"

    # Depth-first preorder of the parent forest: sub-trees become contiguous ranges.
    children: list[list[int]] = [[] for _ in range(graph.num_segments)]
    top: list[int] = []
    for s, p in enumerate(seg_parent):
        (children[p] if p >= 0 else top).append(s)
    order: list[int] = []
    stack = top[::-1]
    while stack:
        s = stack.pop()
        order.append(s)
        stack.extend(children[s][::-1])
    order_a = np.asarray(order, np.int64)
    new_id = np.empty(graph.num_segments, np.int64)
    new_id[order_a] = np.arange(graph.num_segments)

    counts = graph.num_points_S[order_a]
    starts = graph.offsets_S1[:-1][order_a]
    idx = _gather_ranges(starts, counts)
    # Reversed segments read their points backwards: map each gathered index into its mirror.
    rev = np.asarray(reverse, bool)[order_a]
    seg_of = np.repeat(np.arange(len(order_a)), counts)
    rev_p = rev[seg_of]
    idx = np.where(rev_p, 2 * np.repeat(starts, counts) + np.repeat(counts, counts) - 1 - idx, idx)
    new_ends = graph.ends_S2[order_a].copy()
    new_ends[rev] = new_ends[rev][:, ::-1]
    parent_old = np.asarray(seg_parent, np.int64)[order_a]
    new_parent = np.where(parent_old >= 0, new_id[np.maximum(parent_old, 0)], -1)
    return VesselGraph(
        graph.nodes_N2,
        graph.points_P2[idx],
        graph.radius_P[idx],
        np.concatenate([[0], np.cumsum(counts)]),
        new_ends,
        new_parent,
    )


# --- rendering ------------------------------------------------------------------------------------------


def render_mask(
    graph: VesselGraph, shape: tuple[int, int], radius_px: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the graph: (mask HxW uint8 {0,255}, radius_px HxW float32, vessel radius at vessel pixels).

    Segments thinner than 0.7 px radius everywhere are 1-px lines (all in one OpenCV call); thicker ones
    are filled outlines (offset curves with round caps) at 1/16 px precision, one fill each, thinnest
    first so a thick vessel's radius wins where vessels overlap. A vessel wider than _FAT_RADIUS_PX whose
    outline would fold over itself is filled as convex pieces instead (discs along it, trapezoids between).
    Isolated dots are filled discs. Pass radius_px (HxW float32) to draw over an existing radius map (it is
    drawn into and returned).
    """
    h, w = int(shape[0]), int(shape[1])
    if radius_px is None:
        radius_img = np.zeros((h, w), np.float32)
    else:
        if radius_px.shape != (h, w) or radius_px.dtype != np.float32:
            raise ValueError(f"radius_px must be float32 {h}x{w}, got {radius_px.dtype} {radius_px.shape}")
        radius_img = radius_px
    if graph.num_segments == 0:
        return vessel_mask(radius_img), radius_img
    r = graph.radius_P
    off = graph.offsets_S1
    seg_max_r = np.maximum.reduceat(r, off[:-1])
    dot = (graph.num_points_S == 1) | (graph.length_S < 1e-3)
    thin = (seg_max_r < _THIN_RADIUS_PX) & ~dot
    thick = ~thin & ~dot
    pts_c = to_complex(graph.points_P2)

    # 1-px lines: every consecutive point pair of the thin segments, as 2-point polylines.
    if thin.any():
        seg_of = graph.segment_of_point_P
        pair = np.nonzero(thin[seg_of[:-1]] & (seg_of[:-1] == seg_of[1:]))[0]
        lines = np.empty((len(pair), 2), np.complex128)
        lines[:, 0], lines[:, 1] = pts_c[pair], pts_c[pair + 1]
        # An (n, 2, 2) array is n two-point polylines to OpenCV (no list of n arrays to build).
        cv2.polylines(
            radius_img, cast(Sequence[np.ndarray], _fixed_c(lines)), False, 0.5, 1, cv2.LINE_8, _SHIFT
        )

    # Filled shapes, thinnest first: outlines of thick segments and discs of dots.
    shapes: list[np.ndarray | list[np.ndarray]] = []
    shape_r: list[np.ndarray] = []
    if thick.any():
        polys, seg_r = _outlines(pts_c, r, off, np.nonzero(thick)[0])
        shapes.extend(polys)
        shape_r.append(seg_r)
    dots = np.nonzero(dot)[0]
    if len(dots):
        dot_r = np.maximum.reduceat(r, off[:-1])[dots]
        dot_c = np.add.reduceat(pts_c, off[:-1])[dots] / graph.num_points_S[dots]
        # Discs as 8-gons drawn like the outlines (and as much inside the radius): a 1-px dot is a
        # polygon of almost no size, which fills its one pixel.
        rr = np.maximum(dot_r.astype(np.float64) - _FILL_GROWTH_PX, 0.05)
        discs = _fixed_c(dot_c[:, None] + rr[:, None] * _DISC_C[None, :])
        first_dot = len(shapes)
        shapes.extend(discs)
        for k in np.nonzero(dot_r >= _ROUND_DOT_PX)[0].tolist():  # wide dots: more sides (_round_disc)
            shapes[first_dot + k] = _round_disc(complex(dot_c[k]), float(rr[k]))
        shape_r.append(dot_r.astype(np.float64))
    all_r = np.concatenate(shape_r) if shape_r else np.zeros(0)
    order = np.argsort(all_r, kind="stable")
    values = all_r[order].tolist()
    for k, v in zip(order.tolist(), values, strict=True):
        piece = shapes[k]
        if isinstance(piece, list):  # a folded vessel's convex pieces (_swept_pieces), one fill each
            for convex in piece:
                cv2.fillConvexPoly(radius_img, convex, v, cv2.LINE_8, _SHIFT)
        else:
            cv2.fillPoly(radius_img, [piece], v, cv2.LINE_8, _SHIFT)
    return vessel_mask(radius_img), radius_img


def _round_disc(centre: complex, radius: float) -> np.ndarray:
    """A wide dot's polygon: enough vertices to stay within ~0.25 px of the circle, with its area."""
    n = 4 * math.ceil(math.pi * math.sqrt(2.0 * radius) / 4)
    area_gain = math.sqrt(math.pi / (0.5 * n * math.sin(2.0 * math.pi / n)))
    return _fixed_c(centre + radius * area_gain * np.exp(2j * np.pi * np.arange(n) / n))


def vessel_mask(radius_px: np.ndarray) -> np.ndarray:
    """uint8 {0,255} mask of the pixels with a positive radius."""
    # OpenCV takes a plain number as the second operand (a scalar); the type stubs only know arrays.
    return np.asarray(cv2.compare(radius_px, 0.0, cv2.CMP_GT))  # type: ignore[call-overload]


def _fixed_c(z: np.ndarray) -> np.ndarray:
    """Complex (x + iy) points -> int32 (..., 2) fixed-point coordinates for OpenCV drawing."""
    # A complex128 array viewed as float64 is its (real, imag) pairs: no stacking needed.
    zz = np.ascontiguousarray(np.rint(z * _ONE), np.complex128)
    return zz.view(np.float64).reshape(*z.shape, 2).astype(np.int32)


def _outlines(
    pts_c: np.ndarray, r: np.ndarray, off: np.ndarray, segs: np.ndarray
) -> tuple[list[np.ndarray | list[np.ndarray]], np.ndarray]:
    """Closed outlines (fixed-point int32 polygons; a wide segment whose outline folds: a list of convex
    pieces, _swept_pieces) of the given segments and their mean radii.

    Per outline: the left offset curve forward, a half-disc around the end, the right offset curve
    backward, a half-disc around the start. Complex arithmetic: the normal is i * tangent.
    """
    counts = off[segs + 1] - off[segs]
    idx = _gather_ranges(off[segs], counts)
    p = pts_c[idx]
    r_seg = r[idx].astype(np.float64)
    rr = np.maximum(r_seg - _FILL_GROWTH_PX, 0.05)
    n_seg = len(segs)
    seg_of = np.arange(n_seg).repeat(counts)
    last = counts.cumsum() - 1
    first = last - counts + 1
    i = np.arange(len(p))
    t = p[np.minimum(i + 1, last[seg_of])] - p[np.maximum(i - 1, first[seg_of])]
    side = 1j * t * (rr / np.maximum(np.abs(t), 1e-9))  # left offset
    c = _CAP_VERTICES
    # Gather vertex sources from one array: [left, right, end caps, start caps].
    source = np.concatenate(
        [
            p + side,
            p - side,
            (p[last][:, None] + side[last][:, None] * _CAP_TURNS_C).ravel(),
            (p[first][:, None] - side[first][:, None] * _CAP_TURNS_C).ravel(),
        ]
    )
    num_v = 2 * counts + 2 * c
    v_end = num_v.cumsum()
    v_seg = np.arange(n_seg).repeat(num_v)
    q = np.arange(int(v_end[-1])) - (v_end - num_v)[v_seg]
    m, f = counts[v_seg], first[v_seg]
    n_pts = len(p)
    gather = np.where(
        q < m,
        f + q,
        np.where(
            q < m + c,
            2 * n_pts + v_seg * c + (q - m),
            np.where(
                q < 2 * m + c,
                n_pts + f + (2 * m + c - 1 - q),
                2 * n_pts + (n_seg + v_seg) * c + (q - 2 * m - c),
            ),
        ),
    )
    verts = _fixed_c(source[gather])
    bounds = np.concatenate([[0], v_end]).tolist()
    polys: list[np.ndarray | list[np.ndarray]] = [verts[bounds[i] : bounds[i + 1]] for i in range(n_seg)]
    # An offset curve that steps backward against its centreline folds over itself: the vessel is wider
    # than its centreline's radius of curvature (a lumen tens of px wide on a jittery skeleton), and the
    # outline would fill with holes and spikes. Such segments are drawn as convex pieces instead.
    # Only wide segments are tested (none in most masks, so nothing is computed on the usual path).
    for k in np.nonzero(np.maximum.reduceat(rr, first) >= _FAT_RADIUS_PX)[0].tolist():
        pk, sk = p[first[k] : last[k] + 1], side[first[k] : last[k] + 1]
        step = np.diff(pk)
        if ((np.conj(np.diff(pk + sk)) * step).real < 0).any() or (
            (np.conj(np.diff(pk - sk)) * step).real < 0
        ).any():
            polys[k] = _swept_pieces(pk, rr[first[k] : last[k] + 1])
    seg_r = np.add.reduceat(r_seg, first) / counts
    return polys, seg_r


def _swept_pieces(p: np.ndarray, rr: np.ndarray) -> list[np.ndarray]:
    """One vessel as convex pieces whose union is the disc swept along its centreline: a disc at every
    point and, between consecutive points, the trapezoid their discs span across the step."""
    pieces = [
        _round_disc(complex(c), float(r)) if r >= _ROUND_DOT_PX else _fixed_c(c + r * _DISC_C)
        for c, r in zip(p.tolist(), rr.tolist(), strict=True)
    ]
    step = np.diff(p)
    length = np.abs(step)
    normal = 1j * step / np.maximum(length, 1e-9)
    side0, side1 = normal * rr[:-1], normal * rr[1:]
    quads = np.stack([p[:-1] + side0, p[1:] + side1, p[1:] - side1, p[:-1] - side0], axis=1)
    pieces.extend(_fixed_c(quads[length > 1e-6]))
    return pieces


# --- decomposition --------------------------------------------------------------------------------------

# 8-neighbourhood: the four edge neighbours first, then the diagonals (dy, dx).
_OFFSETS_8 = ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


def binarize(mask: np.ndarray) -> np.ndarray:
    """Vessel pixels of a mask: above half its maximum (any non-zero for 0/1 or 0/255 masks)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    top = float(mask.max()) if mask.size else 0.0
    if top <= 0:
        return np.zeros(mask.shape, bool)
    return np.asarray(mask > top / 2)


def decompose(mask: np.ndarray) -> VesselGraph:
    """Binary vessel mask (HxW, vessel > half the max) -> unoriented VesselGraph.

    skeleton -> junction clusters, end points, dots and loops as nodes -> centreline paths traced between
    them -> skeleton spurs that lie inside their parent vessel removed, pass-through nodes merged ->
    sub-pixel centreline (centroid of the mask pixels nearest each skeleton pixel) and radius (mask
    area per centreline length, averaged over a few pixels; sqrt(area / pi) for dots). Vessels wider than
    _FAT_RADIUS_PX keep the skeleton pixel and the distance transform there (the medial axis), and round
    blobs (a skeleton shorter than their inscribed radius: a lumen cut across) become dots.
    """
    binary = binarize(mask)
    if not binary.any():
        return empty_graph()
    h, w = binary.shape
    skel = skeletonize(binary)
    # A component the thinning erased entirely (it should not, but be sure) keeps its deepest pixel.
    num_cc, cc, stats, centroids = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=8)
    has = np.zeros(num_cc, bool)
    has[cc[skel]] = True
    edt = cv2.distanceTransform(binary.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Blobs at most _DOT_SPAN_PX across become dots: one skeleton pixel (nearest their centroid), so they
    # are kept as one-point segments with the radius of their area. So do round blobs, whose skeleton is
    # shorter than their inscribed radius (a vessel cut across: a lumen in ultrasound or a CT slice); a
    # path of 2-3 pixels would draw them as a polygon about a centreline that is not there.
    tiny = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]) <= _DOT_SPAN_PX
    skel_px = np.bincount(cc[skel], minlength=num_cc)
    inscribed = np.zeros(num_cc, np.float64)
    np.maximum.at(inscribed, cc[binary], edt[binary])
    tiny |= skel_px < _exact_distance(inscribed)
    tiny[0] = False
    missing = np.nonzero((~has | tiny)[1:])[0] + 1
    if len(missing):
        skel[tiny[cc]] = False
        for lab in missing.tolist():
            x0, y0, bw, bh = (int(v) for v in stats[lab, :4])
            ys, xs = np.nonzero(cc[y0 : y0 + bh, x0 : x0 + bw] == lab)
            cx, cy = centroids[lab]
            k = int(np.argmin((xs + x0 - cx) ** 2 + (ys + y0 - cy) ** 2))
            skel[ys[k] + y0, xs[k] + x0] = True

    ys, xs = np.nonzero(skel)
    num_p = len(ys)
    idmap = np.full((h + 2, w + 2), -1, np.int64)
    idmap[ys + 1, xs + 1] = np.arange(num_p)
    nb = np.stack([idmap[ys + 1 + dy, xs + 1 + dx] for dy, dx in _OFFSETS_8], axis=1)
    # m-adjacency: a diagonal neighbour that is also reachable through a shared edge neighbour is not a
    # neighbour, so staircases and corners do not read as junctions.
    for k, (dy, dx) in enumerate(_OFFSETS_8[4:], start=4):
        shared = (idmap[ys + 1 + dy, xs + 1] >= 0) | (idmap[ys + 1, xs + 1 + dx] >= 0)
        nb[shared, k] = -1
    degree = (nb >= 0).sum(axis=1)

    # Exact distances (OpenCV's precise transform differs in the last bits between calls; see
    # _exact_distance), so that spur pruning and the radii are the same on every call.
    edt_p = _exact_distance(edt[ys, xs])

    # Nodes: clusters of junction pixels, end pixels, isolated pixels.
    junction = degree >= 3
    node_of = np.full(num_p, -1, np.int64)
    node_pix: list[list[int]] = []
    if junction.any():
        jimg = np.zeros((h, w), np.uint8)
        jimg[ys[junction], xs[junction]] = 1
        _, jlab = cv2.connectedComponents(jimg, connectivity=8)
        lab = jlab[ys[junction], xs[junction]] - 1
        node_of[junction] = lab
        jids = np.nonzero(junction)[0]
        order = np.argsort(lab, kind="stable")
        splits = np.searchsorted(lab[order], np.arange(1, lab.max() + 1))
        node_pix.extend(g.tolist() for g in np.split(jids[order], splits))
    for p in np.nonzero(degree <= 1)[0].tolist():
        node_of[p] = len(node_pix)
        node_pix.append([p])

    # Trace centreline paths (lists of skeleton pixel ids) between node pixels.
    nb_sorted = -np.sort(-nb, axis=1)  # valid ids first
    n1 = nb_sorted[:, 0].tolist()
    n2 = nb_sorted[:, 1].tolist()
    node_of_l = node_of.tolist()
    nb_rows = nb.tolist()
    visited = bytearray(num_p)
    paths: list[list[int]] = []
    path_nodes: list[tuple[int, int]] = []
    seen_direct: set[tuple[int, int]] = set()
    for p in np.nonzero(node_of >= 0)[0].tolist():
        np_ = node_of_l[p]
        if degree[p] == 0:
            paths.append([p])
            path_nodes.append((np_, np_))
            continue
        for q in nb_rows[p]:
            if q < 0:
                continue
            nq = node_of_l[q]
            if nq >= 0:
                if nq == np_:
                    continue
                key = (min(p, q), max(p, q))
                if key not in seen_direct:
                    seen_direct.add(key)
                    paths.append([p, q])
                    path_nodes.append((np_, nq))
                continue
            if visited[q]:
                continue
            path = [p]
            prev, cur = p, q
            while node_of_l[cur] < 0:
                visited[cur] = 1
                path.append(cur)
                nxt = n1[cur] if n1[cur] != prev else n2[cur]
                prev, cur = cur, nxt
            path.append(cur)
            nc = node_of_l[cur]
            if nc == np_ and len(path) <= 4:
                continue  # a tiny ring around a junction cluster: part of the junction, not a vessel
            paths.append(path)
            path_nodes.append((np_, nc))
    # Closed loops with no junction: anchor a node on one of their pixels.
    for p in np.nonzero(node_of < 0)[0].tolist():
        if visited[p]:
            continue
        nid = len(node_pix)
        node_pix.append([p])
        path = [p]
        visited[p] = 1
        prev, cur = p, n1[p]
        while cur != p:
            visited[cur] = 1
            path.append(cur)
            nxt = n1[cur] if n1[cur] != prev else n2[cur]
            prev, cur = cur, nxt
        path.append(p)
        paths.append(path)
        path_nodes.append((nid, nid))

    paths, path_nodes = _prune_spurs_and_merge(paths, path_nodes, len(node_pix), node_pix, edt_p)

    # Node positions: mean of their skeleton pixels.
    node_xy = np.array(
        [[xs[pix].mean(), ys[pix].mean()] if pix else [0.0, 0.0] for pix in node_pix], np.float64
    ).reshape(-1, 2)

    # Mask pixels -> nearest skeleton pixel (labels are the skeleton pixels in raster order, from 1).
    inv = np.where(skel, 0, 1).astype(np.uint8)
    _, labels = cv2.distanceTransformWithLabels(inv, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    lab = labels[binary] - 1
    byy, bxx = np.nonzero(binary)
    area = np.bincount(lab, minlength=num_p).astype(np.float64)
    cx = np.bincount(lab, bxx, minlength=num_p) / np.maximum(area, 1)
    cy = np.bincount(lab, byy, minlength=num_p) / np.maximum(area, 1)

    return _paths_to_graph(paths, path_nodes, node_xy, node_of, xs, ys, cx, cy, area, edt_p)


def _exact_distance(edt: np.ndarray) -> np.ndarray:
    """Distance-transform values made exact (float64): OpenCV's precise transform can differ in the last
    float bit between calls on one mask, but its values are roots of whole squared pixel distances, so
    those are recovered and re-rooted."""
    return np.sqrt(np.rint(np.asarray(edt, np.float64) ** 2))


def _prune_spurs_and_merge(
    paths: list[list[int]],
    path_nodes: list[tuple[int, int]],
    num_nodes: int,
    node_pix: list[list[int]],
    edt_p: np.ndarray,
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Drop skeleton spurs that end inside their parent vessel; join paths through degree-2 nodes."""
    degree = [0] * num_nodes
    for a, b in path_nodes:
        degree[a] += 1
        degree[b] += 1
    keep = [True] * len(paths)
    for i, (path, (a, b)) in enumerate(zip(paths, path_nodes, strict=True)):
        if len(path) < 2 or a == b:
            continue
        for tip, base in ((a, b), (b, a)):
            if degree[tip] == 1 and degree[base] >= 3:
                tip_px = path[0] if tip == a else path[-1]
                base_r = max(edt_p[p] for p in node_pix[base])
                # The spur's tip disc lies inside the parent vessel: drawing it adds nothing.
                if len(path) - 1 + edt_p[tip_px] <= base_r + 1.0:
                    keep[i] = False
                    degree[a] -= 1
                    degree[b] -= 1
                    break
    paths = [p for p, k in zip(paths, keep, strict=True) if k]
    path_nodes = [n for n, k in zip(path_nodes, keep, strict=True) if k]

    # Join the two paths at every node left with degree 2 (not a loop's own anchor).
    incident: list[list[int]] = [[] for _ in range(num_nodes)]
    for i, (a, b) in enumerate(path_nodes):
        incident[a].append(i)
        if b != a:
            incident[b].append(i)
    alive = [True] * len(paths)
    for v in range(num_nodes):
        inc = [i for i in incident[v] if alive[i]]
        if len(inc) != 2 or degree[v] != 2:
            continue
        i, j = inc
        if i == j:
            continue
        pi, pj = paths[i], paths[j]
        ai, bi = path_nodes[i]
        aj, bj = path_nodes[j]
        if ai == bi or aj == bj:
            continue
        # Orient i to end at v and j to start at v.
        if bi != v:
            pi, (ai, bi) = pi[::-1], (bi, ai)
        if aj != v:
            pj, (aj, bj) = pj[::-1], (bj, aj)
        paths[i] = pi + pj[1:]
        path_nodes[i] = (ai, bj)
        alive[j] = False
        # Path j's other end now belongs to path i.
        incident[bj] = [i if k == j else k for k in incident[bj]]
        if ai == bj:  # the join closed a loop
            degree[v] = 0
    paths = [p for p, k in zip(paths, alive, strict=True) if k]
    path_nodes = [n for n, k in zip(path_nodes, alive, strict=True) if k]
    return paths, path_nodes


def _paths_to_graph(
    paths: list[list[int]],
    path_nodes: list[tuple[int, int]],
    node_xy: np.ndarray,
    node_of: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    area: np.ndarray,
    edt_p: np.ndarray,
) -> VesselGraph:
    """Sub-pixel centrelines and radii for the traced pixel paths, vectorised over all paths."""
    if not paths:
        return empty_graph()
    counts = np.array([len(p) for p in paths], np.int64)
    pix = np.fromiter((q for p in paths for q in p), np.int64, count=int(counts.sum()))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ends = np.array(path_nodes, np.int64).reshape(-1, 2)
    seg_of = np.repeat(np.arange(len(paths)), counts)
    first, last = offsets[:-1], offsets[1:] - 1
    is_end = np.zeros(len(pix), bool)
    is_end[first] = True
    is_end[last] = True
    # Interior points: centroid of their mask pixels; loop anchors too (their node sits on the path).
    body = ~is_end | (node_of[pix] < 0)
    raw = np.stack([xs[pix], ys[pix]], 1).astype(np.float64)
    # Where the vessel is wide (_FAT_RADIUS_PX), the skeleton pixel is the centre: the mask pixels nearest
    # to it form a long strip across the vessel whose centroid wanders sideways by several px.
    edt_exact = edt_p[pix]
    fat = edt_exact >= _FAT_RADIUS_PX
    pos = np.where((body & ~fat)[:, None], np.stack([cx[pix], cy[pix]], 1), raw)
    # Light smoothing of interior points along the path removes the skeleton's staircase.
    i = np.arange(len(pix))
    lo = np.maximum(i - 1, first[seg_of])
    hi = np.minimum(i + 1, last[seg_of])
    smooth = 0.25 * pos[lo] + 0.5 * pos + 0.25 * pos[hi]
    pos = np.where((~is_end)[:, None], smooth, pos)
    # Ends sit exactly on their nodes.
    pos[first] = node_xy[ends[:, 0]]
    pos[last] = node_xy[ends[:, 1]]
    # Loop anchors: the node is the anchor pixel's refined position.
    loops = (ends[:, 0] == ends[:, 1]) & (counts > 1)
    if loops.any():
        anchor_xy = np.stack([cx[pix[first[loops]]], cy[pix[first[loops]]]], 1)
        node_xy = node_xy.copy()
        node_xy[ends[loops, 0]] = anchor_xy
        pos[first[loops]] = anchor_xy
        pos[last[loops]] = anchor_xy

    # Radius: mask area / centreline length over a window of interior pixels (junction pixels carry the
    # junction's whole area and end pixels the tip's cap, so they do not vote).
    d = np.diff(raw, axis=0)
    step = np.concatenate([np.hypot(d[:, 0], d[:, 1]), [0.0]])
    step[last] = 0.0
    prev_step = np.concatenate([[0.0], step[:-1]])
    prev_step[first] = 0.0
    vote = body & ~is_end
    a_w = np.where(vote, area[pix], 0.0)
    l_w = np.where(vote, 0.5 * (step + prev_step), 0.0)
    ca = np.concatenate([[0.0], np.cumsum(a_w)])
    cl = np.concatenate([[0.0], np.cumsum(l_w)])
    lo = np.maximum(i - _RADIUS_WINDOW, first[seg_of])
    hi = np.minimum(i + _RADIUS_WINDOW, last[seg_of])
    sum_a = ca[hi + 1] - ca[lo]
    sum_l = cl[hi + 1] - cl[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        radius = np.where(sum_l > 0, 0.5 * sum_a / np.maximum(sum_l, 1e-9), np.nan)
    # Paths without interior votes (direct node-to-node links), and wide vessels: from the distance
    # transform (the medial-axis radius). A wide vessel's area per length is right for a tube but not where
    # the width changes within a few radii (a lumen cut across at an angle: an ellipse); the discs of the
    # medial axis redraw any shape.
    radius = np.where(np.isnan(radius), np.maximum(edt_p[pix] - 0.5, 0.5), radius)
    radius = np.where(fat, edt_exact - 0.5, radius)
    # Dots: the disc with the blob's area.
    dots = counts == 1
    radius[first[dots]] = np.sqrt(area[pix[first[dots]]] / np.pi)
    pos[first[dots]] = np.stack([cx[pix[first[dots]]], cy[pix[first[dots]]]], 1)
    node_xy = node_xy.copy()
    node_xy[ends[dots, 0]] = pos[first[dots]]
    radius = np.maximum(radius, 0.5)

    # Nodes no path uses (junction clusters whose every branch was a spur) are dropped.
    used, inverse = np.unique(ends, return_inverse=True)
    return VesselGraph(node_xy[used], pos, radius, offsets, inverse.reshape(-1, 2))
