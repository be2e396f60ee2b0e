"""The data engine: vessel masks -> vessel graphs -> recombined masks -> rendered mask-image pairs.

Modules: `io` (image/mask files), `graph` (decompose a mask into a vessel graph and render it back),
`grow` (procedural trees, space colonization), `recombine` (grafting, geometric and morphology changes),
`render` (appearance of the built-in modalities), `ingest` (real collections), `corpus` (sample i).
"""

MODALITIES: tuple[str, ...] = ("fundus", "xca", "dsa", "octa", "mra")
