"""A small multi-speaker conversational English corpus, synthesised offline with espeak-ng, with exact ground
truth: who said what, and when to the sample. The pipeline's tests and the README quickstart feed it through
VAD → ASR → diarization → Mimi and score the result against `truth/`.

    python -m data_pipeline.demo_corpus out=DIR [num_conversations=8] [seed=0] [broken=true]

writes `DIR/audio/` (the pipeline's input: conversations in several formats, plus planted broken files) and
`DIR/truth/` (`conv_NNNN.json` and `.rttm` per conversation, `broken.json`: each broken file's expected
failure reason). Each conversation has 2–3 speakers (distinct voices, at 150–165 words a minute) and 4–8
alternating turns, 0.3–0.9 s apart. A seed gives the same bytes in every file: espeak-ng, soxr and
libsndfile are deterministic, except for the random Ogg stream serial libsndfile picks, which is fixed here.

Voices were chosen by measurement, from ~80 candidates (`espeak-ng --voices=en` × the `!v` variants): the
six most mutually distinct among those Whisper tiny.en transcribes well. resemblyzer cosine similarity
between utterance embeddings, mean over pairs of different sentences (40 sentences per voice, `-s 155`): the
diagonal (same voice) clearly beats the rest, which is what lets the diarizer separate speakers.

                edward  us+m3  us+f3  Hugo  steph  quincy
    en+edward    0.90   0.61   0.51   0.64   0.51   0.58
    en-us+m3            0.85   0.56   0.57   0.55   0.59
    en-us+f3                   0.84   0.47   0.57   0.50
    en+Hugo                           0.87   0.64   0.61
    en+steph                                 0.89   0.54
    en+quincy                                       0.87

tiny.en word error rate on all 40 sentences, in ~30 s chunks, per voice: 0.0, 0.3, 0.6, 0.0, 1.8, 0.6 %.
Variants sharing a formant model sound alike to resemblyzer (en+klatt/klatt4/edward 0.81, en-us+m1/m3 0.85,
en+steph/steph2 0.87), and many transcribe poorly (en+zac 12 %, en-gb-x-rp+f4 13 %, en+kaukovalta 37 %).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import soundfile as sf
import soxr
from omegaconf import DictConfig
from tqdm import tqdm

from data_pipeline.shards import MIMI_SAMPLE_RATE

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "pipeline")
SAMPLE_RATE = MIMI_SAMPLE_RATE  # conversations are assembled at 24 kHz; truth times are in seconds
VOICES = ("en+edward", "en-us+m3", "en-us+f3", "en+Hugo", "en+steph", "en+quincy")
SPEAKERS = "ABC"
# Plain everyday sentences, 6–12 common words, no numbers or abbreviations: what tiny.en transcribes well.
# Phrases it often misheard from espeak ("might rain" → "my train", "stories at parties" → "story that part
# is", "tonight" → "to night") were replaced.
SENTENCES = (
    "I sent you a long message this morning.",
    "I think we should leave the house soon.",
    "The coffee shop on the corner is closed this week.",
    "Can you help me move these boxes to the car?",
    "I was thinking about making pasta for dinner.",
    "That sounds like a really good idea.",
    "We can take the train instead of driving.",
    "My parents are coming to visit next week.",
    "Have you seen the new movie your friends are talking about?",
    "I left my coat on the kitchen table again.",
    "It is supposed to be sunny all weekend.",
    "Let me know when you are ready to go.",
    "I really liked the present you gave me.",
    "Please turn the music off in the kitchen.",
    "We need to get some food on the way home.",
    "The meeting went better than I expected.",
    "Have you seen my phone anywhere?",
    "Do you want to go for a walk after lunch?",
    "The flowers in the garden look beautiful.",
    "I will call you when I get to the station.",
    "She told me the test was not very hard.",
    "Let us clean the house before our friends come over.",
    "They say it will rain later in the afternoon.",
    "Thank you so much for your help.",
    "The train was late again this morning.",
    "When does the shop close in the evening?",
    "I forgot to call my mother yesterday.",
    "Maybe we can watch a movie at home later.",
    "The children are out in the park with their friends.",
    "I need to finish this work before dinner.",
    "Your new shoes look really nice.",
    "We could try the new restaurant in town.",
    "He always makes us laugh at dinner.",
    "I can pick up the kids from school today.",
    "The dog has been sleeping on the couch all day.",
    "We should go to the beach this summer.",
    "I think I left the lights on at home.",
    "Do you remember where we parked the car?",
    "It was really good to see you again.",
    "I will make some tea if you want some.",
)
TURN_PEAK = 0.5  # every turn is scaled to this peak: equal levels, no clipping after resampling
TRIM_DB = -40.0  # a turn's voiced extent: from the first to the last sample this far below its peak


@dataclass(frozen=True)
class Format:
    suffix: str
    container: str  # soundfile's `format`
    subtype: str
    sample_rate: int
    channels: int


DEFAULT_FORMAT = Format(".wav", "WAV", "PCM_16", SAMPLE_RATE, 1)
# Conversation i (mod 8) is written in another format, so the pipeline's ingest meets several. Opus is 48 kHz only.
OTHER_FORMATS = {
    1: Format(".flac", "FLAC", "PCM_16", 16_000, 1),
    2: Format(".wav", "WAV", "PCM_16", 44_100, 2),
    3: Format(".opus", "OGG", "OPUS", 48_000, 1),
}
# Planted broken files and the reason the pipeline fails each with (`AudioError.reason`).
BROKEN = {
    "broken_empty.wav": "undecodable",  # 0 bytes: libsndfile finds no header
    "broken_corrupt.flac": "undecodable",  # random bytes
    "broken_short.wav": "too_short",  # 0.2 s of speech, below the pipeline's min_seconds
    "broken_silence.wav": "no_speech",  # 8 s of faint white noise: decodes, has loudness, no speech for the VAD
}


def require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "espeak-ng is not on PATH; the demo corpus is synthesised with it. "
            "Install it: `apt-get install espeak-ng` (macOS: `brew install espeak-ng`)."
        )


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """One turn: float32 at 24 kHz, trimmed to its voiced extent (espeak pads with silence), at TURN_PEAK."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True
    ).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    voiced = np.flatnonzero(np.abs(audio) > np.abs(audio).max() * 10 ** (TRIM_DB / 20))
    audio = audio[voiced[0] : voiced[-1] + 1]
    return (audio * (TURN_PEAK / np.abs(audio).max())).astype(np.float32)


