"""Vessel trees grown from nothing: procedural anatomy per modality, and space colonization in a region.

    graph, params = procedural_tree("fundus", 512, rng)          # oriented VesselGraph + drawn anatomy
    graph = space_colonization(region_mask, rng)                 # tree filling the region's foreground

Procedural trees (`procedural_tree`) come from one vectorised grower (`grow_vessels`) that works one
branching level at a time: first every trunk, then every side branch of a trunk, then theirs, ... Each
vessel is a run of ~4 px steps whose heading follows its course (an initial turn toward a target, a
constant curvature for a while) plus smooth angular noise. Side branches leave at Poisson-spaced points;
at each one Murray's law splits the radius, r^3 = r_on^3 + r_side^3, and the two vessels part at the
angles that minimise pumping work for that split. Radii also taper slowly along a vessel (side branches
too small to draw); a vessel ends where it leaves its preset's region or gets too thin. Working by levels
keeps the number of numpy calls per tree small (~5 levels rather than one round per branching), which is
what the per-sample budget is spent on. Each modality's preset sets roots, region and courses; lengths
and radii are given for a 512 px canvas and scale with it.

Space colonization (`space_colonization`) grows trees from roots toward attractor points sampled in a
region mask, on a coarse grid for speed: each attractor keeps the distance and index of its nearest
tree node, updated with only the nodes added that round. Radii follow Murray's law from a terminal
radius at the tips. Both return oriented graphs (segments away from the roots, see `graph.py`).

Legend: K vessels of one level, T steps of all of them (ragged: vessel k owns steps start[k] ..
start[k] + m[k] - 1), A attractors, N tree nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from data_engine.graph import VesselGraph, compact_nodes, empty_graph, merge_graphs, to_xy

# The canvas size the presets' pixel lengths and radii are written for.
_REFERENCE_SIZE_PX = 512.0
# Spacing (px at 512) of centreline points along procedural vessels.
_STEP_PX = 4.0
# Every grown vessel is at least this thick (px): thinner is not drawable.
_MIN_RADIUS_PX = 0.5

GENERIC = "generic"
"""Preset for modalities without one of their own."""


@dataclass(frozen=True)
class Branching:
    """How procedural vessels run and branch. Pixel values are at a 512 px canvas and scale with it."""

    branch_gap_px: float = 36.0  # mean distance between side branches along a vessel of 1 px radius
    gap_radius_power: float = 0.3  # the mean gap grows as (radius / 1 px) ** power
    taper_px_per_100px: float = 0.35  # radius (px) lost per 100 px of vessel (unseen side branches)
    asymmetry: tuple[float, float] = (0.3, 0.75)  # side / continuing radius at a branch point
    terminal_radius_px: float = 0.6  # side branches start at least this thick
    noise_rad: float = 0.07  # std of the heading change per 4 px step (rad): tortuosity
    kink: float = 0.6  # share of Murray's deflection the continuing vessel takes at a branch point
    angle_jitter_rad: float = 0.15  # std of the random change of Murray's branching angles (rad)
    mode_gap_factor: tuple[float, ...] = ()  # factor on the branch gap per preset mode (absent: 1)
    max_length_px: float = 600.0  # no vessel runs longer
    max_levels: int = 6  # side branches of side branches of ... down to this depth
    max_segments: int = 400  # deeper levels are not grown once this many segments exist (bounds the cost)


@dataclass
class Tips:
    """Vessels about to grow: start (px), heading (rad), radius (px), preset mode, handedness, start node."""

    x: np.ndarray  # K float64
    y: np.ndarray  # K float64
    angle: np.ndarray  # K float64, heading, 0 = +x, pi/2 = +y (down on screen)
    radius: np.ndarray  # K float64 px
    mode: np.ndarray  # K int64, which course rule of the preset applies
    sign: np.ndarray  # K float64 +-1, handedness for courses that circle a point
    node: np.ndarray  # K int64, node the vessel starts from

    @staticmethod
    def make(
        xy_K2: np.ndarray,
        angle_K: np.ndarray,
        radius_K: np.ndarray,
        mode_K: np.ndarray | int = 0,
        sign_K: np.ndarray | float = 1.0,
        node_K: np.ndarray | None = None,
    ) -> Tips:
        """Tips from arrays; scalars broadcast; node ids default to 0..K-1 (one root node per tip)."""
        k = len(angle_K)
        xy = np.asarray(xy_K2, np.float64).reshape(k, 2)
        return Tips(
            x=xy[:, 0].copy(),
            y=xy[:, 1].copy(),
            angle=np.asarray(angle_K, np.float64),
            radius=np.asarray(radius_K, np.float64),
            mode=np.broadcast_to(np.asarray(mode_K, np.int64), (k,)).copy(),
            sign=np.broadcast_to(np.asarray(sign_K, np.float64), (k,)).copy(),
            node=np.arange(k) if node_K is None else np.asarray(node_K, np.int64),
        )

    def take(self, sel: np.ndarray) -> Tips:
        """The tips where `sel` (bool or index array) picks."""
        return Tips(
            self.x[sel],
            self.y[sel],
            self.angle[sel],
            self.radius[sel],
            self.mode[sel],
            self.sign[sel],
            self.node[sel],
        )


@dataclass
class Course:
    """How each of K vessels runs: an initial turn, then a constant curvature for a while."""

    turn_rad: np.ndarray  # K, total heading change spread over the first turn_px of the vessel
    turn_px: np.ndarray  # K
    curvature_rad_per_px: np.ndarray  # K, signed, applied over the first curve_px
    curve_px: np.ndarray  # K


InsideFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(x, y) arrays -> bool array: where vessels may run."""
CourseFn = Callable[[Tips], Course]
"""vessels about to grow -> their courses."""
ModeMap = Callable[[np.ndarray], np.ndarray]
"""parent modes -> side-branch modes."""


