"""The training reader: tensors, splitting over nodes and workers, seeds, URL forms, bad shards."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from shards_testdata import (
    HAND_MODALITIES,
    flip_bit,
    hand_config,
    member_offset,
    truncate,
    write_hand_corpus,
)

from data_engine import MODALITIES
from data_engine.corpus import Sample
from shards.manifest import MANIFEST
from shards.reader import (
    SLOT_KEY,
    CorruptShardWarning,
    RecyclingLoader,
    decode_item,
    make_dataset,
    make_loader,
    shard_urls,
    to_float_batch,
)
from shards.schema import encode_sample, sample_key
from shards.writer import shard_name

NUM_SAMPLES = 40  # 5 shards of 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hand")
    write_hand_corpus(folder, hand_config(num_samples=NUM_SAMPLES, samples_per_shard=8))
    return folder


def _keys(dataset: torch.utils.data.IterableDataset, limit: int | None = None) -> list[str]:
    keys = []
    for item in dataset:
        keys.append(item["key"])
        if limit is not None and len(keys) >= limit:
            break
    return keys


def test_items_have_the_promised_layout(corpus: Path) -> None:
    items = {it["key"]: it for it in make_dataset(str(corpus), seed=0, resampled=False)}
    assert len(items) == NUM_SAMPLES
    colour, grey = items[sample_key("hand", 4)], items[sample_key("hand", 3)]
    for it in (colour, grey):
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
        assert it["mask"].shape == (1, 16, 16) and it["fov"].shape == (1, 16, 16)
        assert set(it["mask"].unique().tolist()) == {0.0, 1.0} and it["modality"].dtype == torch.int64
    # colour sample 4 was stored B=10, G=100, R=4: RGB order, scaled to [-1, 1]
    expected = torch.tensor([4, 100, 10]) / 127.5 - 1.0
    assert torch.allclose(colour["image"][:, 0, 0], expected, atol=1e-6)
    # grey sample 3 holds value 3 everywhere, replicated to three channels
    assert torch.allclose(grey["image"], torch.full((3, 16, 16), 3 / 127.5 - 1.0), atol=1e-6)
    assert grey["mask"][0, 3, 2:12].eq(1).all() and grey["mask"].sum() == 10
    assert grey["fov"].sum() == 14 * 14  # sample 3 has a FOV; sample 4 has none -> all ones
    assert colour["fov"].eq(1).all()
    assert colour["modality"].item() == MODALITIES.index(HAND_MODALITIES[4])
    assert items[sample_key("hand", 5)]["modality"].item() == len(MODALITIES)  # "ultrasound": spare slot


def test_image_size_px_resizes_and_keeps_masks_binary(corpus: Path) -> None:
    item = next(iter(make_dataset(str(corpus), seed=0, image_size_px=8)))
    assert item["image"].shape == (3, 8, 8) and item["mask"].shape == (1, 8, 8)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_uint8_items_hold_the_stored_values(corpus: Path) -> None:
    items = {it["key"]: it for it in make_dataset(str(corpus), seed=0, resampled=False, output_dtype="uint8")}
    assert len(items) == NUM_SAMPLES
    colour, grey = items[sample_key("hand", 4)], items[sample_key("hand", 3)]
    for it in (colour, grey):
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.uint8
        assert it["mask"].shape == (1, 16, 16) and it["mask"].dtype == torch.uint8
        assert it["fov"].shape == (1, 16, 16) and it["fov"].dtype == torch.uint8
        assert set(it["mask"].unique().tolist()) == {0, 255} and it["modality"].dtype == torch.int64
    assert colour["image"][:, 0, 0].tolist() == [4, 100, 10]  # stored B=10, G=100, R=4: RGB order
    assert grey["image"].eq(3).all()  # grey value 3, replicated to three channels
    assert grey["mask"][0, 3, 2:12].eq(255).all() and int(grey["mask"].sum()) == 10 * 255
    assert int(grey["fov"].sum()) == 14 * 14 * 255 and colour["fov"].eq(255).all()  # no FOV -> all 255
    with pytest.raises(ValueError, match="output_dtype"):
        make_dataset(str(corpus), seed=0, output_dtype="float16")


def test_uint8_batches_convert_to_exactly_the_float32_batches(corpus: Path) -> None:
    def batches(output_dtype: str) -> list[dict[str, Any]]:
        loader = make_loader(
            str(corpus),
            batch_size=4,
            num_workers=2,
            seed=3,
            resampled=False,
            image_size_px=12,  # resized: interpolated grey values, thresholded masks
            output_dtype=output_dtype,
        )
        return list(loader)

    floats, uint8s = batches("float32"), batches("uint8")
    assert [b["key"] for b in uint8s] == [b["key"] for b in floats] and len(floats) >= NUM_SAMPLES // 4
    for f, u in zip(floats, uint8s, strict=True):
        assert u["image"].dtype == torch.uint8 and u["image"].shape == f["image"].shape == (4, 3, 12, 12)
        converted = to_float_batch(u, "cpu")
        assert converted["key"] == f["key"] and torch.equal(converted["modality"], f["modality"])
        for name in ("image", "mask", "fov"):
            assert converted[name].dtype == torch.float32
            assert torch.equal(converted[name], f[name]), name  # bit for bit, not only close
        assert to_float_batch(f)["image"] is f["image"]  # float32 batches pass through


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_conversion_is_exact_for_every_pixel_value(channels: int) -> None:
    rng = np.random.default_rng(channels)
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = values if channels == 1 else np.stack([values, values[::-1], values.T], axis=2)
    mask = np.where(rng.random((16, 16)) < 0.3, np.uint8(255), np.uint8(0))
    sample = Sample(image=image, mask=mask, fov=mask[::-1].copy(), meta={"modality": "xca"})
    members = encode_sample(sample, 1, "rle")
    f = decode_item("c_000000000", members)
    u = decode_item("c_000000000", members, output_dtype="uint8")
    converted = to_float_batch(u)
    for name in ("image", "mask", "fov"):
        assert torch.equal(converted[name], f[name]), name
    assert converted["image"].min() == -1.0 and converted["image"].max() == 1.0


def _same_pixels(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["key"] == b["key"] and all(torch.equal(a[n], b[n]) for n in ("image", "mask", "fov"))


def test_recycled_buffers_give_the_same_batches_and_keep_the_promised_ones_intact(corpus: Path) -> None:
    kwargs: dict[str, Any] = {"batch_size": 3, "num_workers": 2, "seed": 4, "output_dtype": "uint8"}
    keep = 2
    plain, recycled = make_loader(str(corpus), **kwargs), make_loader(str(corpus), recycle=keep, **kwargs)
    assert isinstance(recycled, RecyclingLoader) and not isinstance(plain, RecyclingLoader)
    held: collections.deque[tuple[dict[str, Any], dict[str, Any]]] = collections.deque()
    for i, (expected, batch) in enumerate(zip(plain, recycled, strict=False)):  # endless (resampled) streams
        assert SLOT_KEY not in batch
        held.append((batch, expected))
        if len(held) > keep + 1:
            held.popleft()  # the batch drawn keep + 1 batches ago may now be overwritten
        # the batch just drawn and the `keep` before it still hold what the plain reader gave
        assert all(_same_pixels(b, e) for b, e in held), i
        if i == 40:
            break
    counters = recycled.dataset.counters  # type: ignore[attr-defined]
    assert counters.reused_buffers >= 30  # most of the 41 batches went into buffers used before


def test_recycled_batches_kept_too_long_are_overwritten(corpus: Path) -> None:
    # The counterpart: the buffers really are shared with the worker, so a batch kept past its turn
    # changes under the caller. This is why make_loader's `recycle` is opt-in.
    kwargs: dict[str, Any] = {"batch_size": 3, "num_workers": 2, "seed": 4, "output_dtype": "uint8"}
    plain, recycled = make_loader(str(corpus), **kwargs), make_loader(str(corpus), recycle=0, **kwargs)
    pairs = [pair for pair, _ in zip(zip(plain, recycled, strict=False), range(30), strict=False)]
    assert not all(_same_pixels(b, e) for e, b in pairs)
    assert _same_pixels(pairs[-1][1], pairs[-1][0])  # the current batch is intact


def test_abandoned_iterations_give_their_buffers_back(corpus: Path) -> None:
    loader = make_loader(str(corpus), batch_size=2, num_workers=2, seed=1, recycle=0)
    slots, counters = loader.dataset.slots, loader.dataset.counters  # type: ignore[attr-defined]
    for _ in range(4):  # each abandons its prefetched batches, which the DataLoader then drops
        next(iter(loader))
    reused_before = counters.reused_buffers
    for _ in range(3):
        next(iter(loader))
    # the dropped batches' buffers were freed and refilled, not left taken for good
    assert counters.reused_buffers > reused_before
    assert slots.num_taken() < slots.num_workers * slots.num_slots


def test_recycle_needs_workers_and_a_non_negative_count(corpus: Path) -> None:
    with pytest.raises(ValueError, match="recycle=-1"):
        make_loader(str(corpus), batch_size=2, num_workers=2, seed=0, recycle=-1)
    in_process = make_loader(str(corpus), batch_size=2, num_workers=0, seed=0, recycle=1, resampled=False)
    assert not isinstance(in_process, RecyclingLoader)  # private memory, nothing to reuse
    assert sum(len(b["key"]) for b in in_process) == NUM_SAMPLES


def test_two_nodes_times_two_workers_see_disjoint_data_covering_the_corpus(corpus: Path) -> None:
    seen: list[list[str]] = []
    for rank in range(2):
        loader = make_loader(
            str(corpus), batch_size=3, num_workers=2, seed=5, resampled=False, rank=rank, world_size=2
        )
        seen.append([key for batch in loader for key in batch["key"]])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == [sample_key("hand", i) for i in range(NUM_SAMPLES)]


def test_rank_and_world_size_come_from_the_environment(corpus: Path) -> None:
    # Each rank is a fresh process with only RANK/WORLD_SIZE set, as a launcher starts it (in this test
    # process an earlier in-process training run may have left a torch.distributed group, which wins).
    script = (
        "import json, sys; from shards.reader import make_dataset; "
        "print(json.dumps([s['key'] for s in make_dataset(sys.argv[1], seed=1, resampled=False)]))"
    )
    per_rank = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}
        out = subprocess.run(
            [sys.executable, "-c", script, str(corpus)], env=env, capture_output=True, text=True, check=True
        )
        per_rank.append(set(json.loads(out.stdout.strip().splitlines()[-1])))
    assert per_rank[0] and per_rank[1]
    assert per_rank[0].isdisjoint(per_rank[1]) and len(per_rank[0] | per_rank[1]) == NUM_SAMPLES


def test_a_rank_without_shards_yields_nothing(corpus: Path) -> None:
    assert _keys(make_dataset(str(corpus), seed=0, resampled=False, rank=6, world_size=8)) == []


def test_same_seed_same_order_other_seed_other_order(corpus: Path) -> None:
    def order(seed: int) -> list[str]:
        loader = make_loader(
            str(corpus), batch_size=4, num_workers=2, seed=seed, resampled=False, shuffle_buffer=16
        )
        return [key for batch in loader for key in batch["key"]]

    first = order(7)
    assert order(7) == first
    assert order(8) != first and sorted(order(8)) == sorted(first)
    assert first != sorted(first)  # shuffled


def test_resampled_is_endless_and_seeded(corpus: Path) -> None:
    # without a shuffle buffer the stream is whole passes over seeded shard permutations
    passes = _keys(make_dataset(str(corpus), seed=3, shuffle_buffer=0), limit=3 * NUM_SAMPLES)
    assert Counter(passes) == {sample_key("hand", i): 3 for i in range(NUM_SAMPLES)}
    a = _keys(make_dataset(str(corpus), seed=3), limit=3 * NUM_SAMPLES)
    assert len(a) == 3 * NUM_SAMPLES and set(a) <= set(passes)
    assert _keys(make_dataset(str(corpus), seed=3), limit=3 * NUM_SAMPLES) == a
    assert _keys(make_dataset(str(corpus), seed=3, epoch=1), limit=3 * NUM_SAMPLES) != a


def test_folder_brace_pattern_and_pipe_urls_read_the_same_samples(corpus: Path) -> None:
    by_folder = shard_urls(corpus)
    assert by_folder == [str(corpus / shard_name("hand", s)) for s in range(5)]
    brace = str(corpus / "hand-{000000..000004}.tar")
    assert shard_urls(brace) == by_folder
    pipe = f"pipe:cat {corpus}/hand-{{000000..000004}}.tar"
    assert len(shard_urls(pipe)) == 5
    expected = sorted(_keys(make_dataset(str(corpus), seed=0, resampled=False)))
    assert sorted(_keys(make_dataset(brace, seed=0, resampled=False))) == expected
    assert sorted(_keys(make_dataset(pipe, seed=0, resampled=False))) == expected


def test_missing_shards_and_unmerged_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="do not exist"):
        shard_urls(str(tmp_path / "x-{000000..000001}.tar"))
    (tmp_path / "manifest.node-0-of-2.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merge"):
        shard_urls(tmp_path)


def _damaged_corpus(folder: Path, with_manifest: bool) -> None:
    write_hand_corpus(
        folder, hand_config(num_samples=NUM_SAMPLES, samples_per_shard=8), manifest=with_manifest
    )
    truncate(folder / shard_name("hand", 1), 3000)
    offset, size = member_offset(folder / shard_name("hand", 3), f"{sample_key('hand', 26)}.image.png")
    flip_bit(folder / shard_name("hand", 3), offset + size // 2)


def test_truncated_and_bit_flipped_shards_are_skipped_and_counted(tmp_path: Path) -> None:
    _damaged_corpus(tmp_path, with_manifest=True)
    dataset = make_dataset(str(tmp_path), seed=0, resampled=False)
    with pytest.warns(CorruptShardWarning) as caught:
        keys = _keys(dataset)
    # with a manifest both shards fail their size / sha256 check up front: none of their samples is used
    assert sorted(keys) == [
        sample_key("hand", i) for i in range(NUM_SAMPLES) if not 8 <= i < 16 and not 24 <= i < 32
    ]
    assert (dataset.counters.bad_shards, dataset.counters.bad_samples) == (2, 0)
    assert dataset.counters.samples == len(keys)
    messages = " ".join(str(w.message) for w in caught)
    assert shard_name("hand", 1) in messages and shard_name("hand", 3) in messages


def test_without_a_manifest_damage_is_still_caught_where_the_data_is(tmp_path: Path) -> None:
    _damaged_corpus(tmp_path, with_manifest=False)
    dataset = make_dataset(str(tmp_path / "hand-{000000..000004}.tar"), seed=0, resampled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptShardWarning)
        keys = _keys(dataset)
    assert sample_key("hand", 26) not in keys  # the flipped PNG fails its CRC: that sample only is dropped
    assert {sample_key("hand", i) for i in range(24, 32) if i != 26} <= set(keys)
    assert not {sample_key("hand", i) for i in range(10, 16)} & set(keys)  # cut off by the truncation
    assert (dataset.counters.bad_shards, dataset.counters.bad_samples) == (1, 1)


def test_counters_are_shared_across_dataloader_workers(tmp_path: Path) -> None:
    _damaged_corpus(tmp_path, with_manifest=True)
    loader = make_loader(str(tmp_path), batch_size=4, num_workers=2, seed=0, resampled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptShardWarning)
        num = sum(len(batch["key"]) for batch in loader)
    counters = loader.dataset.counters  # type: ignore[attr-defined]
    assert (counters.bad_shards, counters.samples, num) == (2, NUM_SAMPLES - 16, NUM_SAMPLES - 16)
    assert (tmp_path / MANIFEST).is_file()


def test_an_endless_stream_over_only_bad_shards_stops_with_an_error(tmp_path: Path) -> None:
    write_hand_corpus(tmp_path, hand_config(num_samples=16, samples_per_shard=8))
    for s in range(2):
        truncate(tmp_path / shard_name("hand", s), 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptShardWarning)
        with pytest.raises(RuntimeError, match="unreadable"):
            next(iter(make_dataset(str(tmp_path), seed=0)))