def plan_conversation(seed: int, index: int) -> dict:
    """Speakers, voices, lines and pauses of conversation `index`, drawn from its own stream of `seed` (so it
    is the same whatever `num_conversations` is). Every speaker talks; no speaker has two turns in a row."""
    rng = np.random.default_rng([seed, 0, index])
    num_speakers, num_turns = int(rng.integers(2, 4)), int(rng.integers(4, 9))
    speakers = list(SPEAKERS[:num_speakers])
    voices = dict(zip(speakers, rng.choice(VOICES, num_speakers, replace=False).tolist(), strict=True))
    order = rng.permutation(speakers).tolist()
    while len(order) < num_turns:
        order.append(str(rng.choice([s for s in speakers if s != order[-1]])))
    lines = rng.choice(len(SENTENCES), num_turns, replace=False)
    return {
        "voices": voices,
        "turns": [
            {"speaker": s, "voice": voices[s], "text": SENTENCES[i], "speed": int(rng.integers(150, 166))}
            for s, i in zip(order, lines, strict=True)
        ],
        "pauses": rng.uniform(0.3, 0.9, num_turns - 1).tolist(),
        "lead": float(rng.uniform(0.2, 0.5)),
        "trail": float(rng.uniform(0.2, 0.5)),
    }


def assemble(plan: dict, clips: list[np.ndarray]) -> tuple[np.ndarray, list[dict]]:
    """The conversation's 24 kHz audio and its turns with start/end in seconds, on sample boundaries."""
    silences = [plan["lead"], *plan["pauses"], plan["trail"]]
    pieces, turns, cursor = [], [], 0
    for turn, clip, silence in zip(plan["turns"], clips, silences[:-1], strict=True):
        gap = np.zeros(round(silence * SAMPLE_RATE), np.float32)
        pieces += [gap, clip]
        cursor += len(gap)
        turns.append(
            {
                "speaker": turn["speaker"],
                "voice": turn["voice"],
                "text": turn["text"],
                "start": cursor / SAMPLE_RATE,
                "end": (cursor + len(clip)) / SAMPLE_RATE,
            }
        )
        cursor += len(clip)
    pieces.append(np.zeros(round(silences[-1] * SAMPLE_RATE), np.float32))
    return np.concatenate(pieces), turns


def encode(audio: np.ndarray, fmt: Format) -> bytes:
    """24 kHz mono `audio` as a file in `fmt`: resampled, and for stereo the right channel 4 dB quieter."""
    if fmt.sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, SAMPLE_RATE, fmt.sample_rate, quality="HQ")
    if fmt.channels == 2:
        audio = np.stack([audio, audio * 0.63], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, audio, fmt.sample_rate, format=fmt.container, subtype=fmt.subtype)
    return fixed_ogg_serial(buffer.getvalue()) if fmt.container == "OGG" else buffer.getvalue()


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7 if r & 0x80000000 else r << 1) & 0xFFFFFFFF
        table.append(r)
    return table


OGG_CRC_TABLE = _ogg_crc_table()


