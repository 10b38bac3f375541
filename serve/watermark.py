"""An imperceptible watermark on the server's speech (AudioSeal), and `python -m serve.watermark detect FILE`.

AudioSeal (facebookresearch/audioseal, MIT licence, code and weights) pairs a generator, which turns 16 kHz audio
into a small residual carrying a 16-bit message, with a detector that scores every 1/16000 s of a clip and
survives compression and editing. Here the 24 kHz speech is resampled to 16 kHz (soxr HQ), the generator's
residual is resampled back and added to the untouched 24 kHz samples: the residual is all that changes.

Models (`Watermarker.load(spec)`):
- `audioseal`: the package's `audioseal_wm_16bits` / `audioseal_detector_16bits` cards, their weights from the
  Hub repository facebook/audioseal (`generator_base.pth`, `detector_base.pth`) through the Hub cache, so
  `HF_HUB_OFFLINE=1` works once they are there; `audioseal-streaming`: its causal `*_streaming` cards;
- a directory holding those files (`huggingface-cli download facebook/audioseal --local-dir DIR`);
- `random-init:seed=N`: the same architectures with seeded random weights, for offline runs and tests, as the
  codec's and the phoneme judge's `random-init`. Its generator's last layer is scaled down (RANDOM_GAIN) so a
  smoke-run server still speaks audibly; its marks mean nothing and `detect` refuses a verdict (`NoVerdict`).
Checkpoints are read with torch's restricted unpickler (tensors and OmegaConf's config records only), as
`csm_train.checkpoint` reads ours: AudioSeal's own loader would unpickle them whole.

Streaming. AudioSeal 0.2's `streaming()` needs the causal checkpoint and, in its vendored moshi modules, carries
no convolution history from one call to the next (its chunks differ from the whole clip), so `WatermarkStream`
runs the ordinary model over windows instead. Each run covers CONTEXT_SECONDS already sent (the LSTMs' memory
and the convolutions' left reach), the new samples, and a lookahead it holds back: the non-causal
convolutions see 2453 samples ahead (measured with an impulse, tests/test_watermark.py), so 2560 (160 ms) are
held; the causal cards hold none. Windows start on the model's 320-sample hop, so frames fall where the whole
clip's do. Output trails input by the lookahead plus the two resamplers' 21 ms each: ~205 ms (`latency`, 220 at
most measured); the streamed samples equal `apply(whole clip)` within STREAM_TOLERANCE (2.5e-6 measured). Each
run re-reads the context: for the server's 400 ms pieces a stream costs ~3-4x the whole clip's compute.

AudioSeal's moshi modules `torch.compile` their forward on first call (a minute on a CPU, again for every new
length): `Watermarker.load` switches compilation off for them.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import typing
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch

from csm_train.checkpoint import unpickling_reason
from data_pipeline.device import resolve_device
from data_pipeline.shards import MIMI_SAMPLE_RATE

SAMPLE_RATE = 16000  # AudioSeal's
HOP = 320  # the generator's frame: 8 * 5 * 4 * 2 samples
LOOKAHEAD = 2560  # the non-causal convolutions' right reach (2453) rounded up to the hop: 160 ms
RESAMPLERS_DELAY = 0.0426  # soxr HQ 24 → 16 kHz and back, 21.3 ms each (measured)
CONTEXT_SECONDS = 0.5  # what a stream window re-reads before its new samples
STREAM_TOLERANCE = 1e-4  # max |stream - whole clip| at 24 kHz, for a residual of RMS ~1e-3
RANDOM_GAIN = 0.01  # random-init: the generator's residual scaled to ~1e-3 RMS, ~35 dB under speech
RANDOM_INIT = "random-init"
HUB_REPO = "facebook/audioseal"
CARDS = {  # spec → (generator card, detector card); the cards name the Hub files
    "audioseal": ("audioseal_wm_16bits", "audioseal_detector_16bits"),
    "audioseal-streaming": ("audioseal_wm_streaming", "audioseal_detector_streaming"),
}


def _no_compile() -> None:
    from audioseal.libs.moshi.utils import compile as moshi_compile

    # The flag its `no_compile()` context sets, set for good: a context entered and left by concurrent streams
    # could switch compilation back on under another's call.
    moshi_compile._compile_disabled = True


class WatermarkError(RuntimeError):
    """The watermark model cannot be loaded."""


class NoVerdict(RuntimeError):
    """The detector has random weights: whatever it scores means nothing."""


@dataclass(frozen=True)
class Verdict:
    probability: float  # the share of 1/16000 s frames the detector scores as watermarked
    message: str  # the decoded bits, e.g. "0000000000101010" (meaningful only when watermarked)
    watermarked: bool  # probability > the threshold


def _card(name: str) -> dict:
    from audioseal.loader import load_local_model_config
    from omegaconf import OmegaConf

    return OmegaConf.to_container(load_local_model_config(name))


def _read_checkpoint(path: Path) -> dict:
    """An AudioSeal `.pth` with the restricted unpickler: tensors, containers and the OmegaConf config it keeps
    under `xp.cfg`; anything else is refused."""
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    records = [DictConfig, ListConfig, ContainerMetadata, Metadata, typing.Any, dict, list, int, defaultdict]
    records += [getattr(nodes, name) for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode")]
    try:
        with torch.serialization.safe_globals(records):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = unpickling_reason(error)
        raise WatermarkError(f"{path} holds objects other than tensors and its config ({reason}): not read") from None


def _checkpoint_file(source: str, card: dict) -> Path:
    """The card's file (its URL's name) in directory `source`, or from the Hub through its cache."""
    name = card["checkpoint"].rsplit("/", 1)[-1]
    if source in CARDS:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(HUB_REPO, name))
        except Exception as error:  # offline, gated, not cached: one message saying what to do
            raise WatermarkError(
                f"cannot fetch {HUB_REPO}/{name} ({type(error).__name__}: {error}). Without the Hub, download "
                f"it elsewhere (huggingface-cli download {HUB_REPO} --local-dir DIR) and pass DIR as the model"
            ) from None
    path = Path(source) / name
    if not path.is_file():
        raise WatermarkError(f"{path}: no such file (a directory holds {HUB_REPO}'s {name})")
    return path


def _build(kind: str, card_name: str, source: str, seed: int | None) -> torch.nn.Module:
    """AudioSeal's generator or detector from its card, with the weights of `source` or seeded random ones (as
    `AudioSeal.load_generator` / `load_detector` build them)."""
    from audioseal.builder import AudioSealDetectorConfig, AudioSealWMConfig, create_detector, create_generator
    from audioseal.loader import AudioSeal, convert_state_dict_for_scriptable_model, load_state_dict

    config = _card(card_name)
    schema, create = {
        "generator": (AudioSealWMConfig, create_generator),
        "detector": (AudioSealDetectorConfig, create_detector),
    }[kind]
    if seed is not None:
        config.pop("checkpoint")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed if kind == "generator" else seed + 1)
            model = create(AudioSeal.parse_config(config, schema))
        if kind == "generator":
            last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
            with torch.no_grad():
                last.weight.mul_(RANDOM_GAIN), last.bias.mul_(RANDOM_GAIN)
        return model.eval()
    state = _read_checkpoint(_checkpoint_file(source, config))
    config.pop("checkpoint")
    if "xp.cfg" in state:  # the card wins, as in AudioSeal.parse_model
        config = {**state["xp.cfg"], **config}
    state = state["best_state"]["model"] if "best_state" in state else state.get("model", state)
    model = create(AudioSeal.parse_config(config, schema))
    load_state_dict(model, convert_state_dict_for_scriptable_model(state))
    return model.eval()


def _resample(samples: np.ndarray, rate: int, to: int) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"mono samples expected, got shape {samples.shape}")
    return samples if rate == to else soxr.resample(samples, rate, to, quality="HQ").astype(np.float32)


def _fit(samples: np.ndarray, length: int) -> np.ndarray:
    """`samples` cut or zero-padded to `length` (a resampled length can be off by one)."""
    return np.pad(samples[:length], (0, max(0, length - len(samples))))


class Watermarker:
    """A generator and its detector, the message the generator writes, and the streams the server feeds."""

    def __init__(self, generator, detector, spec: str, random: bool, message: int, device: str, causal: bool):
        self.generator, self.detector, self.spec, self.random = generator, detector, spec, random
        self.device = torch.device(device)
        self.nbits = generator.msg_processor.nbits
        if not 0 <= message < 2**self.nbits:
            raise ValueError(f"message {message}: {self.nbits} bits hold 0 to {2**self.nbits - 1}")
        self.message = format(message, f"0{self.nbits}b")
        self._message = torch.tensor([[int(b) for b in self.message]], device=self.device)
        self.lookahead = 0 if causal else LOOKAHEAD
        self.latency = self.lookahead / SAMPLE_RATE + RESAMPLERS_DELAY  # seconds a stream's output trails

    @classmethod
    def load(cls, spec: str = "audioseal", device: str = "auto", message: int = 0) -> Watermarker:
        """`spec`: `audioseal`, `audioseal-streaming`, a directory holding facebook/audioseal's files, or
        `random-init:seed=N` (see the module's docstring); `message`: the integer the marks carry."""
        _no_compile()
        device = resolve_device(device)
        seed = None
        if spec.startswith(RANDOM_INIT):
            seed = int(spec.partition("seed=")[2] or 0)
            spec, cards = f"{RANDOM_INIT}:seed={seed}", CARDS["audioseal"]
        elif spec in CARDS:
            cards = CARDS[spec]
        elif Path(spec).is_dir():
            streaming = not (Path(spec) / "generator_base.pth").exists()
            cards = CARDS["audioseal-streaming" if streaming else "audioseal"]
        else:
            raise WatermarkError(f"watermark model {spec!r}: use audioseal, audioseal-streaming, a directory, or "
                                 f"{RANDOM_INIT}:seed=N")  # fmt: skip
        generator = _build("generator", cards[0], spec, seed).to(device)
        detector = _build("detector", cards[1], spec, seed).to(device)
        causal = bool(_card(cards[0])["seanet"]["causal"])
        return cls(generator, detector, spec, seed is not None, message, device, causal)

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.random:
            return (f"outputs are watermarked by AudioSeal's architecture with random weights ({self.spec}): the "
                    f"marks mean nothing and detection refuses a verdict")  # fmt: skip
        return (f"outputs are watermarked with AudioSeal ({self.spec}, {self.nbits}-bit message {self.message}; "
                f"streamed audio trails by ~{self.latency * 1000:.0f} ms)")  # fmt: skip

    @torch.inference_mode()
    def residual(self, samples: np.ndarray) -> np.ndarray:
        """The generator's residual for 16 kHz samples (the whole clip as one window)."""
        x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).to(self.device).view(1, 1, -1)
        return self.generator.get_watermark(x, message=self._message)[0, 0].float().cpu().numpy()

    def apply(self, samples: np.ndarray, rate: int = MIMI_SAMPLE_RATE) -> np.ndarray:
        """The whole clip watermarked: `samples` plus the residual brought back to `rate`."""
        samples = np.asarray(samples, dtype=np.float32)
        residual = self.residual(_resample(samples, rate, SAMPLE_RATE)) if len(samples) else samples
        return samples + _fit(_resample(residual, SAMPLE_RATE, rate), len(samples))

    def stream(self, rate: int = MIMI_SAMPLE_RATE) -> WatermarkStream:
        return WatermarkStream(self, rate)

    @torch.inference_mode()
    def _score(self, samples: np.ndarray, rate: int) -> tuple[float, str]:
        """The detector's watermarked share and decoded bits, with no verdict (random weights included)."""
        x = torch.from_numpy(_resample(samples, rate, SAMPLE_RATE)).to(self.device).view(1, 1, -1)
        probability, bits = self.detector.detect_watermark(x)
        return float(probability[0]), "".join(str(int(b)) for b in bits[0])

    def detect(self, samples: np.ndarray, rate: int, threshold: float = 0.5) -> Verdict:
        """Whether mono `samples` at `rate` carry an AudioSeal mark. Raises NoVerdict for random weights."""
        probability, message = self._score(samples, rate)
        if self.random:
            raise NoVerdict(
                f"the watermark detector {self.spec} is a randomly initialised model: its verdicts mean nothing. "
                f"Download {HUB_REPO} (huggingface-cli download {HUB_REPO} --local-dir DIR) and pass DIR as the "
                f"model"
            )
        return Verdict(probability, message, probability > threshold)


