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


# Streaming decode: chunk by chunk, each layer's state carried across, equals the full decode.


@pytest.fixture(scope="module")
def codec(mimi_dir):
    return MimiCodec(str(mimi_dir), device="cpu")


def random_codes(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (32, frames)).astype(np.uint16)


def stream(decoder, codes: np.ndarray, schedule) -> np.ndarray:
    """Feed `codes` in chunks of the sizes in `schedule` (cycled); each call must return its frames' samples."""
    out, start, sizes = [], 0, list(schedule)
    while start < codes.shape[1]:
        n = min(sizes[len(out) % len(sizes)], codes.shape[1] - start)
        audio = decoder.decode(codes[:, start : start + n])
        assert audio.dtype == np.float32 and audio.shape == (n * SAMPLES_PER_FRAME,)
        out.append(audio)
        start += n
    return np.concatenate(out)


@pytest.fixture(scope="module")
def short(codec):
    codes = random_codes(40)
    return codes, codec.decode(codes)


# fp32 rounding: random Mimi's audio peaks near 30 (real Mimi's near 1), where the full decode itself is ~8e-5
# off its own fp64 result; the fp64 test below shows that the streaming computation itself is exact.
def fp32_tolerance(full: np.ndarray) -> float:
    return 1e-5 * float(np.abs(full).max())


@pytest.mark.parametrize("schedule", [[1], [3], [7], [5, 1, 11, 2, 8, 13]], ids=["1", "3", "7", "uneven"])
def test_streaming_decode_in_chunks_equals_full_decode(codec, short, schedule):
    codes, full = short
    if schedule == [1]:  # one call per frame costs the most: 12 frames; Mimi is causal, so their audio is
        codes, full = codes[:, :12], full[: 12 * SAMPLES_PER_FRAME]  # the full decode's first 12 frames' audio
    streamed = stream(codec.streaming_decoder(), codes, schedule)
    assert streamed.shape == full.shape
    diff = float(np.abs(streamed - full).max())
    print(f"chunks {schedule}: max abs diff {diff:.2e}, peak {np.abs(full).max():.1f}")
    assert diff < fp32_tolerance(full)


def test_streaming_past_the_transformers_sliding_window(codec):
    """140 frames = 280 transformer steps > the 250-step window: the KV cache drops what the mask hides."""
    codes = random_codes(140, seed=1)
    full = codec.decode(codes)
    # One chunk crossing step 250, single frames with a full cache, then more.
    streamed = stream(codec.streaming_decoder(), codes, [100, 1, 1, 30, 8])
    diff = float(np.abs(streamed - full).max())
    print(f"140 frames: max abs diff {diff:.2e}")
    assert diff < fp32_tolerance(full)


def test_streaming_decode_is_exact_in_fp64(mimi_dir):
    """In fp64 the streamed audio is the full decode's to the last bit of the float32 result."""
    codec64 = MimiCodec(str(mimi_dir), device="cpu")
    codec64.model.double()
    for module in codec64.model.modules():
        if hasattr(module, "_embed"):
            module._embed = None  # the centroids cached in fp32
    codes = random_codes(8, seed=2)
    with torch.no_grad():
        full = codec64.model.decode(torch.from_numpy(codes.astype(np.int64))[None]).audio_values[0, 0]
    streamed = stream(codec64.streaming_decoder(), codes, [1, 3])
    np.testing.assert_allclose(streamed, full.float().numpy()[: len(streamed)], rtol=0, atol=1e-5)


def test_a_fresh_or_reset_streaming_decoder_starts_clean(codec, short):
    codes, _ = short
    first = codec.streaming_decoder()
    head = first.decode(codes[:, :5])
    first.decode(codes[:, 5:9])  # state now holds frames 0-8
    assert np.array_equal(codec.streaming_decoder().decode(codes[:, :5]), head)
    first.reset()
    assert np.array_equal(first.decode(codes[:, :5]), head)


def test_streaming_decode_rejects_wrong_shapes_and_unknown_layers(codec, short):
    import copy

    from torch import nn

    from data_pipeline.codec import MimiStreamingDecoder

    codes, _ = short
    decoder = codec.streaming_decoder()
    for bad in (codes.T, codes[0], codes[:31], codes[:, :0]):
        with pytest.raises(ValueError, match=r"expected \[32, n\] with n >= 1"):
            decoder.decode(bad)
    model = copy.deepcopy(codec.model)
    model.decoder.decoder_seanet.layers[1] = nn.Softmax(dim=1)  # not elementwise in time
    with pytest.raises(NotImplementedError, match="Softmax"):
        MimiStreamingDecoder(model, 32)
    model.decoder.decoder_seanet.layers[1] = nn.ELU()
    model.decoder.decoder_seanet.layers[0].pad_mode = "reflect"  # padding that looks ahead
    with pytest.raises(NotImplementedError, match="reflect"):
        MimiStreamingDecoder(model, 32)
