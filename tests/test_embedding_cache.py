"""The embedding cache: encode once, float16 memory-mapped entries, atomic writes, corruption checks."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation import embedding_cache
from foundation.embedding_cache import TEMP_PREFIX, VERIFIED_FILE, EmbeddingCache, EncodeCounts
from trainables.backbones import build_backbone

SMALL = 64  # test-only input size: a 4 x 4 embedding grid for SAM, so encoding costs milliseconds


@pytest.fixture(scope="module")
def sam_b():
    return build_backbone("sam_b", "random", input_size=SMALL)


@pytest.fixture()
def cache(tmp_path, sam_b, phantom_dataset):
    _, dataset = phantom_dataset
    return EmbeddingCache.for_backbone(tmp_path, sam_b, dataset.key)


def _count_encoded_images(backbone, monkeypatch) -> list[int]:
    """Patch `backbone.encode` to record how many images each call encodes."""
    calls: list[int] = []
    original = backbone.encode

    def counting(pixels):
        calls.append(int(pixels.shape[0]))
        return original(pixels)

    monkeypatch.setattr(backbone, "encode", counting)
    return calls


def test_second_pass_encodes_nothing(cache, sam_b, phantom_dataset, monkeypatch):
    _, dataset = phantom_dataset
    records = dataset.records_for("val") + dataset.records_for("test")
    calls = _count_encoded_images(sam_b, monkeypatch)

    first = cache.ensure(sam_b, dataset, records, batch_size=3, progress=False)
    assert first == EncodeCounts(hits=0, misses=len(records), corrupt=0)
    assert sum(calls) == len(records) and max(calls) <= 3

    calls.clear()
    second = cache.ensure(sam_b, dataset, records, verify=True, progress=False)
    assert second == EncodeCounts(hits=len(records), misses=0, corrupt=0)
    assert calls == []
    assert cache.counts == EncodeCounts(hits=len(records), misses=len(records), corrupt=0)


def test_entries_are_float16_memory_mapped_and_match_encoding_each_image_alone(cache, sam_b, phantom_dataset):
    _, dataset = phantom_dataset
    records = dataset.records_for("train", views=True)[:5]
    cache.ensure(sam_b, dataset, records, batch_size=4, progress=False)  # batches of 4 and 1
    for record in records:
        entry = cache.load(record)
        assert set(entry) == {"image_embed"}
        array = entry["image_embed"]
        assert isinstance(array, np.memmap) and array.dtype == np.float16 and not array.flags.writeable
        assert array.shape == (256, SMALL // 16, SMALL // 16)
        image = dataset.load(record)[0]
        alone = sam_b.encode(sam_b.preprocess(image[None]))["image_embed"][0].numpy()
        np.testing.assert_allclose(array.astype(np.float32), alone, rtol=2e-3, atol=2e-3)


def test_resident_copy_and_memory_mapped_batches_agree(cache, sam_b, phantom_dataset):
    _, dataset = phantom_dataset
    records = dataset.records_for("val")[:4]
    cache.ensure(sam_b, dataset, records, progress=False)
    resident = cache.load_resident(records[:2]).merged(cache.load_resident(records[1:]))
    assert resident.covers(records) and len(resident.rows) == 4
    assert resident.nbytes == 4 * 256 * 4 * 4 * 2
    order = [records[3], records[0], records[2]]
    from_ram = resident.batch(order)["image_embed"]
    from_disk = cache.load_batch(order)["image_embed"]
    assert from_ram.dtype == torch.float32 and torch.equal(from_ram, from_disk)


def test_the_key_separates_backbones_sizes_and_weights_and_is_the_image_content(tmp_path, sam_b, phantom_dataset):
    _, dataset = phantom_dataset
    record = dataset.records_for("val")[0]
    small = EmbeddingCache.for_backbone(tmp_path, sam_b, dataset.key)
    other_size = EmbeddingCache.for_backbone(tmp_path, build_backbone("sam_b", "random", input_size=32), dataset.key)
    other_store = EmbeddingCache.for_backbone(tmp_path, sam_b, "phantom-0000000000000000")
    medsam = EmbeddingCache.for_backbone(tmp_path, build_backbone("medsam", "random", input_size=SMALL), dataset.key)
    assert other_size.namespace != small.namespace
    assert medsam.namespace != small.namespace  # same architecture, another input contract
    # content-addressed: the same image read through another store is the same entry
    assert other_store.namespace == small.namespace and other_store.entry_dir(record) == small.entry_dir(record)
    assert small.entry_dir(record).name == record.image_sha256[:32]
    weights = EmbeddingCache(tmp_path, "sam_b", "ab" * 32, SMALL, dataset.key)
    assert weights.namespace != EmbeddingCache(tmp_path, "sam_b", "cd" * 32, SMALL, dataset.key).namespace
    view = dataset.records_for("train", views=True)
    assert small.entry_dir(view[0]) != small.entry_dir(view[1])  # two views of one slice


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in (len(data) - 7, len(data) - 100):  # inside the array data, past the header
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])


@pytest.mark.parametrize("damage, found_without_verify", [(_flip_bytes, False), (_truncate, True)])
def test_a_corrupted_entry_is_detected_counted_and_recomputed(cache, sam_b, phantom_dataset, damage,
                                                              found_without_verify, monkeypatch):
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:3]
    cache.ensure(sam_b, dataset, records, progress=False)
    good = np.array(cache.load(records[1])["image_embed"])
    damage(cache.entry_dir(records[1]) / "image_embed.npy")

    assert cache.is_valid(records[1]) is not found_without_verify
    assert not cache.is_valid(records[1], verify=True)
    calls = _count_encoded_images(sam_b, monkeypatch)
    counts = cache.ensure(sam_b, dataset, records, verify=True, progress=False)
    assert counts == EncodeCounts(hits=2, misses=0, corrupt=1)
    assert calls == [1]
    assert cache.is_valid(records[1], verify=True)
    np.testing.assert_array_equal(np.array(cache.load(records[1])["image_embed"]), good)
    assert not [p for p in cache.entry_dir(records[1]).parent.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_values_beyond_float16_are_refused_and_leave_nothing(cache, phantom_dataset):
    _, dataset = phantom_dataset
    record = dataset.records_for("val")[0]
    with pytest.raises(ValueError, match="not finite in float16"):
        cache.write(record, {"image_embed": np.full((2, 2), 1e6, np.float32)})
    assert not cache.entry_dir(record).exists()
    assert list(cache.entry_dir(record).parent.iterdir()) == []


def _write_many(root: str, prepared_key: str, records: list, writer: int, start, placed) -> None:
    """Child process: write every record's entry, filled with this writer's number; report how
    many of its writes were put in place. Writer 2 goes through the records backwards, so the two
    meet in the middle and there write the same entries at the same time."""
    cache = EmbeddingCache(Path(root), "fake", "w" * 16, 64, prepared_key)
    start.wait()
    wins = 0
    for record in records if writer == 1 else records[::-1]:
        wins += cache.write(record, {"a": np.full((64, 32, 32), writer, np.float32),
                                     "b": np.full((8,), writer, np.float32)})
    placed.put(wins)


def test_two_concurrent_writers_leave_one_valid_entry_and_no_temp_folders(tmp_path, phantom_dataset):
    _, dataset = phantom_dataset
    records = dataset.records_for("train", views=True)[:12]
    context = multiprocessing.get_context("spawn")
    start, placed = context.Barrier(2), context.Queue()
    writers = [context.Process(target=_write_many, args=(str(tmp_path), dataset.key, records, n, start, placed))
               for n in (1, 2)]
    for process in writers:
        process.start()
    wins = [placed.get(timeout=120) for _ in writers]
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert sum(wins) == len(records)  # exactly one winner per entry
    cache = EmbeddingCache(tmp_path, "fake", "w" * 16, 64, dataset.key)
    for record in records:
        assert cache.is_valid(record, verify=True)
        entry = cache.load(record)
        writer = float(entry["a"][0, 0, 0])
        assert writer in (1.0, 2.0)
        assert np.all(entry["a"] == writer) and np.all(entry["b"] == writer)  # both arrays from one writer
        assert json.loads((cache.entry_dir(record) / "meta.json").read_text())["image_id"] == record.image_id
    leftovers = [p for p in cache.namespace.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert leftovers == []
    assert sum(1 for p in cache.namespace.glob("*/*") if p.is_dir()) == len(records)


def test_sam2_entries_hold_the_two_high_resolution_maps(tmp_path, phantom_dataset):
    _, dataset = phantom_dataset
    sam2 = build_backbone("sam2_t", "random", input_size=SMALL)
    cache = EmbeddingCache.for_backbone(tmp_path, sam2, dataset.key)
    records = dataset.records_for("val")[:2]
    assert cache.ensure(sam2, dataset, records, progress=False).misses == 2
    entry = cache.load(records[0])
    assert {name: array.shape for name, array in entry.items()} == {
        "image_embed": (256, SMALL // 16, SMALL // 16),
        "high_res_0": (32, SMALL // 4, SMALL // 4),
        "high_res_1": (64, SMALL // 8, SMALL // 8),
    }
    assert all(array.dtype == np.float16 for array in entry.values())
    image = dataset.load(records[0])[0]
    direct = sam2.encode(sam2.preprocess(image[None]))
    for name, array in entry.items():
        np.testing.assert_allclose(array.astype(np.float32), direct[name][0].numpy(), rtol=2e-3, atol=2e-3)


def test_temp_folders_of_killed_writers_are_removed_once_stale(cache, sam_b, phantom_dataset):
    _, dataset = phantom_dataset
    record = dataset.records_for("val")[0]
    shard = cache.entry_dir(record).parent
    stale, fresh = shard / f"{TEMP_PREFIX}dead.x1", shard / f"{TEMP_PREFIX}busy.x2"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "image_embed.npy").write_bytes(b"half written")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    cache.ensure(sam_b, dataset, [record], progress=False)
    assert not stale.exists() and fresh.exists()  # a young one may belong to a live writer
    assert cache.is_valid(record, verify=True)


def test_two_targets_share_the_entries_of_their_common_images(tmp_path, sam_b, two_target_datasets, monkeypatch):
    """The same slice (or augmented view) in two targets' stores is one entry: after the first
    store is encoded, the second's ensure() counts its shared images as hits and encodes only the rest."""
    _, stores = two_target_datasets
    whole, core = stores["whole_tumor"], stores["tumor_core"]
    first = EmbeddingCache.for_backbone(tmp_path, sam_b, whole.key)
    second = EmbeddingCache.for_backbone(tmp_path, sam_b, core.key)
    assert first.namespace == second.namespace
    in_whole = {r.image_sha256 for r in whole.records}
    core_images = {r.image_sha256 for r in core.records}
    shared, own = core_images & in_whole, core_images - in_whole
    assert shared and own  # the phantom's tumour core: mostly the whole tumour's slices, and some of its own
    calls = _count_encoded_images(sam_b, monkeypatch)
    assert first.ensure(sam_b, whole, whole.records, progress=False) == EncodeCounts(misses=len(in_whole))
    calls.clear()
    counts = second.ensure(sam_b, core, core.records, progress=False)
    assert counts == EncodeCounts(hits=len(shared), misses=len(own), corrupt=0)
    assert sum(calls) == len(own)
    record = next(r for r in core.records if r.image_sha256 in shared)
    twin = next(r for r in whole.records if r.image_sha256 == record.image_sha256)
    assert second.entry_dir(record) == first.entry_dir(twin)
    np.testing.assert_array_equal(second.load(record)["image_embed"], first.load(twin)["image_embed"])


