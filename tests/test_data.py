"""Real webdataset shards on disk → packed batches: contract, determinism, disjoint slots, exact resume,
bad input."""

import json
import tarfile
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from csm_train import CSM, CSMConfig
from csm_train.data import FrameStream, StreamState, attention_mask, window_frames
from csm_train.tokenizer import ByteTokenizer
from data_pipeline.shards import ShardWriter, Window, read_manifest, sample_key
from data_pipeline.synthetic import write_synthetic_corpus

K = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    write_synthetic_corpus(path, num_conversations=48, samples_per_shard=4)
    return path


def stream(path, **kwargs):
    args = dict(tokenizer=ByteTokenizer(), num_codebooks=K, max_seq_len=1024, batch_size=2, seed=0)
    return FrameStream(path, **{**args, **kwargs})


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def test_writer_follows_the_shard_contract(dataset):
    card = json.loads((dataset / "dataset.json").read_text())
    rows = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines()]
    shards = sorted((dataset / "shards").iterdir())
    assert card["samples"] == len(rows) == 48 and card["shards"] == len(shards) == 12
    assert not list((dataset / "shards").glob("*.partial"))
    assert card["codec"]["n_codebooks"] == K and card["hours"] == pytest.approx(card["seconds"] / 3600)
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == [f"{rows[0]['key']}.{m}" for m in ("codes.npy", "meta.json", "segments.json")]
    assert rows[0]["key"] == "demo/conversation_0000/000000" and rows[0]["shard"] == "shard-000000.tar"
    with pytest.raises(ValueError, match="no dots"):
        sample_key("bad.name", 0)


def test_batches_are_packed_in_sesame_layout(dataset):
    batch = take(stream(dataset), 1)[0]
    assert batch.tokens.shape == (2, 1024, K + 1) and batch.labels.shape == (2, 1024, K)
    docs = batch.doc_ids
    assert docs.max() >= 1  # conversations of ~400 frames: two or more per 1024-frame row
    for row in range(2):
        for doc in range(int(docs[row].max()) + 1):
            frames = (docs[row] == doc).nonzero().flatten()
            assert torch.equal(batch.input_pos[row, frames], torch.arange(len(frames)))
            assert batch.tokens[row, frames[0], K] == ByteTokenizer.bos_id  # each starts with its BOS
        padding = docs[row] == -1
        assert not batch.tokens_mask[row, padding].any() and (batch.labels[row, padding] == -100).all()
    mask = attention_mask(docs)
    i, j = (docs[0] == 0).nonzero()[-1].item(), (docs[0] == 1).nonzero()[0].item()
    assert mask[0, 0, j, j - 1].item() is False and mask[0, 0, i, i - 1].item() is True  # no attention across


def test_packed_batch_trains_like_separate_conversations(dataset):
    """The block mask and restarted positions make a packed row equal its conversations run alone."""
    batch = take(stream(dataset), 1)[0]
    torch.manual_seed(0)
    model = CSM(CSMConfig.preset("tiny", text_vocab_size=ByteTokenizer.vocab_size)).eval()
    docs = batch.doc_ids[:1]
    with torch.no_grad():
        packed = model(batch.tokens[:1], batch.tokens_mask[:1], batch.input_pos[:1], attention_mask(docs))
        for doc in range(int(docs.max()) + 1):
            frames = (docs[0] == doc).nonzero().flatten()
            alone = model(batch.tokens[:1, frames], batch.tokens_mask[:1, frames])
            torch.testing.assert_close(packed.c0_logits[:, frames], alone.c0_logits, atol=1e-5, rtol=0)


