"""The synthetic store: crash-safe files anyone can read, idempotent puts, a self-healing index, fresh-first sampling."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from shared.batch_contract import BatchContract
from shared.config import StreamConfig
from shared.wire import SCHEMA_VERSION
from trainer.store import FreshFirstSampler, SyntheticStore, atomic_write, read_batch
from test_wire import FINGERPRINT, assert_same_batch, ensemble_batch, make_batch


def fill(store: SyntheticStore, count: int, **batch_args) -> list[str]:
    ids = [f"b-{i}" for i in range(count)]
    for i, batch_id in enumerate(ids):
        assert store.put(make_batch(batch_id, seed=i, **batch_args))
    return ids


def temp_files(root) -> list:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_stored_batch_is_a_plain_npz_and_round_trips(tmp_path):
    store = SyntheticStore(tmp_path)
    batch = make_batch("b-0", n=5)
    assert store.put(batch)
    assert temp_files(tmp_path) == []
    path = tmp_path / "batches" / "b-0.npz"
    with np.load(path, allow_pickle=False) as z:  # what any tool without this project does
        assert set(z.files) == {"images", "labels", "teacher_logits", "meta", "position"}
        assert z["images"].dtype == np.uint8 and z["images"].shape == (5, 3, 8, 8)
        assert z["labels"].dtype == np.int64 and z["teacher_logits"].dtype == np.float16
        meta = json.loads(z["meta"].item())
    assert meta["batch_id"] == "b-0" and meta["teacher_fingerprint"] == batch.teacher_fingerprint
    assert meta["shape"] == [5, 3, 8, 8] and meta["version"] == SCHEMA_VERSION
    got = store.get("b-0")
    assert_same_batch(got.to_wire(), batch)
    assert_same_batch(read_batch(path).to_wire(), batch)
    assert store.images_count() == 5 and len(store) == 1 and "b-0" in store and "b-1" not in store


def test_a_batch_without_logits(tmp_path):
    store = SyntheticStore(tmp_path)
    store.put(make_batch("plain", classes=None))
    assert store.get("plain").logits is None


def test_a_failed_write_leaves_neither_file_nor_temp(tmp_path):
    def explode(f):
        f.write(b"half a batch")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x.npz", explode)
    assert list(tmp_path.iterdir()) == []


def test_opening_removes_dead_writers_temp_files_only(tmp_path):
    SyntheticStore(tmp_path)
    dead = tmp_path / "batches" / ".b-9.npz.999999999.tmp"  # no such pid
    live = tmp_path / "batches" / f".b-8.npz.{os.getppid()}.tmp"  # a running process may still be writing it
    dead.write_bytes(b"torn")
    live.write_bytes(b"in progress")
    store = SyntheticStore(tmp_path)
    assert not dead.exists() and live.exists()
    assert len(store) == 0


def test_put_is_idempotent_on_the_batch_id(tmp_path):
    store = SyntheticStore(tmp_path)
    assert store.put(make_batch("dup", seed=1))
    path = store.path("dup")
    stat = path.stat()
    assert not store.put(make_batch("dup", seed=2))  # same id, other content: never rewritten
    assert not SyntheticStore(tmp_path).put(make_batch("dup", seed=3))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino
    assert len(SyntheticStore(tmp_path)) == 1
    assert len((tmp_path / "index.jsonl").read_text().splitlines()) == 1


def test_invalid_batch_ids_are_refused(tmp_path):
    store = SyntheticStore(tmp_path)
    for bad in ("../escape", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="invalid batch id"):
            store.path(bad)
    with pytest.raises(KeyError, match="not in the store"):
        store.get("missing")


def test_the_index_is_rebuilt_from_the_files(tmp_path):
    ids = fill(SyntheticStore(tmp_path), 6)
    index = tmp_path / "index.jsonl"
    intact = index.read_text()

    index.unlink()
    assert SyntheticStore(tmp_path).batch_ids() == ids  # arrival order comes back from each file's position
    assert index.read_text() == intact

    index.write_text(intact + '{"batch_id": "b-')  # a torn append
    assert SyntheticStore(tmp_path).batch_ids() == ids
    assert index.read_text() == intact

    # A crash between the rename and the index append: the file is there, its line is not.
    index.write_text("".join(intact.splitlines(keepends=True)[:4]))
    store = SyntheticStore(tmp_path)
    assert store.batch_ids() == ids and store.images_count() == 6 * 4
    assert index.read_text() == intact

    (tmp_path / "batches" / "b-2.npz").unlink()  # a line for a file that is gone is dropped
    store = SyntheticStore(tmp_path)
    assert store.batch_ids() == [i for i in ids if i != "b-2"]
    store.put(make_batch("late", seed=50))  # takes a position after every earlier one, not len(store)
    index.unlink()
    assert SyntheticStore(tmp_path).batch_ids() == [i for i in ids if i != "b-2"] + ["late"]


def test_sampler_takes_fresh_images_first_then_replays_everything(tmp_path):
    store = SyntheticStore(tmp_path)
    fill(store, 3)  # 3 batches x 4 images
    sampler = FreshFirstSampler(store, batch_size=6, seed=0)
    everything = np.concatenate([store.get(b).images for b in store.batch_ids()])

    first, second = sampler.sample(), sampler.sample()
    assert first.n_fresh == 6 and second.n_fresh == 6
    np.testing.assert_array_equal(np.concatenate([first.images, second.images]), everything)
    assert first.images.dtype == np.uint8 and first.labels.dtype == np.int64 and first.logits.shape == (1, 1, 6, 10)

    replay = sampler.sample()
    assert replay.n_fresh == 0 and replay.images.shape == (6, 3, 8, 8)

    store.put(make_batch("late", seed=99))  # new data is used at once, the rest of the batch is replay
    mixed = sampler.sample()
    assert mixed.n_fresh == 4
    np.testing.assert_array_equal(mixed.images[:4], store.get("late").images)

    # Replay is uniform over every stored image: all 16 show up, none wildly over-drawn.
    flat = {img.tobytes(): 0 for img in np.concatenate([everything, store.get("late").images])}
    for _ in range(200):
        for img in sampler.sample().images:
            flat[img.tobytes()] += 1
    assert min(flat.values()) > 30 and max(flat.values()) < 120  # expectation 75 each


def test_sampler_without_logits_when_any_batch_lacks_them(tmp_path):
    store = SyntheticStore(tmp_path)
    store.put(make_batch("a", seed=1))
    store.put(make_batch("b", seed=2, classes=None))
    assert FreshFirstSampler(store, batch_size=8).sample().logits is None


def test_sampler_on_an_empty_store(tmp_path):
    with pytest.raises(LookupError, match="empty"):
        FreshFirstSampler(SyntheticStore(tmp_path), batch_size=4).sample()


def test_sampler_state_round_trips_through_json(tmp_path):
    store = SyntheticStore(tmp_path)
    fill(store, 3)
    a = FreshFirstSampler(store, batch_size=5, seed=7)
    a.sample()
    state = json.loads(json.dumps(a.state_dict()))
    assert state["cursor"] == 1 and state["offset"] == 1

    b = FreshFirstSampler(SyntheticStore(tmp_path), batch_size=5, seed=12345)
    b.load_state_dict(state)
    for _ in range(4):  # fresh, then replay from the same RNG state
        x, y = a.sample(), b.sample()
        assert x.n_fresh == y.n_fresh
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)

    other = SyntheticStore(tmp_path / "other")
    other.put(make_batch("someone-else"))
    with pytest.raises(ValueError, match="does not match the store"):
        FreshFirstSampler(other, batch_size=5).load_state_dict(state)


@pytest.mark.parametrize("channels", [1, 3])
def test_export_imagefolder_writes_decodable_pngs_per_class(tmp_path, channels):
    store = SyntheticStore(tmp_path / "store")
    fill(store, 2, c=channels)
    names = [f"class_{k}" for k in range(10)]
    out = tmp_path / "export"
    assert store.export_imagefolder(out, class_names=names) == 8
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 8
    for batch_id in store.batch_ids():
        batch = store.get(batch_id)
        for i, (image, label) in enumerate(zip(batch.images, batch.labels)):
            with Image.open(out / names[label] / f"{batch_id}_{i}.png") as png:
                pixels = np.asarray(png)
            want = image[0] if channels == 1 else image.transpose(1, 2, 0)
            np.testing.assert_array_equal(pixels, want)

    assert store.export_imagefolder(tmp_path / "by_id") == 8  # no names: folders are class ids
    assert {p.parent.name for p in (tmp_path / "by_id").rglob("*.png")} <= {str(k) for k in range(10)}
    with pytest.raises(ValueError, match="no name"):
        store.export_imagefolder(tmp_path / "short", class_names=["only_one"])


def test_ensemble_logits_survive_a_restart(tmp_path):
    """Every member's logits for every view, read back by a reopened store and drawn by its sampler."""
    batches = [ensemble_batch() for _ in range(2)]
    for i, b in enumerate(batches):
        b.batch_id, b.logits = f"e-{i}", (b.logits + i).astype(np.float16)
    contract = BatchContract.from_stream(StreamConfig(), ensemble=batches[0].logit_members)
    first = SyntheticStore(tmp_path, contract)
    for b in batches:
        assert first.put(b)
    reopened = SyntheticStore(tmp_path, contract)
    assert reopened.quarantined == []
    for b in batches:
        got = reopened.get(b.batch_id)
        assert (got.logit_members, got.logit_views) == (b.logit_members, b.logit_views)
        assert_same_batch(got.to_wire(), b)
    sample = FreshFirstSampler(reopened, batch_size=12).sample()
    assert sample.logits.shape == (2, 2, 12, 10) and sample.logit_members == batches[0].logit_members
    np.testing.assert_array_equal(sample.logits[:, :, :6], batches[0].logits)
    np.testing.assert_array_equal(sample.logits[:, :, 6:], batches[1].logits)