# --- verified entries are trusted by their files' size and mtime -------------------------------


def _count_hashes(monkeypatch) -> list[int]:
    """Patch the cache's SHA-256 of an array to record each call (one element per array hashed)."""
    calls: list[int] = []
    original = embedding_cache._sha256

    def counting(array):
        calls.append(1)
        return original(array)

    monkeypatch.setattr(embedding_cache, "_sha256", counting)
    return calls


def test_a_verified_cache_is_trusted_without_hashing(cache, sam_b, phantom_dataset, monkeypatch):
    _, dataset = phantom_dataset
    records = dataset.records_for("val") + dataset.records_for("test")
    cache.ensure(sam_b, dataset, records, progress=False)
    assert all((cache.entry_dir(r) / VERIFIED_FILE).is_file() for r in records)  # marked when written

    hashes = _count_hashes(monkeypatch)
    again = cache.ensure(sam_b, dataset, records, verify=True, progress=False)
    assert again == EncodeCounts(hits=len(records), misses=0, corrupt=0)
    assert hashes == []
    assert all(cache.is_valid(r, verify=True) for r in records) and hashes == []
    # The driver's check, without building the backbone: the same namespace, every entry verified.
    named = EmbeddingCache.for_model(cache.root, sam_b.spec, sam_b.weights_id, sam_b.input_size, dataset.key)
    assert named.namespace == cache.namespace
    assert all(named.is_verified(r) for r in records) and hashes == []


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes], ids=["truncated", "rewritten_same_size"])
def test_a_changed_array_of_a_verified_entry_is_found_corrupt_and_encoded_again(cache, sam_b, phantom_dataset,
                                                                               damage, monkeypatch):
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:3]
    cache.ensure(sam_b, dataset, records, progress=False)
    good = np.array(cache.load(records[1])["image_embed"])
    path = cache.entry_dir(records[1]) / "image_embed.npy"
    before = os.stat(path)
    damage(path)  # right after the entry was written: the entry's backdated mtime still changes
    assert os.stat(path).st_mtime_ns != before.st_mtime_ns or os.stat(path).st_size != before.st_size
    assert (cache.entry_dir(records[1]) / VERIFIED_FILE).is_file()  # the marker is still there, now stale
    assert not cache.is_verified(records[1]) and cache.is_verified(records[0])

    calls = _count_encoded_images(sam_b, monkeypatch)
    counts = cache.ensure(sam_b, dataset, records, verify=True, progress=False)
    assert counts == EncodeCounts(hits=2, misses=0, corrupt=1)
    assert calls == [1]
    np.testing.assert_array_equal(np.array(cache.load(records[1])["image_embed"]), good)
    hashes = _count_hashes(monkeypatch)
    assert cache.ensure(sam_b, dataset, records, verify=True, progress=False) == EncodeCounts(hits=3)
    assert hashes == []  # the new entry is marked too