def test_stream_is_deterministic_and_slots_are_disjoint(dataset):
    a, b = take(stream(dataset), 5), take(stream(dataset), 5)
    for x, y in zip(a, b, strict=True):
        assert x.stream.keys == y.stream.keys and torch.equal(x.tokens, y.tokens)
    # Two ranks: disjoint samples within an epoch (24 samples each; 4 + 2 × 2 × ~2 read by batch 4).
    seen = []
    for rank in range(2):
        batches = take(stream(dataset, rank=rank, world_size=2, lookahead=4), 4)
        seen.append({k for b in batches for k in b.stream.keys})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_resume_neither_repeats_nor_skips(dataset):
    """Run 7 batches; resume from the state after batch 3: batches 4.. come out bit-identical."""
    full = take(stream(dataset), 7)
    state = StreamState()
    for batch in full[:3]:
        state.update(batch.stream)
    saved = json.loads(json.dumps(state.state_dict()))  # as it travels in a checkpoint
    restored = StreamState()
    restored.load_state_dict(saved)
    resumed = take(stream(dataset, state=restored), 4)
    for x, y in zip(full[3:], resumed, strict=True):
        assert x.stream.keys == y.stream.keys and torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
    # Across epoch boundaries too: 48 samples an epoch, ~5 per batch.
    full = take(stream(dataset), 16)
    assert full[-1].stream.position[0] >= 1 and any(b.stream.consumed_after for b in full)
    state = StreamState()
    for batch in full[:12]:
        state.update(batch.stream)
    resumed = take(stream(dataset, state=state), 4)
    assert [b.stream.keys for b in resumed] == [b.stream.keys for b in full[12:]]


def test_dataloader_workers_split_shards_and_resume_per_slot(dataset):
    loader = DataLoader(stream(dataset, lookahead=4), batch_size=None, num_workers=2)
    batches = take(loader, 6)
    assert [b.stream.slot for b in batches] == [0, 1, 0, 1, 0, 1]  # workers take turns
    keys = [{k for b in batches if b.stream.slot == s for k in b.stream.keys} for s in (0, 1)]
    assert not keys[0] & keys[1]
    state = StreamState()
    for batch in batches[:3]:
        state.update(batch.stream)
    resumed = take(DataLoader(stream(dataset, state=state, lookahead=4), batch_size=None, num_workers=2), 3)
    assert [b.stream.keys for b in resumed] == [b.stream.keys for b in batches[3:]]


def test_lookahead_packing_wastes_little_and_keeps_every_sample(dataset):
    first_come = take(stream(dataset, lookahead=1), 16)
    best_fit = take(stream(dataset, lookahead=16), 16)

    def padding(batches):
        return sum(int((b.doc_ids == -1).sum()) for b in batches) / sum(b.doc_ids.numel() for b in batches)

    assert padding(best_fit) < padding(first_come) / 2
    # Out of order, but every sample exactly once: all of epoch 0 is trained on before the stream's
    # oldest unconsumed position moves into epoch 1, and no position comes twice.
    positions = [tuple(p) for b in best_fit for p in b.stream.sample_positions]
    assert len(positions) == len(set(positions))
    crossed = next(i for i, b in enumerate(best_fit) if b.stream.position[0] == 1)
    epoch0 = {p for b in best_fit[: crossed + 1] for p in map(tuple, b.stream.sample_positions) if p[0] == 0}
    assert epoch0 == {(0, i) for i in range(48)}


def test_long_window_is_cut_at_a_turn_boundary():
    window = Window(
        key="x/000000",
        codes=np.zeros((K, 300), dtype=np.uint16),
        segments=[
            {"speaker": 0, "text": "a", "frame_start": 0, "frame_end": 100},
            {"speaker": 1, "text": "b", "frame_start": 100, "frame_end": 300},
        ],
    )
    # segment 1: BOS "[0]a" EOS = 6 text frames + 100 audio + 1 end frame = 107.
    frames, cut = window_frames(window, ByteTokenizer(), K, max_frames=200)
    assert cut and len(frames) == 107
    frames, cut = window_frames(window, ByteTokenizer(), K, max_frames=50)  # first turn cropped to fit
    assert cut and len(frames) == 50 and (frames.tokens[-1, :K] == 0).all()
    frames, cut = window_frames(window, ByteTokenizer(), K, max_frames=400)
    assert not cut and len(frames) == 107 + 207