def fixed_ogg_serial(data: bytes, serial: int = 1) -> bytes:
    """libsndfile gives each Ogg stream a random serial number, so the same audio encodes to different bytes.
    Set it to `serial` on every page and recompute the pages' checksums (Ogg's CRC-32, polynomial 0x04C11DB7)."""
    out, pos = bytearray(data), 0
    while pos < len(out):
        if out[pos : pos + 4] != b"OggS":
            raise ValueError(f"no Ogg page at byte {pos}")
        segments = out[pos + 26]
        end = pos + 27 + segments + sum(out[pos + 27 : pos + 27 + segments])
        out[pos + 14 : pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22 : pos + 26] = bytes(4)  # the checksum is computed with its own field zeroed
        crc = 0
        for byte in out[pos:end]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ OGG_CRC_TABLE[(crc >> 24) ^ byte]
        out[pos + 22 : pos + 26] = crc.to_bytes(4, "little")
        pos = end
    return bytes(out)


def rttm(name: str, turns: list[dict]) -> str:
    return "".join(
        f"SPEAKER {name} 1 {t['start']:.3f} {t['end'] - t['start']:.3f} <NA> <NA> {t['speaker']} <NA> <NA>\n"
        for t in turns
    )


def write_broken(audio_dir: Path, seed: int) -> dict[str, str]:
    """The planted broken files (BROKEN) and their expected failure reasons."""
    rng = np.random.default_rng([seed, 1])  # conversations draw from [seed, 0, index]
    speech = speak(SENTENCES[0], VOICES[0], 155)
    noise = rng.standard_normal(8 * SAMPLE_RATE) * 10 ** (-60 / 20)  # -60 dBFS: above the loudness gate
    contents = {
        "broken_empty.wav": b"",
        "broken_corrupt.flac": rng.bytes(16_384),
        "broken_short.wav": encode(speech[: SAMPLE_RATE // 5], DEFAULT_FORMAT),
        "broken_silence.wav": encode(noise.astype(np.float32), DEFAULT_FORMAT),
    }
    for name, data in contents.items():
        (audio_dir / name).write_bytes(data)
    return dict(BROKEN)


def write_demo_corpus(out_dir: str | Path, num_conversations: int = 8, seed: int = 0, broken: bool = True) -> dict:
    """Synthesise the corpus into `out_dir` (audio/ and truth/); returns a summary."""
    require_espeak()
    out = Path(out_dir)
    audio_dir, truth_dir = out / "audio", out / "truth"
    audio_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*audio_dir.glob("conv_*"), *audio_dir.glob("broken_*"), *truth_dir.glob("*")]:
        stale.unlink()  # an earlier build's: a smaller or other corpus must not inherit its files
    plans = [plan_conversation(seed, i) for i in range(num_conversations)]
    progress = tqdm(total=sum(len(p["turns"]) for p in plans), desc="synthesising turns", unit="turn")
    seconds, speech_seconds, voices = 0.0, 0.0, set()
    for i, plan in enumerate(plans):
        name, fmt = f"conv_{i:04d}", OTHER_FORMATS.get(i % 8, DEFAULT_FORMAT)
        clips = []
        for turn in plan["turns"]:
            clips.append(speak(turn["text"], turn["voice"], turn["speed"]))
            progress.update()
        audio, turns = assemble(plan, clips)
        (audio_dir / f"{name}{fmt.suffix}").write_bytes(encode(audio, fmt))
        truth = {
            "audio": f"{name}{fmt.suffix}",
            "duration": len(audio) / SAMPLE_RATE,
            "voices": plan["voices"],
            "turns": turns,
        }
        (truth_dir / f"{name}.json").write_text(json.dumps(truth, indent=2) + "\n")
        (truth_dir / f"{name}.rttm").write_text(rttm(name, turns))
        seconds += truth["duration"]
        speech_seconds += sum(t["end"] - t["start"] for t in turns)
        voices.update(plan["voices"].values())
    progress.close()
    broken_files = write_broken(audio_dir, seed) if broken else {}
    (truth_dir / "broken.json").write_text(json.dumps(broken_files, indent=2) + "\n")
    return {
        "out_dir": str(out),
        "conversations": num_conversations,
        "turns": sum(len(p["turns"]) for p in plans),
        "speakers": sum(len(p["voices"]) for p in plans),
        "voices": sorted(voices),
        "seconds": round(seconds, 2),
        "speech_seconds": round(speech_seconds, 2),
        "broken": broken_files,
    }


@hydra.main(config_path=CONFIG_DIR, config_name="demo_corpus", version_base=None)
def main(cfg: DictConfig) -> None:
    s = write_demo_corpus(cfg.out, cfg.num_conversations, cfg.seed, cfg.broken)
    print(
        f"{s['conversations']} conversations, {s['turns']} turns, {s['seconds']:.1f} s of audio"
        f" ({s['speech_seconds']:.1f} s speech) in {s['out_dir']}/audio; truth in {s['out_dir']}/truth\n"
        f"voices: {', '.join(s['voices'])}\n"
        f"broken files: {', '.join(f'{k} ({v})' for k, v in s['broken'].items()) or 'none'}"
    )


if __name__ == "__main__":
    main()