def test_a_store_written_before_ensembles_still_opens(tmp_path):
    """A version-1 npz ([N, K] logits, a version-1 header) reads as the teacher's logits on the identity view."""
    batch = make_batch("old-0", n=5)
    store = SyntheticStore(tmp_path)
    store.put(batch)
    path = tmp_path / "batches" / "old-0.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].item())
    meta.pop("logits")
    meta.update(version=1, logits_shape=[5, 10], logits_dtype="float16")
    arrays["meta"], arrays["teacher_logits"] = np.array(json.dumps(meta)), arrays["teacher_logits"][0, 0]
    np.savez(path, **arrays)
    (tmp_path / "index.jsonl").unlink()
    reopened = SyntheticStore(tmp_path, BatchContract.from_stream(StreamConfig(), ensemble=(FINGERPRINT,)))
    assert reopened.quarantined == [] and len(reopened) == 1
    got = reopened.get("old-0")
    assert got.logits.shape == (1, 1, 5, 10) and got.logit_members == (FINGERPRINT,)
    np.testing.assert_array_equal(got.logits, batch.logits)


def test_the_sampler_gives_no_logits_across_different_ensembles(tmp_path):
    store = SyntheticStore(tmp_path)
    single, pair = make_batch("single", n=4, size=16), ensemble_batch(n=4, members=2, views=("identity",))
    pair.batch_id = "pair"
    store.put(single)
    store.put(pair)
    assert FreshFirstSampler(store, batch_size=8).sample().logits is None