def test_truncated_shard_is_a_clear_error(dataset, tmp_path):
    broken = tmp_path / "broken"
    (broken / "shards").mkdir(parents=True)
    for name in ("manifest.jsonl", "dataset.json"):
        (broken / name).write_text((dataset / name).read_text())
    for shard in (dataset / "shards").iterdir():
        data = shard.read_bytes()
        (broken / "shards" / shard.name).write_bytes(
            data[: len(data) // 3] if shard.name == "shard-000000.tar" else data
        )
    first = stream(broken).slot_shards(0, 1, epoch=0).index("shard-000000.tar")
    with pytest.raises(RuntimeError, match=r"shard .*shard-000000.tar is truncated or corrupt.*write it again"):
        take(stream(broken), 2 * (first + 1) + 2)


def test_sample_whose_codes_and_segments_disagree_is_skipped_and_counted(tmp_path):
    writer = ShardWriter(tmp_path, num_codebooks=K, samples_per_shard=8)
    good = {"speaker": 0, "text": "hello", "frame_start": 0, "frame_end": 40}
    for i in range(6):
        writer.write(Window(sample_key("s", i), np.ones((K, 40), dtype=np.uint16), [good]))
    writer.close()
    # Corrupt sample 2's segments after the fact (as a buggy tool or bit rot would).
    shard = tmp_path / "shards" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == "s/000002.segments.json":
                data = json.dumps([{**good, "frame_end": 99}]).encode()
                member.size = len(data)
            tar.addfile(member, __import__("io").BytesIO(data))
    batches = take(stream(tmp_path, max_seq_len=60, batch_size=1, lookahead=1), 4)
    keys = [k for b in batches for k in b.stream.keys]
    assert "s/000002" not in keys and keys[:2] == ["s/000000", "s/000001"]
    assert sum(b.stream.skipped for b in batches) == 1


def test_missing_dataset_and_too_few_shards_are_clear(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl not found.*data.path"):
        stream(tmp_path)
    with pytest.raises(ValueError, match="12 shards cannot feed 16 ranks"):
        take(stream(dataset, world_size=16), 1)


def test_holdout_splits_by_key_and_refuses_an_empty_side(tmp_path):
    from csm_train.data import HeldOutSet, held_out, validation_keys
    from data_pipeline.synthetic import write_synthetic_corpus

    write_synthetic_corpus(tmp_path, num_codebooks=32)
    keys = [row["key"] for row in read_manifest(tmp_path)]
    validation = {k for k in keys if held_out(k, 0.25)}
    assert 0 < len(validation) < len(keys)
    assert {k for k in keys if held_out(k, 0.5)} >= validation  # a larger share only adds samples
    stream = FrameStream(tmp_path, ByteTokenizer(), 32, max_seq_len=512, batch_size=2, lookahead=4, holdout=0.25)
    trained = {key for batch in islice(stream, 20) for key in batch.stream.keys}
    assert trained and not trained & validation
    assert len(HeldOutSet(tmp_path, ByteTokenizer(), 32, 512, 0.25)) == len(validation)
    with pytest.raises(ValueError, match="holds out all 32 samples.*data.holdout=0"):
        FrameStream(tmp_path, ByteTokenizer(), 32, max_seq_len=512, batch_size=2, holdout=1.0)

    # A set so small that no key hashes into the share (a 5-minute voice is a few windows) still validates, on the
    # one key that hashes lowest, and never trains on it.
    assert not any(held_out(k, 0.001) for k in keys)
    (smallest,) = validation_keys(keys, 0.001)
    assert len(HeldOutSet(tmp_path, ByteTokenizer(), 32, 512, 0.001)) == 1
    stream = FrameStream(tmp_path, ByteTokenizer(), 32, max_seq_len=512, batch_size=2, lookahead=4, holdout=0.001)
    assert smallest not in {key for batch in islice(stream, 20) for key in batch.stream.keys}
