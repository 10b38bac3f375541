"""Pipeline stage 7: the real Mimi architecture (random weights with filled codebooks, saved to and loaded
from a local directory through transformers' loader) encodes turns batched exactly as one at a time."""

import numpy as np
import pytest
import torch

from data_pipeline.codec import SAMPLES_PER_FRAME, MimiCodec


@pytest.fixture(scope="module")
def audios():
    rng = np.random.default_rng(0)
    lengths = (24000, 30000, 50000, 1000, 48000, 3 * SAMPLES_PER_FRAME)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def test_batched_encoding_equals_one_at_a_time(mimi_dir, audios):
    batched = MimiCodec(str(mimi_dir), batch_size=4).encode(audios)
    single = MimiCodec(str(mimi_dir), batch_size=1).encode(audios)
    for audio, a, b in zip(audios, batched, single, strict=True):
        assert a.dtype == np.uint16 and a.shape == (32, -(-len(audio) // SAMPLES_PER_FRAME))
        assert np.array_equal(a, b)
        assert a.max() < 2048
    assert len(np.unique(batched[2])) > 100  # real, varied codes


def test_whole_frame_turns_get_mimis_own_codes(mimi_dir, audios):
    from transformers import MimiModel

    model = MimiModel.from_pretrained(mimi_dir).eval()
    whole = [a[: len(a) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME] for a in audios if len(a) >= SAMPLES_PER_FRAME]
    codes = MimiCodec(str(mimi_dir), batch_size=8).encode(whole)
    for audio, ours in zip(whole, codes, strict=True):
        with torch.no_grad():
            direct = model.encode(torch.from_numpy(audio)[None, None], num_quantizers=32).audio_codes[0]
        assert np.array_equal(ours, direct.numpy().astype(np.uint16))


def test_decode_turns_codes_into_24khz_audio_as_mimi_does(mimi_dir, audios):
    from transformers import MimiModel

    codec = MimiCodec(str(mimi_dir))
    codes = codec.encode([audios[2]])[0]  # uint16 [32, n], as the shards hold them
    audio = codec.decode(codes)
    assert audio.dtype == np.float32 and audio.shape == (codes.shape[1] * SAMPLES_PER_FRAME,)
    assert np.isfinite(audio).all() and audio.std() > 0
    with torch.no_grad():
        direct = MimiModel.from_pretrained(mimi_dir).eval().decode(torch.from_numpy(codes.astype(np.int64))[None])
    np.testing.assert_allclose(audio, direct.audio_values[0, 0, : len(audio)].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \[32, n_frames\]"):
        codec.decode(codes.T)
