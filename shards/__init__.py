"""The corpus format: WebDataset tar shards of mask-image pairs plus a manifest.

Modules: `config` (CorpusConfig), `schema` (sample key, members, encode/decode), `writer` (one
deterministic shard, atomically), `manifest` (manifest, node slices, build records), `build` (parallel,
multi-node, resumable corpus build), `ingest` (real collections into the same format), `reader`
(training/evaluation pipeline: make_dataset, make_loader, shard_urls), `inspect` (verify, preview,
stats), `cli` (`univg shards ...`).

The reader imports torch; nothing here imports it at package import time.
"""