def test_full_check_rehashes_and_catches_a_change_that_kept_size_and_mtime(cache, sam_b, phantom_dataset,
                                                                           monkeypatch):
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:3]
    cache.ensure(sam_b, dataset, records, progress=False)
    hashes = _count_hashes(monkeypatch)
    assert cache.ensure(sam_b, dataset, records, full_check=True, progress=False) == EncodeCounts(hits=3)
    assert len(hashes) == 3  # one array per SAM entry, every one hashed despite the markers

    good = np.array(cache.load(records[1])["image_embed"])
    path = cache.entry_dir(records[1]) / "image_embed.npy"
    before = os.stat(path)
    _flip_bytes(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    hashes.clear()
    # the documented limit of the cheap check: the marker still matches, the entry is trusted
    assert cache.ensure(sam_b, dataset, records, verify=True, progress=False) == EncodeCounts(hits=3)
    assert hashes == []

    calls = _count_encoded_images(sam_b, monkeypatch)
    counts = cache.ensure(sam_b, dataset, records, verify=True, full_check=True, progress=False)
    assert counts == EncodeCounts(hits=2, misses=0, corrupt=1)
    assert calls == [1]
    np.testing.assert_array_equal(np.array(cache.load(records[1])["image_embed"]), good)
    hashes.clear()
    assert cache.ensure(sam_b, dataset, records, verify=True, progress=False) == EncodeCounts(hits=3)
    assert hashes == []


def test_a_failed_full_check_removes_the_marker(cache, sam_b, phantom_dataset):
    _, dataset = phantom_dataset
    record = dataset.records_for("test")[0]
    cache.ensure(sam_b, dataset, [record], progress=False)
    path = cache.entry_dir(record) / "image_embed.npy"
    before = os.stat(path)
    _flip_bytes(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cache.is_valid(record, verify=True)
    assert not cache.is_valid(record, full_check=True)
    assert not (cache.entry_dir(record) / VERIFIED_FILE).exists()  # so the damage is not trusted again
    assert not cache.is_valid(record, verify=True)


def _delete(path: Path) -> None:
    path.unlink()


def _garble(path: Path) -> None:
    path.write_text('{"format": 1, "files": {"meta.json": [')


def _other_format(path: Path) -> None:
    path.write_text(json.dumps({"format": 99, "files": json.loads(path.read_text())["files"]}))


def _wrong_stats(path: Path) -> None:
    marker = json.loads(path.read_text())
    marker["files"]["image_embed.npy"][1] += 1
    path.write_text(json.dumps(marker))


@pytest.mark.parametrize("spoil", [_delete, _garble, _other_format, _wrong_stats])
def test_a_missing_or_unreadable_marker_falls_back_to_hashing(cache, sam_b, phantom_dataset, spoil, monkeypatch):
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:3]
    cache.ensure(sam_b, dataset, records, progress=False)
    marker = cache.entry_dir(records[1]) / VERIFIED_FILE
    spoil(marker)
    assert not cache.is_verified(records[1]) and cache.is_verified(records[0])

    hashes = _count_hashes(monkeypatch)
    calls = _count_encoded_images(sam_b, monkeypatch)
    assert cache.ensure(sam_b, dataset, records, verify=True, progress=False) == EncodeCounts(hits=3)
    assert len(hashes) == 1 and calls == []  # only the spoiled entry was hashed, and it was good
    assert json.loads(marker.read_text())["format"] == 1  # and marked again
    hashes.clear()
    assert cache.ensure(sam_b, dataset, records, verify=True, progress=False) == EncodeCounts(hits=3)
    assert hashes == []


def test_a_damaged_entry_without_a_marker_is_still_found_by_hashing(cache, sam_b, phantom_dataset, monkeypatch):
    """An entry of a cache made before markers (or whose marker was lost) gets the full check."""
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:2]
    cache.ensure(sam_b, dataset, records, progress=False)
    path = cache.entry_dir(records[0]) / "image_embed.npy"
    before = os.stat(path)
    (cache.entry_dir(records[0]) / VERIFIED_FILE).unlink()
    _flip_bytes(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not cache.is_valid(records[0], verify=True)
    assert cache.ensure(sam_b, dataset, records, verify=True, progress=False) == EncodeCounts(hits=1, corrupt=1)


def test_no_marker_is_written_into_an_entry_folder_that_is_gone(tmp_path):
    folder = tmp_path / "discarded"
    assert not embedding_cache._write_marker(folder, {"meta.json": [1, 2]})
    assert not folder.exists()


def test_an_entry_whose_files_cannot_be_flushed_is_valid_but_unmarked(cache, sam_b, phantom_dataset, monkeypatch):
    _, dataset = phantom_dataset
    records = dataset.records_for("test")[:2]

    def failing(paths):
        raise OSError("no fsync here")

    monkeypatch.setattr(embedding_cache, "_flush_to_disk", failing)
    assert cache.ensure(sam_b, dataset, records, progress=False) == EncodeCounts(misses=2)
    assert cache.ensure(sam_b, dataset, records, verify=True, progress=False) == EncodeCounts(hits=2)
    assert not any((cache.entry_dir(r) / VERIFIED_FILE).exists() for r in records)
