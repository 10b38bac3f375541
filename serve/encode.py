"""24 kHz float audio → the response formats, chunk by chunk as frames are generated, so the first bytes leave
with the first frames. Every compressed format goes through FFmpeg (PyAV) into a streamable container writing to
a sink that cannot seek: the muxers then write what needs no rewind (a WAV header with unknown sizes, as streamed
WAV does; FLAC without a total sample count; Ogg pages every 20 ms).

`pcm` is headerless signed 16-bit little-endian mono at 24 kHz, as OpenAI's. Opus is stored with an input rate
of 24 kHz in its header; Opus decoders output 48 kHz by the format's definition."""

from __future__ import annotations

import av
import numpy as np

from data_pipeline.shards import MIMI_SAMPLE_RATE

FORMATS = ("wav", "pcm", "flac", "mp3", "opus", "aac")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg", "aac": "audio/aac"}  # fmt: skip
# format → (FFmpeg muxer, encoder, muxer options)
CONTAINERS = {
    "wav": ("wav", "pcm_s16le", {}),
    "flac": ("flac", "flac", {}),
    "mp3": ("mp3", "libmp3lame", {}),
    "opus": ("ogg", "libopus", {"page_duration": "20000"}),  # µs: a page (and bytes out) every 20 ms
    "aac": ("adts", "aac", {}),
}


class _Sink:
    """Write-only, no `seek`: FFmpeg treats the output as a stream."""

    def __init__(self):
        self.buffer = bytearray()

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        out, self.buffer = bytes(self.buffer), bytearray()
        return out


class Encoder:
    """`feed(audio)` returns the bytes ready so far, `close()` the rest; concatenated, they are one file."""

    def __init__(self, response_format: str):
        if response_format not in FORMATS:
            raise ValueError(f"response_format {response_format!r}: one of {', '.join(FORMATS)}")
        self.format = response_format
        if response_format == "pcm":
            return
        muxer, codec, options = CONTAINERS[response_format]
        self._sink = _Sink()
        self._container = av.open(self._sink, "w", format=muxer, options=options)
        self._stream = self._container.add_stream(codec, rate=MIMI_SAMPLE_RATE, layout="mono")

    def feed(self, audio: np.ndarray) -> bytes:
        if self.format == "pcm":
            return pcm16(audio)
        if len(audio):
            samples = np.ascontiguousarray(audio, np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            frame.sample_rate = MIMI_SAMPLE_RATE
            self._mux(frame)
        return self._sink.take()

    def close(self) -> bytes:
        if self.format == "pcm":
            return b""
        self._mux(None)  # flush the encoder
        self._container.close()
        return self._sink.take()

    def _mux(self, frame) -> None:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)


def pcm16(audio: np.ndarray) -> bytes:
    """As FFmpeg converts float to s16 (round(x * 32768), clipped): `pcm` holds the samples `wav` does."""
    return np.clip(np.rint(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()