def _radius_scale(size_px: float) -> float:
    """Factor on the presets' radii (given at 512 px): the canvas scale, but only its square root below
    512 px, so vessels on small canvases (tests, demos) stay at least about a pixel wide."""
    u = size_px / _REFERENCE_SIZE_PX
    return u if u >= 1.0 else math.sqrt(u)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles mapped to [-pi, pi)."""
    return np.asarray((angle + math.pi) % (2 * math.pi) - math.pi)


def straight(tips: Tips) -> Course:
    """No steering: vessels keep their heading (up to noise)."""
    zero = np.zeros(len(tips.x))
    return Course(zero, np.ones(len(tips.x)), zero, zero)


def grow_vessels(
    tips: Tips,
    nodes_xy: np.ndarray,
    branching: Branching,
    rng: np.random.Generator,
    *,
    size_px: float,
    inside: InsideFn,
    course: CourseFn = straight,
    side_mode: ModeMap | None = None,
    branch_density: float = 1.0,
) -> VesselGraph:
    """Grow vessels from `tips` (starting at nodes_xy[tips.node]) and all their side branches.

    Returns an oriented graph (segments split at branch points, parents first). Mean gaps between
    side branches are divided by `branch_density`; `side_mode` maps a vessel's mode to its side
    branches' modes (default: the same).
    """
    # Written for few numpy calls per level: at tens to hundreds of vessels, call overhead rather than
    # arithmetic is the cost, and a corpus sample has a budget of a few milliseconds.
    br = branching
    u = size_px / _REFERENCE_SIZE_PX
    step_px = max(_STEP_PX * u, 1.5)
    ur = _radius_scale(size_px)
    r_term = max(br.terminal_radius_px * ur, _MIN_RADIUS_PX)
    taper = br.taper_px_per_100px / 100.0 * ur / u  # radius lost per px of length
    a_lo, a_span = br.asymmetry[0], br.asymmetry[1] - br.asymmetry[0]
    # Expected log-radius lost per branch point, to cap each vessel's step count near its real length.
    mean_drop = math.log1p(((br.asymmetry[0] + br.asymmetry[1]) / 2) ** 3) / 3
    noise_sd = br.noise_rad * math.sqrt(step_px / (_STEP_PX * u))
    gap_base = br.branch_gap_px * u / max(branch_density, 1e-3)
    gap_factor = np.asarray(br.mode_gap_factor + (1.0,), np.float64)
    max_steps = max(int(br.max_length_px * u / step_px), 2)
    nodes: list[np.ndarray] = [np.asarray(nodes_xy, np.float64).reshape(-1, 2)]
    num_nodes = len(nodes[0])
    parent_seg = np.full(len(tips.x), -1, np.int64)
    # Trunks are at least 1 px in radius, so small canvases (radii scale with the canvas) still get vessels.
    tips = replace(tips, radius=np.maximum(tips.radius, 1.0))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("pts", "rad", "off", "ends", "parent")}
    num_segments = 0
    num_points = 0
    for _level in range(br.max_levels):
        k = len(tips.x)
        if k == 0 or num_segments >= br.max_segments:
            break
        r0 = tips.radius
        gap = gap_base * np.maximum(r0 * (1.0 / ur), 0.5) ** br.gap_radius_power
        if br.mode_gap_factor:
            gap *= gap_factor[np.minimum(tips.mode, len(gap_factor) - 1)]
        # Linear taper as a log-radius rate at the start radius: thin vessels fade within tens of px.
        log_taper = taper / r0
        # Steps: enough for the radius to fall to the minimum at the expected rate, within the cap.
        n_steps = 1.3 / step_px * np.log(np.maximum(r0, _MIN_RADIUS_PX) * (1 / (0.98 * _MIN_RADIUS_PX)))
        m = np.minimum(np.maximum((n_steps / (log_taper + mean_drop / gap)).astype(np.int64), 2), max_steps)
        cm = m.cumsum()
        total = int(cm[-1])
        start = cm - m
        ves = np.arange(k).repeat(m)  # vessel of each step
        j = np.arange(total) - start[ves]  # step index within its vessel
        uni = rng.random((3, total))
        normal = rng.standard_normal(2 * total)

        # Branch points: Poisson along the vessel, not in its first two steps nor at its last; Murray
        # radii before and after each; side branches too thin to draw are left out (second pass). The
        # Murray quantities are computed at branch points only (a few % of the steps).
        bpi = ((uni[0] < (step_px / gap)[ves]) & (j >= 2) & (j < (m - 1)[ves])).nonzero()[0]
        alpha = a_lo + a_span * uni[1, bpi]
        drop = np.log1p(alpha**3) * (1 / 3)  # log(r_before / r_on) at a branch point
        drop_step = np.zeros(total)
        drop_step[bpi] = drop
        log_r = (np.log(r0) - log_taper * step_px)[ves] - (log_taper * step_px)[ves] * j
        log_before = log_r - _segmented_cumsum(drop_step, start, ves, exclusive=True)
        drawable = np.log(alpha) + log_before[bpi] - drop >= math.log(r_term)
        if not drawable.all():
            drop_step[bpi[~drawable]] = 0.0
            bpi, alpha, drop = bpi[drawable], alpha[drawable], drop[drawable]
            log_before = log_r - _segmented_cumsum(drop_step, start, ves, exclusive=True)
        # Murray's optimal angles (cosines from the radii ratios) for the continuing vessel and the side
        # branch, with q = r_on / r_before and a = r_side / r_on.
        q4 = np.exp(-4 * drop)
        a4q4 = alpha**4 * q4
        th_on = np.arccos(np.minimum((1 + q4 - a4q4) / (2 * np.sqrt(q4)), 1.0))
        th_side = np.arccos(np.minimum((1 + a4q4 - q4) / (2 * np.sqrt(a4q4)), 1.0))
        side = np.where(uni[2, bpi] < 0.5, -1.0, 1.0)
        bp = np.zeros(total, bool)
        bp[bpi] = True

        # Headings: course turn and curvature, noise, and a kink away from each side branch after it.
        c = course(tips)
        turn_steps = np.maximum(c.turn_px * (1 / step_px), 1.0)
        dang = np.where(j < turn_steps[ves], (c.turn_rad / turn_steps)[ves], 0.0)
        dang += np.where(j < (c.curve_px * (1 / step_px))[ves], (c.curvature_rad_per_px * step_px)[ves], 0.0)
        dang += noise_sd * normal[:total]
        after = bpi + 1  # a branch point is never a vessel's last step, so this stays in the vessel
        dang[after] -= side * br.kink * th_on
        ang = tips.angle[ves] + _segmented_cumsum(dang, start, ves)
        z = (tips.x + 1j * tips.y)[ves] + _segmented_cumsum(np.exp(1j * ang) * step_px, start, ves)

        r_before = np.exp(log_before)
        # Each vessel ends before its first step outside the region or thinner than drawable.
        stop = ~inside(z.real, z.imag) | (log_before < math.log(_MIN_RADIUS_PX))
        kept = np.minimum.reduceat(np.where(stop, j, m[ves]), start)  # steps kept per vessel
        keep_step = j < kept[ves]
        last_kept = j == (kept - 1)[ves]
        split = bp & keep_step & ~last_kept
        new_node = split | (keep_step & last_kept)
        node_of_step = num_nodes + new_node.cumsum() - 1
        new_z = z[new_node]
        nodes.append(to_xy(new_z))
        num_nodes += len(new_z)

        # Points. Slot layout: vessel k's start at start[k] + k, its step j at start[k] + k + 1 + j. Each
        # made vessel's start and kept steps are emitted once, a branch point twice (end of one segment
        # with the radius before it, start of the next with the radius after it).
        made = kept >= 1
        if not made.any():
            break
        slot_step = np.arange(total) + ves + 1
        slot_start = start + np.arange(k)
        copies = np.zeros(total + k, np.int64)
        copies[slot_step] = keep_step.astype(np.int64) + split
        copies[slot_start] = made
        z_slot = np.empty(total + k, np.complex128)
        z_slot[slot_step], z_slot[slot_start] = z, tips.x + 1j * tips.y
        r_first = np.empty(total + k)
        r_first[slot_step], r_first[slot_start] = r_before, r0
        r_second = np.empty(total + k)
        r_second[slot_step[bpi]] = r_before[bpi] * np.exp(-drop)  # r_on, after the branch point
        node_slot = np.empty(total + k, np.int64)
        node_slot[slot_step], node_slot[slot_start] = node_of_step, tips.node
        src = np.arange(total + k).repeat(copies)
        second = np.zeros(len(src), bool)
        second[1:] = src[1:] == src[:-1]
        is_vessel_start = np.zeros(total + k, bool)
        is_vessel_start[slot_start] = True
        seg_start = is_vessel_start[src] | second
        seg_first = seg_start.nonzero()[0]
        num_items = len(src)
        seg_last = np.append(seg_first[1:], num_items) - 1
        item_seg = seg_start.cumsum() - 1
        # Parents: a segment after a branch point continues the previous one; a vessel's first segment
        # hangs from the segment its side branch left.
        vessel_parent = np.zeros(total + k, np.int64)
        vessel_parent[slot_start] = parent_seg
        seg_parent = np.where(
            second[seg_first], num_segments + np.arange(len(seg_first)) - 1, vessel_parent[src[seg_first]]
        )
        parts["pts"].append(z_slot[src])
        parts["rad"].append(np.where(second, r_second[src], r_first[src]))
        parts["off"].append(seg_first + num_points)
        seg_ends = np.empty((len(seg_first), 2), np.int64)
        seg_ends[:, 0], seg_ends[:, 1] = node_slot[src[seg_first]], node_slot[src[seg_last]]
        parts["ends"].append(seg_ends)
        parts["parent"].append(seg_parent)

        # Side branches grow in the next level, each from its branch point's node and hanging from the
        # segment that ends there.
        kept_bp = split[bpi]  # branch points on the kept part of their vessel
        sp = bpi[kept_bp]
        tips = Tips(
            x=z.real[sp],
            y=z.imag[sp],
            angle=ang[sp] + side[kept_bp] * (th_side[kept_bp] + br.angle_jitter_rad * normal[total + sp]),
            radius=(alpha * np.exp(-drop))[kept_bp] * r_before[sp],
            mode=tips.mode[ves[sp]] if side_mode is None else side_mode(tips.mode[ves[sp]]),
            sign=np.where(rng.random(len(sp)) < 0.5, -1.0, 1.0),
            node=node_of_step[sp],
        )
        # The second copy of a branch point starts the next segment; the one before it ends there.
        second_of = second.nonzero()[0]
        parent_seg = num_segments + item_seg[second_of] - 1
        num_segments += len(seg_first)
        num_points += num_items
    if num_segments == 0:
        return empty_graph()
    pts_all = np.concatenate(parts["pts"])
    return VesselGraph(
        np.concatenate(nodes),
        to_xy(pts_all),
        np.concatenate(parts["rad"]),
        np.concatenate(parts["off"] + [np.array([num_points])]),
        np.concatenate(parts["ends"]),
        np.concatenate(parts["parent"]),
    )


def _segmented_cumsum(
    values: np.ndarray, start: np.ndarray, seg_of: np.ndarray, *, exclusive: bool = False
) -> np.ndarray:
    """Running sums of `values` restarting at every segment start (ragged layout); exclusive: sums before."""
    c = values.cumsum()
    out = c - (c[start] - values[start])[seg_of]
    return np.asarray(out - values if exclusive else out)


# --- anatomy presets ------------------------------------------------------------------------------------


def _course(
    k: int,
    turn_rad: np.ndarray | float = 0.0,
    turn_px: np.ndarray | float = 1.0,
    curvature_rad_per_px: np.ndarray | float = 0.0,
    curve_px: np.ndarray | float = 0.0,
) -> Course:
    def arr(v: np.ndarray | float) -> np.ndarray:
        return v if isinstance(v, np.ndarray) else np.full(k, float(v))

    return Course(arr(turn_rad), arr(turn_px), arr(curvature_rad_per_px), arr(curve_px))


def _disc_inside(cx: float, cy: float, radius: float) -> InsideFn:
    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray((x - cx) ** 2 + (y - cy) ** 2 <= radius**2)

    return inside


def _ellipse_inside(cx: float, cy: float, ax: float, ay: float) -> InsideFn:
    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0)

    return inside


def _frame_inside(size: float, margin: float = 0.0) -> InsideFn:
    lo, hi = -margin, size - 1 + margin

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray((x >= lo) & (x <= hi) & (y >= lo) & (y <= hi))

    return inside


def _and_outside_disc(inside: InsideFn, cx: float, cy: float, radius: float) -> InsideFn:
    def both(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return inside(x, y) & ((x - cx) ** 2 + (y - cy) ** 2 > radius**2)

    return both


def _or_below(inside: InsideFn, y_min: float) -> InsideFn:
    def either(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return inside(x, y) | (y >= y_min)

    return either


def _away_from(tips: Tips, cx: float, cy: float) -> np.ndarray:
    return np.arctan2(tips.y - cy, tips.x - cx)


def _handedness(xy_K2: np.ndarray, angle_K: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """+1 where a vessel heading `angle` from `xy` passes (cx, cy) turning with positive curvature,
    else -1."""
    rx, ry = xy_K2[:, 0] - cx, xy_K2[:, 1] - cy
    cross = rx * np.sin(angle_K) - ry * np.cos(angle_K)
    return np.where(cross >= 0, 1.0, -1.0)


@dataclass(frozen=True)
class ProceduralControls:
    """Morphology controls every preset honours while growing."""

    branch_density: float = 1.0  # factor on side branches per length
    vessel_count: int = 2  # main trunks / trees, as each preset reads it
    tortuosity: float = 0.25  # added to the preset's own angular noise (scaled per preset)
    capillaries: bool = True  # OCTA: include the capillary mesh in the graph


PresetResult = tuple[VesselGraph, dict[str, Any]]


def _fundus(size: int, rng: np.random.Generator, c: ProceduralControls) -> PresetResult:
    """Colour fundus: a superior and an inferior arcade (vein + artery each) leave an optic disc near one
    side and arch around an avascular macula; nasal trunks fan the other way; all inside a round FOV."""
    s = float(size)
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: disc right of centre
    cx, cy = s / 2 + rng.uniform(-0.02, 0.02) * s, s / 2 + rng.uniform(-0.02, 0.02) * s
    fov_r = rng.uniform(0.44, 0.48) * s
    disc = (cx + side * rng.uniform(0.2, 0.26) * s, cy + rng.uniform(-0.04, 0.04) * s)
    mac_dist = rng.uniform(0.25, 0.3) * s  # ~2.5 disc diameters
    mac = (disc[0] - side * mac_dist, disc[1] + rng.uniform(0.0, 0.04) * s)
    mac_r = rng.uniform(0.05, 0.07) * s
    arcade_r = rng.uniform(0.8, 0.95) * mac_dist

    xy, ang, rad, mode = [], [], [], []
    for vertical in (-1.0, 1.0):
        base = math.atan2(vertical, -side * rng.uniform(0.05, 0.3))
        for r_vessel, dtheta in ((rng.uniform(3.0, 3.7), -0.1), (rng.uniform(2.3, 2.8), 0.1)):
            xy.append(disc)
            ang.append(base + dtheta * vertical * side + rng.normal(0, 0.06))
            rad.append(r_vessel * _radius_scale(size))
            mode.append(1)
    num_nasal = int(np.clip(c.vessel_count, 1, 4)) + 1
    for k in range(num_nasal):
        spread = (k - (num_nasal - 1) / 2) * rng.uniform(0.55, 0.8)
        ang.append(math.atan2(0.0, side) + spread + rng.normal(0, 0.1))
        xy.append(disc)
        rad.append(rng.uniform(1.5, 2.2) * _radius_scale(size))
        mode.append(2)
    for vertical in (-1.0, 1.0):  # small macular branches
        xy.append(disc)
        ang.append(math.atan2(vertical * 0.3, -side) + rng.normal(0, 0.1))
        rad.append(rng.uniform(0.9, 1.3) * _radius_scale(size))
        mode.append(0)
    xy_a, ang_a = np.array(xy), np.array(ang)
    tips = Tips.make(
        xy_a, ang_a, np.array(rad), np.array(mode), _handedness(xy_a, ang_a, *mac), np.zeros(len(ang))
    )
    sweep = rng.uniform(1.5, 1.9)  # rad of arch around the macula before the arcades fan out

    def course(t: Tips) -> Course:
        arc = t.mode == 1
        return _course(
            len(t.x),
            curvature_rad_per_px=np.where(arc, t.sign / arcade_r, 0.0),
            curve_px=np.where(arc, sweep * arcade_r, 0.0),
        )

    br = Branching(
        branch_gap_px=34.0,
        taper_px_per_100px=0.35,
        asymmetry=(0.3, 0.7),
        terminal_radius_px=0.6,
        noise_rad=0.05 + 0.12 * c.tortuosity,
        max_segments=360,
    )
    graph = grow_vessels(
        tips,
        np.array([disc]),
        br,
        rng,
        size_px=s,
        course=course,
        inside=_and_outside_disc(_disc_inside(cx, cy, fov_r), mac[0], mac[1], mac_r),
        side_mode=lambda m: np.where(m == 1, 0, m),
        branch_density=c.branch_density,
    )
    params = {
        "disc_side": "right" if side > 0 else "left",
        "fov_center_xy_px": [round(cx, 2), round(cy, 2)],
        "fov_radius_px": round(fov_r, 2),
        "disc_xy_px": [round(disc[0], 2), round(disc[1], 2)],
        "macula_xy_px": [round(mac[0], 2), round(mac[1], 2)],
        "num_trunks": len(rad),
    }
    return graph, params


def _edge_point(size: float, rng: np.random.Generator, edges: tuple[str, ...]) -> tuple[float, float, float]:
    """A point on a random one of the named canvas edges and the inward heading there."""
    edge = edges[int(rng.integers(len(edges)))]
    t = rng.uniform(0.15, 0.85) * size
    inward = {"top": math.pi / 2, "bottom": -math.pi / 2, "left": 0.0, "right": math.pi}[edge]
    x, y = {"top": (t, 0.0), "bottom": (t, size - 1.0), "left": (0.0, t), "right": (size - 1.0, t)}[edge]
    return x, y, inward


def _xca(size: int, rng: np.random.Generator, c: ProceduralControls) -> PresetResult:
    """X-ray coronary angiography: 1-2 thick trunks entering from an edge, long gently curving arteries
    with side branches at acute angles; the trees overlap and cross."""
    s = float(size)
    num_trees = int(np.clip(c.vessel_count, 1, 2))
    xy, ang, rad, entries = [], [], [], []
    for k in range(num_trees):
        x, y, inward = _edge_point(s, rng, ("top", "left") if k == 0 else ("right", "bottom", "top"))
        entries.append([round(x, 1), round(y, 1)])
        xy.append((x, y))
        ang.append(inward + rng.uniform(-0.6, 0.6))
        rad.append((rng.uniform(4.5, 6.0) if k == 0 else rng.uniform(3.2, 4.5)) * _radius_scale(size))
    xy_a = np.array(xy)
    tips = Tips.make(xy_a, np.array(ang), np.array(rad), 0, np.where(rng.random(num_trees) < 0.5, -1.0, 1.0))
    # Arteries bend over the heart's surface: a constant curvature per vessel, either way, turning
    # them by up to ~1 rad over the frame.
    bend = rng.uniform(0.3, 1.0) / s

    def course(t: Tips) -> Course:
        k = len(t.x)
        return _course(k, curvature_rad_per_px=t.sign * bend * (0.5 + rng.random(k)), curve_px=s)

    br = Branching(
        branch_gap_px=30.0,
        taper_px_per_100px=0.5,
        asymmetry=(0.35, 0.75),
        terminal_radius_px=0.9,
        noise_rad=0.05 + 0.12 * c.tortuosity,
        max_segments=200,
    )
    graph = grow_vessels(
        tips,
        xy_a,
        br,
        rng,
        size_px=s,
        inside=_frame_inside(s, 2.0),
        course=course,
        branch_density=c.branch_density,
    )
    return graph, {"num_trees": num_trees, "entry_xy_px": entries}


def _dsa(size: int, rng: np.random.Generator, c: ProceduralControls) -> PresetResult:
    """Cerebral DSA: carotid-like trunks rise from the bottom toward the skull's centre, then branch
    richly and tortuously, fanning out to fill the head."""
    s = float(size)
    cx, cy = s / 2 + rng.uniform(-0.03, 0.03) * s, s * rng.uniform(0.46, 0.52)
    ax, ay = rng.uniform(0.4, 0.46) * s, rng.uniform(0.42, 0.48) * s
    num = int(np.clip(c.vessel_count, 1, 3))
    xs = cx + (np.arange(num) - (num - 1) / 2) * rng.uniform(0.1, 0.18) * s + rng.normal(0, 0.02 * s, num)
    xy = np.stack([xs, np.full(num, s - 1.0)], axis=1)
    tips = Tips.make(
        xy, -math.pi / 2 + rng.normal(0, 0.12, num), rng.uniform(3.4, 4.4, num) * _radius_scale(size), 1
    )
    hub = (cx, s * 1.05)  # below the skull base: branches fan out upward and sideways from there
    top = (cx, cy - 0.3 * ay)

    def course(t: Tips) -> Course:
        k = len(t.x)
        trunk = t.mode == 1
        to_top = np.arctan2(top[1] - t.y, top[0] - t.x)
        fan = _away_from(t, *hub)
        turn = _wrap(np.where(trunk, to_top, fan) - t.angle) * np.where(trunk, 0.8, 0.6)
        # Branches wander (a curvature of up to ~1 rad over the canvas, either way); trunks do not.
        wander = np.where(trunk, 0.0, (rng.random(k) - 0.5) * (2.0 / s))
        return _course(k, turn, np.where(trunk, 0.3 * s, 0.08 * s), wander, s)

    br = Branching(
        branch_gap_px=26.0,
        mode_gap_factor=(1.0, 1.3),
        taper_px_per_100px=0.4,
        asymmetry=(0.45, 0.9),
        terminal_radius_px=0.6,
        noise_rad=0.1 + 0.16 * c.tortuosity,
        max_segments=420,
    )
    graph = grow_vessels(
        tips,
        xy,
        br,
        rng,
        size_px=s,
        course=course,
        inside=_or_below(_ellipse_inside(cx, cy, ax, ay), cy),
        side_mode=lambda m: np.zeros_like(m),
        branch_density=c.branch_density,
    )
    return graph, {"num_trunks": num, "head_axes_px": [round(ax, 1), round(ay, 1)]}


def _octa(size: int, rng: np.random.Generator, c: ProceduralControls) -> PresetResult:
    """OCTA en-face: arterioles/venules entering from the frame edges and converging on a dark, avascular
    foveal zone near the centre, over a dense capillary mesh (left out when c.capillaries is False)."""
    s = float(size)
    faz = (s / 2 + rng.uniform(-0.06, 0.06) * s, s / 2 + rng.uniform(-0.06, 0.06) * s)
    faz_r = rng.uniform(0.06, 0.09) * s
    num = 3 + 2 * int(np.clip(c.vessel_count, 1, 4))
    angles = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(num) / num + rng.normal(0, 0.2, num)
    # Roots where rays from the foveal zone leave the frame.
    dx, dy = np.cos(angles), np.sin(angles)
    with np.errstate(divide="ignore"):
        tx = np.where(dx > 0, (s - 1 - faz[0]) / dx, np.where(dx < 0, -faz[0] / dx, np.inf))
        ty = np.where(dy > 0, (s - 1 - faz[1]) / dy, np.where(dy < 0, -faz[1] / dy, np.inf))
    t = np.minimum(tx, ty)
    xy = np.stack([faz[0] + t * dx, faz[1] + t * dy], axis=1)
    tips = Tips.make(
        xy, angles + math.pi + rng.normal(0, 0.15, num), rng.uniform(2.0, 3.0, num) * _radius_scale(size)
    )

    def course(t: Tips) -> Course:
        to_faz = np.arctan2(faz[1] - t.y, faz[0] - t.x)
        return _course(len(t.x), _wrap(to_faz - t.angle) * 0.5, 0.06 * s)

    br = Branching(
        branch_gap_px=30.0,
        taper_px_per_100px=0.45,
        asymmetry=(0.3, 0.7),
        terminal_radius_px=0.6,
        noise_rad=0.06 + 0.12 * c.tortuosity,
        max_segments=260,
    )
    inside = _and_outside_disc(_frame_inside(s, 1.0), faz[0], faz[1], faz_r)
    trees = grow_vessels(
        tips, xy, br, rng, size_px=s, inside=inside, course=course, branch_density=c.branch_density
    )
    spacing = rng.uniform(16.0, 24.0) * max(size / _REFERENCE_SIZE_PX, 0.3)
    params: dict[str, Any] = {
        "faz_xy_px": [round(faz[0], 2), round(faz[1], 2)],
        "faz_radius_px": round(faz_r, 2),
        "num_trunks": num,
    }
    if not c.capillaries:
        return trees, params
    params["capillary_spacing_px"] = round(spacing, 2)
    return merge_graphs([capillary_mesh(s, rng, spacing, faz, faz_r * 0.9), trees]), params


def capillary_mesh(
    size_px: float,
    rng: np.random.Generator,
    spacing_px: float,
    hole_xy: tuple[float, float] = (0.0, 0.0),
    hole_radius_px: float = 0.0,
) -> VesselGraph:
    """Capillaries over a size_px square: a jittered grid whose cells are cut by one random diagonal, with
    many links dropped so the cells become irregular polygons; links bend in the middle; radius 0.5 px;
    none inside the hole (the foveal zone). Each link is its own root segment (a mesh is not a tree)."""
    n = max(int(size_px / spacing_px) + 2, 3)
    step = size_px / (n - 2)
    gy, gx = np.mgrid[0:n, 0:n].astype(np.float64)
    xf = ((gx - 0.5) * step + rng.uniform(-0.4, 0.4, (n, n)) * step).ravel()
    yf = ((gy - 0.5) * step + rng.uniform(-0.4, 0.4, (n, n)) * step).ravel()
    ids = np.arange(n * n).reshape(n, n)
    flip = rng.random((n - 1, n - 1)) < 0.5
    diag_a = np.where(flip, ids[:-1, :-1], ids[:-1, 1:]).ravel()
    diag_b = np.where(flip, ids[1:, 1:], ids[1:, :-1]).ravel()
    a = np.concatenate([ids[:, :-1].ravel(), ids[:-1, :].ravel(), diag_a])
    b = np.concatenate([ids[:, 1:].ravel(), ids[1:, :].ravel(), diag_b])
    keep_p = np.concatenate([np.full(2 * n * (n - 1), 0.6), np.full(len(diag_a), 0.3)])
    keep = rng.random(len(a)) < keep_p
    hx, hy = hole_xy
    for px, py in ((xf[a], yf[a]), (xf[b], yf[b]), (0.5 * (xf[a] + xf[b]), 0.5 * (yf[a] + yf[b]))):
        keep &= (px - hx) ** 2 + (py - hy) ** 2 > hole_radius_px**2
    a, b = a[keep], b[keep]
    num = len(a)
    if num == 0:
        return empty_graph()
    dx, dy = xf[b] - xf[a], yf[b] - yf[a]
    norm = np.maximum(np.hypot(dx, dy), 1e-6)
    bend = rng.uniform(-0.25, 0.25, num) * norm
    mx = 0.5 * (xf[a] + xf[b]) - dy / norm * bend
    my = 0.5 * (yf[a] + yf[b]) + dx / norm * bend
    pts = np.stack([np.stack([xf[a], yf[a]], 1), np.stack([mx, my], 1), np.stack([xf[b], yf[b]], 1)], axis=1)
    ends = np.stack([a, b], axis=1)
    used, inverse = np.unique(ends, return_inverse=True)
    return VesselGraph(
        np.stack([xf[used], yf[used]], axis=1),
        pts.reshape(-1, 2),
        np.full(3 * num, 0.5),
        np.arange(num + 1) * 3,
        inverse.reshape(-1, 2),
        np.full(num, -1),
    )


def _mra(size: int, rng: np.random.Generator, c: ProceduralControls) -> PresetResult:
    """MRA maximum intensity projection (axial): a circle-of-Willis-like ring at the centre with anterior,
    middle and posterior cerebral arteries leaving it and a basilar trunk below, large and tortuous."""
    s = float(size)
    cx, cy = s / 2 + rng.uniform(-0.03, 0.03) * s, s * rng.uniform(0.48, 0.56)
    rx, ry = rng.uniform(0.06, 0.08) * s, rng.uniform(0.05, 0.07) * s
    # Ring attachments (screen angle; -pi/2 = up = anterior): ACA x2, ICA/MCA x2, PCA x2, basilar.
    att = np.array([-1.85, -1.29, -2.9, -0.24, 2.3, 0.84, math.pi / 2]) + rng.normal(0, 0.08, 7)
    att_xy = np.stack([cx + rx * np.cos(att), cy + ry * np.sin(att)], axis=1)
    ring = _ring(att, att_xy, cx, cy, rx, ry, rng.uniform(1.2, 1.7) * _radius_scale(size), rng)

    heading = np.array(
        [-math.pi / 2 - 0.1, -math.pi / 2 + 0.1, math.pi, 0.0, math.pi * 0.75, math.pi * 0.25, math.pi / 2]
    ) + rng.normal(0, 0.12, 7)
    rad = np.array([1.9, 1.9, 2.7, 2.7, 2.0, 2.0, 3.0]) * rng.uniform(0.85, 1.15, 7) * _radius_scale(size)
    mode = np.array([0, 0, 0, 0, 2, 2, 3])
    num_extra = int(np.clip(c.vessel_count, 0, 4))  # small arteries leaving the ring
    ex = rng.uniform(0, 2 * math.pi, num_extra)
    tips_xy = np.concatenate([att_xy, np.stack([cx + rx * np.cos(ex), cy + ry * np.sin(ex)], axis=1)])
    tips_ang = np.concatenate([heading, ex + rng.normal(0, 0.3, num_extra)])
    tips_r = np.concatenate([rad, rng.uniform(0.9, 1.3, num_extra) * _radius_scale(size)])
    tips_mode = np.concatenate([mode, np.zeros(num_extra, np.int64)])
    tips = Tips.make(tips_xy, tips_ang, tips_r, tips_mode, _handedness(tips_xy, tips_ang, cx, cy))
    head_ax, head_ay = rng.uniform(0.38, 0.45) * s, rng.uniform(0.44, 0.48) * s
    wrap_r = 0.2 * s

    def course(t: Tips) -> Course:
        k = len(t.x)
        pca = t.mode == 2  # posterior arteries wrap backwards around the brainstem
        wander = (rng.random(k) - 0.5) * 2 * (2.5 / s)
        return _course(k, curvature_rad_per_px=np.where(pca, t.sign / wrap_r, wander), curve_px=s)

    br = Branching(
        branch_gap_px=40.0,
        taper_px_per_100px=0.4,
        asymmetry=(0.3, 0.65),
        terminal_radius_px=0.8,
        noise_rad=0.12 + 0.16 * c.tortuosity,
        max_segments=200,
    )
    trees = grow_vessels(
        tips,
        tips_xy,
        br,
        rng,
        size_px=s,
        course=course,
        inside=_or_below(_ellipse_inside(cx, s / 2, head_ax, head_ay), cy + 0.3 * s),
        side_mode=lambda m: np.zeros_like(m),
        branch_density=c.branch_density,
    )
    return merge_graphs([ring, trees]), {
        "ring_center_xy_px": [round(cx, 2), round(cy, 2)],
        "ring_radii_px": [round(rx, 2), round(ry, 2)],
        "num_extra_branches": num_extra,
    }


def _ring(
    att: np.ndarray,
    att_xy: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    radius: float,
    rng: np.random.Generator,
) -> VesselGraph:
    """A wobbly closed ring through the attachment points: one segment between neighbouring attachments,
    each its own root (a ring is not a tree)."""
    order = np.argsort(np.mod(att, 2 * math.pi))
    a_sorted = np.mod(att[order], 2 * math.pi)
    nxt = np.roll(a_sorted, -1)
    nxt[-1] += 2 * math.pi
    num = len(order)
    t = a_sorted[:, None] + (nxt - a_sorted)[:, None] * np.linspace(0, 1, 8)[None, :]
    wob = 1.0 + 0.06 * np.sin(np.linspace(0, math.pi, 8))[None, :] * rng.normal(size=(num, 1))
    pts = np.stack([cx + rx * wob * np.cos(t), cy + ry * wob * np.sin(t)], axis=2)
    pts[:, 0] = att_xy[order]
    pts[:, -1] = att_xy[np.roll(order, -1)]
    ends = np.stack([order, np.roll(order, -1)], axis=1)
    return VesselGraph(
        att_xy, pts.reshape(-1, 2), np.full(num * 8, radius), np.arange(num + 1) * 8, ends, np.full(num, -1)
    )


def _generic(size: int, rng: np.random.Generator, c: ProceduralControls) -> PresetResult:
    """Unknown modality: 1-3 trees from random edges into the frame, moderate everything."""
    s = float(size)
    num = int(np.clip(c.vessel_count, 1, 3))
    xy, ang = [], []
    for _ in range(num):
        x, y, inward = _edge_point(s, rng, ("top", "bottom", "left", "right"))
        xy.append((x, y))
        ang.append(inward + rng.uniform(-0.4, 0.4))
    xy_a = np.array(xy)
    tips = Tips.make(xy_a, np.array(ang), rng.uniform(2.5, 4.0, num) * _radius_scale(size))

    def course(t: Tips) -> Course:
        k = len(t.x)
        return _course(k, curvature_rad_per_px=(rng.random(k) - 0.5) * (4.0 / s), curve_px=s)

    br = Branching(noise_rad=0.08 + 0.15 * c.tortuosity, max_segments=300)
    graph = grow_vessels(
        tips,
        xy_a,
        br,
        rng,
        size_px=s,
        inside=_frame_inside(s, 1.0),
        course=course,
        branch_density=c.branch_density,
    )
    return graph, {"num_trees": num}


PRESETS: dict[str, Callable[[int, np.random.Generator, ProceduralControls], PresetResult]] = {
    "fundus": _fundus,
    "xca": _xca,
    "dsa": _dsa,
    "octa": _octa,
    "mra": _mra,
    GENERIC: _generic,
}


def procedural_tree(
    modality: str,
    size_px: int,
    rng: np.random.Generator,
    controls: ProceduralControls | None = None,
) -> PresetResult:
    """A fresh vessel tree with the anatomy of `modality` (the generic preset for unknown modalities).

    Returns the oriented graph on a size_px x size_px canvas and the anatomy drawn (JSON-ready).
    """
    if size_px < 16:
        raise ValueError(f"size_px={size_px} must be >= 16")
    preset = PRESETS.get(modality, _generic)
    graph, params = preset(int(size_px), rng, controls or ProceduralControls())
    params["preset"] = modality if modality in PRESETS else GENERIC
    return graph, params


# --- space colonization -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Colonization:
    """Space colonization settings; distances in coarse-grid cells unless noted."""

    grid_cells: int = 40  # the region's bounding box is grown on a grid with this many cells on its long side
    attractor_spacing: float = 2.6  # mean distance between attractors at branch_density 1
    step: float = 1.0  # distance between consecutive tree nodes
    substeps: int = 6  # steps (at most 8) a growing node takes per round toward its attractors (fewer rounds)
    kill_distance: float = 1.6  # an attractor this close to a node is reached and removed
    influence: float = 5.0  # a node only feels attractors this close (growth follows the region's shape)
    max_rounds: int = 40
    stop_share: float = 0.08  # growth stops when fewer than this share of the attractors is left
    min_leaf_steps: int = 2  # >= 2: one-node tips off a branch point (stubs toward lone attractors) go
    terminal_radius_px: float = 0.6  # radius (px, full resolution) at every tip; Murray's law sets the rest


# Headings a colonizing node tries, in order, when its attractors' mean direction leaves the region.
_TURNS_C = np.exp(1j * np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5]))
_SUBSTEPS = np.arange(1, 9, dtype=np.float64)


def region_roots(region: np.ndarray, num_roots: int, rng: np.random.Generator) -> np.ndarray:
    """Root points (x, y) for growing inside `region` (HxW, non-zero = inside): the topmost point of each
    connected component, plus up to num_roots - 1 more per component on its border, spread out (farthest
    first, at least a quarter of the region's size apart). The draw from rng breaks ties."""
    reg = (np.asarray(region) > 0).astype(np.uint8)
    num, labels = cv2.connectedComponents(reg, connectivity=8)
    border = reg - cv2.erode(reg, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    span = max(region.shape)
    roots: list[np.ndarray] = []
    for lab in range(1, num):
        ys, xs = np.nonzero(labels == lab)
        top = int(ys.min())
        on_top = xs[ys == top]
        first = np.array([float(on_top[int(rng.integers(len(on_top)))]), float(top)])
        roots.append(first)
        if num_roots <= 1:
            continue
        on_border = border[ys, xs] > 0
        cand = np.stack([xs[on_border], ys[on_border]], 1).astype(np.float64)
        dist = np.hypot(cand[:, 0] - first[0], cand[:, 1] - first[1])
        for _ in range(num_roots - 1):
            j = int(np.argmax(dist)) if len(cand) else 0
            if len(cand) == 0 or dist[j] < 0.25 * span:
                break
            roots.append(cand[j])
            dist = np.minimum(dist, np.hypot(cand[:, 0] - cand[j, 0], cand[:, 1] - cand[j, 1]))
    return np.array(roots, np.float64).reshape(-1, 2)


def space_colonization(
    region: np.ndarray,
    rng: np.random.Generator,
    *,
    branch_density: float = 1.0,
    num_roots: int = 1,
    roots_xy: np.ndarray | None = None,
    settings: Colonization | None = None,
    pixel_size: float = 1.0,
) -> VesselGraph:
    """Grow trees that fill the foreground of `region` (HxW, non-zero = inside), on a coarse grid.

    Attractors: uniform over the region, about area / attractor_spacing^2 * branch_density of them.
    Roots: `roots_xy` ((x, y) in region pixels, snapped into the region) if given, else `region_roots`.
    Each round every node with attractors in reach steps toward their mean direction; each attractor
    keeps the distance and index of its nearest node, updated with only that round's new nodes. Returns
    an oriented graph in region pixels times pixel_size; radii follow Murray's law (r^3 of a vessel =
    sum over its branches) from terminal_radius_px (output pixels) at the tips.
    """
    cfg = settings or Colonization()
    region_b = np.asarray(region) > 0
    if region_b.ndim != 2:
        raise ValueError(f"region must be HxW, got shape {region_b.shape}")
    if not region_b.any():
        return empty_graph()
    h, w = region_b.shape
    f = min(1.0, cfg.grid_cells / max(h, w))  # coarse = full * f
    gh, gw = max(int(round(h * f)), 1), max(int(round(w * f)), 1)
    coarse = cv2.resize(region_b.view(np.uint8), (gw, gh), interpolation=cv2.INTER_AREA) > 0
    fx, fy = gw / w, gh / h
    if roots_xy is None:
        roots_c = region_roots(coarse, num_roots, rng)
    else:
        roots_c = _snap_into(coarse, np.asarray(roots_xy, np.float64).reshape(-1, 2) * [fx, fy])
    return _colonize(coarse, roots_c, rng, branch_density, cfg, scale_xy=(pixel_size / fx, pixel_size / fy))


def _snap_into(coarse: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Each point moved to the nearest inside cell (unchanged when it already is inside)."""
    ys, xs = np.nonzero(coarse)
    d = (xs[None, :] - xy[:, None, 0]) ** 2 + (ys[None, :] - xy[:, None, 1]) ** 2
    j = np.argmin(d, axis=1)
    return np.stack([xs[j], ys[j]], 1).astype(np.float64)


def _colonize(
    coarse: np.ndarray,
    roots: np.ndarray,
    rng: np.random.Generator,
    branch_density: float,
    cfg: Colonization,
    scale_xy: tuple[float, float],
) -> VesselGraph:
    # Few numpy calls per round matter more than array sizes here (tens to hundreds of elements).
    gh, gw = coarse.shape
    num_roots = len(roots)
    if num_roots == 0:
        return empty_graph()
    ys, xs = np.nonzero(coarse)
    num_att = int(max(1, round(len(ys) * branch_density / cfg.attractor_spacing**2)))
    pick = rng.integers(0, len(ys), num_att)
    jitter = rng.random((2, num_att)) - 0.5
    att = (xs[pick] + jitter[0]) + 1j * (ys[pick] + jitter[1])
    # The region padded with outside cells, so candidate steps need no bounds checks.
    pad = cfg.substeps + 1
    width = gw + 2 * pad
    inside_flat = np.pad(coarse, pad).ravel()
    steps_CS = cfg.step * _TURNS_C[:, None] * _SUBSTEPS[None, : cfg.substeps]  # candidate heading x sub-step
    cap = num_roots + num_att * 16 + 64
    nodes = np.zeros(cap, np.complex128)
    parent = np.full(cap, -1, np.int64)
    # Node and attractor positions are kept shifted by (pad + 0.5, pad + 0.5): truncating them to int
    # then gives the padded map's cell, without rounding or bounds checks.
    shift = (pad + 0.5) * (1 + 1j)
    att += shift
    nodes[:num_roots] = roots[:, 0] + 1j * roots[:, 1] + shift
    n = num_roots
    d = np.abs(att[:, None] - nodes[None, :num_roots])
    near = np.argmin(d, axis=1)
    near_d = d[np.arange(num_att), near]
    alive = near_d > cfg.kill_distance
    # The last few attractors take many rounds of little growth: stop when this few are left.
    enough = max(int(cfg.stop_share * num_att), 1)
    for _ in range(cfg.max_rounds):
        if np.count_nonzero(alive) < enough:
            break
        # Attractors in reach pull their nearest node; nodes with pulls grow toward the mean direction.
        pulling = (alive & (near_d <= cfg.influence)).nonzero()[0]
        if len(pulling) == 0:
            # Nothing in reach (a root in a sparse corner): the closest attractor left pulls anyway.
            reachable = (alive & (near_d < np.inf)).nonzero()[0]
            if len(reachable) == 0:
                break
            pulling = reachable[np.argmin(near_d[reachable])][None]
        a_near = near[pulling]
        unit = (att[pulling] - nodes[a_near]) / near_d[pulling]
        pull = np.bincount(a_near, unit.real, minlength=n) + 1j * np.bincount(a_near, unit.imag, minlength=n)
        strength = np.abs(pull)
        grow = (strength > 1e-3).nonzero()[0]
        if len(grow) == 0:
            break
        g = len(grow)
        if n + g * cfg.substeps > cap:
            break
        # Sub-steps along that direction, or the least turned one whose first step stays in the region
        # (so growth follows bends of the region), kept up to the first sub-step that leaves it.
        cand = nodes[grow][:, None, None] + (pull[grow] / strength[grow])[:, None, None] * steps_CS[None]
        ok = inside_flat[cand.imag.astype(np.int64) * width + cand.real.astype(np.int64)]
        rows = np.arange(g)
        choice = np.argmax(ok[:, :, 0], axis=1)
        kept = np.cumprod(ok[rows, choice], axis=1)
        num_ok = kept.sum(axis=1)
        # Attractors whose node cannot step at all give up on it (a later node may still reach them);
        # so does a pulled attractor that no new node comes closer to (behind a bend of the region),
        # which would otherwise make its node sprout the same step again.
        new = cand[rows, choice][kept.astype(bool)]
        num_new = len(new)
        if num_new == 0:
            alive[pulling] = False
            continue
        # Each kept sub-step's parent: the previous sub-step, or the node that grew.
        chain_start = num_ok.cumsum() - num_ok
        par = n - 1 + np.arange(num_new)
        par[chain_start[num_ok > 0]] = grow[num_ok > 0]
        parent[n : n + num_new] = par
        nodes[n : n + num_new] = new
        # Incremental nearest-node update: only this round's new nodes are compared.
        live = alive.nonzero()[0]
        dn = np.abs(att[live][:, None] - new[None, :])
        j = np.argmin(dn, axis=1)
        dj = dn[np.arange(len(live)), j]
        closer = dj < near_d[live]
        near[live[closer]] = n + j[closer]
        near_d[live[closer]] = dj[closer]
        n += num_new
        near_d[pulling[near[pulling] == a_near]] = np.inf
        alive &= near_d > cfg.kill_distance
    xy = nodes[:n] - shift
    return _tree_to_graph(
        np.stack([xy.real * scale_xy[0], xy.imag * scale_xy[1]], 1),
        parent[:n],
        cfg.terminal_radius_px,
        num_roots,
        cfg.min_leaf_steps,
    )


def _tree_to_graph(
    nodes_xy: np.ndarray, parent: np.ndarray, r_term: float, num_roots: int, min_leaf_steps: int
) -> VesselGraph:
    """Node tree (parents before children, roots first) -> oriented graph of chains between branch points.

    Tips hanging off a branch point by a single node (stubs toward lone attractors) are dropped when
    min_leaf_steps >= 2. Radii: Murray's law, r^3 of a vessel = sum over its branches, r_term at tips.
    """
    n = len(nodes_xy)
    idx = np.arange(n)
    is_root = idx < num_roots
    children = np.bincount(parent[num_roots:], minlength=n)
    if min_leaf_steps >= 2:
        stub = (children == 0) & ~is_root
        stub[num_roots:] &= children[parent[num_roots:]] > 1
        keep = ~stub
        children -= np.bincount(parent[stub], minlength=n)
    else:
        keep = np.ones(n, bool)
    # Chains: every kept non-root node belongs to the segment that ends at the first end node (root,
    # branch point or tip) at or below it; follow single children down by pointer jumping.
    is_end = (children != 1) | is_root
    only_child = np.full(n, -1, np.int64)
    single = keep & ~is_root & (children[np.maximum(parent, 0)] == 1)
    only_child[parent[single]] = idx[single]
    bottom = np.where(is_end, idx, only_child)
    while True:
        nxt = bottom[bottom]
        if np.array_equal(nxt, bottom):
            break
        bottom = nxt
    members = (keep & ~is_root).nonzero()[0]
    if len(members) == 0:
        # Nothing grew: each root stays as a dot.
        return VesselGraph(
            nodes_xy[:num_roots],
            nodes_xy[:num_roots],
            np.full(num_roots, r_term),
            np.arange(num_roots + 1),
            np.stack([np.arange(num_roots)] * 2, 1),
            np.full(num_roots, -1),
        )
    # Sort members by (segment bottom, creation order): chains top to bottom, segments in an order
    # where each comes after its parent (a bottom node is created after its ancestors).
    order = members[np.lexsort((members, bottom[members]))]
    seg_bottom = bottom[order]
    new_seg = np.concatenate([[True], seg_bottom[1:] != seg_bottom[:-1]])
    tops = order[new_seg]
    bottoms = seg_bottom[new_seg]
    num_s = len(tops)
    seg_of_member = new_seg.cumsum() - 1
    # Points: each segment's start node (its top's parent), then its chain.
    counts = np.bincount(seg_of_member, minlength=num_s) + 1
    off = np.concatenate([[0], counts.cumsum()])
    point_node = np.empty(int(off[-1]), np.int64)
    point_node[off[:-1]] = parent[tops]
    rest = np.ones(len(point_node), bool)
    rest[off[:-1]] = False
    point_node[rest] = order
    # Parent segment: the one whose bottom is this segment's start node.
    seg_of_bottom = np.full(n, -1, np.int64)
    seg_of_bottom[bottoms] = np.arange(num_s)
    seg_parent = seg_of_bottom[parent[tops]]
    # Murray: tips carry r_term^3; a segment carries the sum of its child segments (children come later).
    flow = np.where(children[bottoms] == 0, r_term**3, 0.0).tolist()
    par_list = seg_parent.tolist()
    for s in range(num_s - 1, -1, -1):
        if par_list[s] >= 0:
            flow[par_list[s]] += flow[s]
    seg_r = np.cbrt(np.asarray(flow))
    ends = np.empty((num_s, 2), np.int64)
    ends[:, 0], ends[:, 1] = point_node[off[:-1]], point_node[off[1:] - 1]
    nodes, ends = compact_nodes(nodes_xy, ends)
    return VesselGraph(nodes, nodes_xy[point_node], seg_r.repeat(counts), off, ends, seg_parent)


def chaikin(graph: VesselGraph) -> VesselGraph:
    """One round of Chaikin corner cutting on every segment, ends kept: smoother centrelines."""
    counts = graph.num_points_S
    multi = counts >= 3
    if not multi.any():
        return graph
    p = graph.points_P2.astype(np.float64)
    r = graph.radius_P.astype(np.float64)
    seg_of = graph.segment_of_point_P
    # Pairs (i, i+1) inside a segment give the points 3/4 i + 1/4 (i+1) and 1/4 i + 3/4 (i+1).
    pair = ((seg_of[:-1] == seg_of[1:]) & multi[seg_of[:-1]]).nonzero()[0]
    q = 0.75 * p[pair] + 0.25 * p[pair + 1]
    s_ = 0.25 * p[pair] + 0.75 * p[pair + 1]
    qr = 0.75 * r[pair] + 0.25 * r[pair + 1]
    sr = 0.25 * r[pair] + 0.75 * r[pair + 1]
    # New point list: for multi segments [first, q0, s0, q1, s1, ..., last]; others unchanged.
    new_counts = np.where(multi, 2 * (counts - 1) + 2, counts)
    new_off = np.concatenate([[0], new_counts.cumsum()])
    out = np.empty((int(new_off[-1]), 2))
    out_r = np.empty(int(new_off[-1]))
    keep_segs = ~multi
    if keep_segs.any():
        src = keep_segs[seg_of].nonzero()[0]
        dst_start = new_off[:-1][seg_of[src]] + (src - graph.offsets_S1[:-1][seg_of[src]])
        out[dst_start] = p[src]
        out_r[dst_start] = r[src]
    ms = multi.nonzero()[0]
    out[new_off[:-1][ms]] = p[graph.offsets_S1[:-1][ms]]
    out_r[new_off[:-1][ms]] = r[graph.offsets_S1[:-1][ms]]
    out[new_off[1:][ms] - 1] = p[graph.offsets_S1[1:][ms] - 1]
    out_r[new_off[1:][ms] - 1] = r[graph.offsets_S1[1:][ms] - 1]
    k_in_seg = pair - graph.offsets_S1[:-1][seg_of[pair]]
    base = new_off[:-1][seg_of[pair]] + 1 + 2 * k_in_seg
    out[base], out[base + 1] = q, s_
    out_r[base], out_r[base + 1] = qr, sr
    return VesselGraph(graph.nodes_N2, out, out_r, new_off, graph.ends_S2, graph.parent_S)