class WatermarkStream:
    """One response's samples watermarked as they come (see the module's docstring): `feed` returns what is
    ready (`latency` behind), `close` the rest; together they are `apply(everything fed)`."""

    def __init__(self, watermarker: Watermarker, rate: int):
        self._wm, self._rate = watermarker, rate
        self._down = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self._up = soxr.ResampleStream(SAMPLE_RATE, rate, 1, dtype="float32", quality="HQ")
        self._x16 = np.zeros(0, np.float32)  # 16 kHz input from sample `_start` (a hop multiple) on
        self._start = self._done = 0  # 16 kHz residual samples made so far: `_done`
        self._waiting = np.zeros(0, np.float32)  # input samples whose residual is not back yet
        self._back = np.zeros(0, np.float32)  # residual at `rate` ahead of them (a resampler's rounding)
        self._context = int(CONTEXT_SECONDS * SAMPLE_RATE) // HOP * HOP

    def feed(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32)
        self._take(samples, self._down.resample_chunk(samples))
        end = self._start + len(self._x16) - self._wm.lookahead
        if end - self._done < HOP:  # too little to be worth a window
            return np.zeros(0, np.float32)
        return self._out(self._up.resample_chunk(self._residual(end)))

    def close(self) -> np.ndarray:
        self._take(np.zeros(0, np.float32), self._down.resample_chunk(np.zeros(0, np.float32), last=True))
        residual = self._residual(self._start + len(self._x16))
        return self._out(self._up.resample_chunk(residual, last=True), last=True)

    def _take(self, samples: np.ndarray, down: np.ndarray) -> None:
        self._waiting = np.concatenate([self._waiting, samples])
        self._x16 = np.concatenate([self._x16, down])

    def _residual(self, end: int) -> np.ndarray:
        """The residual for 16 kHz samples `_done` to `end`, from one window reaching every sample received."""
        if end <= self._done:
            return np.zeros(0, np.float32)
        window = self._wm.residual(self._x16) if len(self._x16) else self._x16
        part = window[self._done - self._start : end - self._start]
        self._done = end
        start = max(0, self._done - self._context) // HOP * HOP  # the next window's first sample
        self._x16, self._start = self._x16[start - self._start :], start
        return part

    def _out(self, residual: np.ndarray, last: bool = False) -> np.ndarray:
        self._back = np.concatenate([self._back, residual])
        n = len(self._waiting) if last else min(len(self._back), len(self._waiting))
        out = self._waiting[:n] + _fit(self._back, n)
        self._waiting, self._back = self._waiting[n:], self._back[n:]
        return out


