"""Pipeline stage 7: the real Mimi architecture (random weights with filled codebooks, saved to and loaded
from a local directory through transformers' loader) encodes turns batched exactly as one at a time."""

import numpy as np
import pytest
import torch

from data_pipeline.codec import SAMPLES_PER_FRAME, MimiEncoder


@pytest.fixture(scope="module")
def audios():
    rng = np.random.default_rng(0)
    lengths = (24000, 30000, 50000, 1000, 48000, 3 * SAMPLES_PER_FRAME)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def test_batched_encoding_equals_one_at_a_time(mimi_dir, audios):
    batched = MimiEncoder(str(mimi_dir), batch_size=4).encode(audios)
    single = MimiEncoder(str(mimi_dir), batch_size=1).encode(audios)
    for audio, a, b in zip(audios, batched, single, strict=True):
        assert a.dtype == np.uint16 and a.shape == (32, -(-len(audio) // SAMPLES_PER_FRAME))
        assert np.array_equal(a, b)
        assert a.max() < 2048
    assert len(np.unique(batched[2])) > 100  # real, varied codes


def test_whole_frame_turns_get_mimis_own_codes(mimi_dir, audios):
    from transformers import MimiModel

    model = MimiModel.from_pretrained(mimi_dir).eval()
    whole = [a[: len(a) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME] for a in audios if len(a) >= SAMPLES_PER_FRAME]
    codes = MimiEncoder(str(mimi_dir), batch_size=8).encode(whole)
    for audio, ours in zip(whole, codes, strict=True):
        with torch.no_grad():
            direct = model.encode(torch.from_numpy(audio)[None, None], num_quantizers=32).audio_codes[0]
        assert np.array_equal(ours, direct.numpy().astype(np.uint16))