def main(argv: list[str] | None = None) -> int:
    import soundfile as sf

    from data_pipeline.audio import AudioError, decode

    parser = argparse.ArgumentParser(prog="python -m serve.watermark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="audioseal", help="audioseal (default), audioseal-streaming, a "
                        f"directory holding {HUB_REPO}'s files, or {RANDOM_INIT}:seed=N")  # fmt: skip
    parser.add_argument("--device", default="auto")
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="exit 0: watermarked, 1: not, 2: no verdict (an error)")
    detect.add_argument("file", type=Path, help="any audio file FFmpeg reads")
    detect.add_argument("--threshold", type=float, default=0.5, help="watermarked share above which it is marked")
    embed = commands.add_parser("embed", help="write IN watermarked to OUT (24 kHz mono, format from its suffix)")
    embed.add_argument("input", type=Path)
    embed.add_argument("output", type=Path)
    embed.add_argument("--message", type=int, default=0, help="the integer the mark carries (16 bits)")
    args = parser.parse_args(argv)
    try:
        watermarker = Watermarker.load(args.model, args.device, getattr(args, "message", 0))
        if args.command == "embed":
            audio = watermarker.apply(decode(args.input, MIMI_SAMPLE_RATE))
            sf.write(args.output, audio, MIMI_SAMPLE_RATE)
            print(f"{args.output}: {len(audio) / MIMI_SAMPLE_RATE:.2f} s, message {watermarker.message}")
            return 0
        verdict = watermarker.detect(decode(args.file, SAMPLE_RATE), SAMPLE_RATE, args.threshold)
    except (WatermarkError, NoVerdict, AudioError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = "watermarked" if verdict.watermarked else "not watermarked"
    print(f"{args.file}: {state} (probability {verdict.probability:.3f}, message {verdict.message})")
    return 0 if verdict.watermarked else 1


if __name__ == "__main__":
    sys.exit(main())
