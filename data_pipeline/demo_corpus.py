"""A small multi-speaker conversational English corpus, synthesised offline with espeak-ng, with exact ground
truth: who said what, and when to the sample. The pipeline's tests and the README quickstart feed it through
VAD → ASR → diarization → Mimi and score the result against `truth/`.

    python -m data_pipeline.demo_corpus out=DIR [num_conversations=8] [seed=0] [broken=true] [style=hard]

writes `DIR/audio/` (the pipeline's input: conversations in several formats, plus planted broken files) and
`DIR/truth/` (`conv_NNNN.json` and `.rttm` per conversation, `broken.json`: each broken file's expected
failure reason). By default each conversation has 2–3 speakers (distinct voices, at 150–165 words a minute)
and 4–8 alternating turns, 0.3–0.9 s apart, at one level, studio-clean: easy for every stage.

`style=hard` (`HARD`, a `Style` of knobs) has what real conversations have and the easy one lacks: 2–4
speakers, 6–10 sentence turns of which ~30 % start 0.2–1.5 s before the previous one ends and ~30 % follow
within 0.3 s, short back-channels ("mm-hmm", "right", "okay", …) from a listener, half of them said over the
current turn, each speaker at their own level (spread over 12 dB), pink background noise at 15–30 dB SNR and,
on half the recordings, a telephone channel (300–3400 Hz, through 8 kHz). `long_seconds` makes conversation 0
run on to about that long, for long-input tests. The truth stays exact: every turn, overlapped or not, is its
own truth turn with the times its audio has (turns are listed by start; the RTTM has the overlaps), and
`channel` in the truth says each recording's levels, SNR and whether it went through the telephone.

A seed gives the same bytes in every file: espeak-ng, soxr and libsndfile are deterministic, except for the
random Ogg stream serial libsndfile picks, which is fixed here.

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
from dataclasses import dataclass, replace
from pathlib import Path

import hydra
import numpy as np
import soundfile as sf
import soxr
from omegaconf import DictConfig
from scipy import signal
from tqdm import tqdm

from data_pipeline.shards import MIMI_SAMPLE_RATE

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "pipeline")
VOICES = ("en+edward", "en-us+m3", "en-us+f3", "en+Hugo", "en+steph", "en+quincy")
SPEAKERS = "ABCD"
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
# Back-channels: truth text → what espeak-ng is given. tiny.en hears espeak's "mm hmm" as "and then them";
# as phonemes it comes out as "Mm-hmm" (or nothing). Whisper's normaliser drops "mm-hmm" from both sides.
# "Yeah" is left out: tiny.en hears espeak's as "Yes" for four of the six voices.
BACKCHANNELS = {
    "Mm-hmm.": "[[m'hm]]",
    "Uh-huh.": "uh-huh.",
    "Right.": "right",
    "Okay.": "okay",
    "Sure.": "sure",
    "Yes.": "yes",
}
MIN_SELF_GAP = 0.2  # seconds: a speaker's next turn starts at least this long after their last one ends
SECONDS_PER_TURN = 2.5  # a hard-style sentence turn with its pause, on average: long_seconds → turns
TELEPHONE_RATE = 8_000
TELEPHONE_BAND = signal.butter(4, (300, 3400), btype="bandpass", fs=TELEPHONE_RATE, output="sos")
PEAK_LIMIT = 0.9  # a mix louder than this (overlaps, noise) is scaled down as a whole


@dataclass(frozen=True)
class Style:
    """What a corpus's conversations are like. The defaults are the default corpus: 2–3 speakers taking turns
    with clear pauses, at one level, studio-clean. `HARD` adds what real conversations have."""

    speakers: tuple[int, int] = (2, 3)  # per conversation, both ends included
    turns: tuple[int, int] = (4, 8)  # sentence turns per conversation, both ends included
    pause: tuple[float, float] = (0.3, 0.9)  # seconds from one turn's end to the next's start
    overlapped: float = 0.0  # share of sentence turns that start before the previous one ends ...
    overlap: tuple[float, float] = (0.2, 1.5)  # ... by this many seconds (at most half the previous turn)
    quick: float = 0.0  # share of sentence turns that follow after a short gap ...
    quick_gap: tuple[float, float] = (0.0, 0.3)  # ... of this many seconds
    backchannels: float = 0.0  # chance that a listener answers a sentence turn with a back-channel ...
    during: float = 0.5  # ... said over it (the others fill the pause after it)
    loudness_db: float = 0.0  # speakers' levels spread over this many dB, each speaker at one level
    telephone: float = 0.0  # share of recordings sent through a telephone channel (300–3400 Hz, 8 kHz)
    snr_db: tuple[float, float] | None = None  # pink background noise at a speech-to-noise ratio in this range
    long_seconds: float = 0.0  # > 0: conversation 0 runs on, with more sentence turns, to about this long


HARD = Style(
    speakers=(2, 4),
    turns=(6, 10),
    overlapped=0.3,
    quick=0.3,
    backchannels=0.35,
    loudness_db=12.0,
    telephone=0.5,
    snr_db=(15.0, 30.0),
)
STYLES = {"default": Style(), "hard": HARD}


@dataclass(frozen=True)
class Format:
    suffix: str
    container: str  # soundfile's `format`
    subtype: str
    sample_rate: int
    channels: int


DEFAULT_FORMAT = Format(".wav", "WAV", "PCM_16", MIMI_SAMPLE_RATE, 1)
# Conversation i (mod 8) is written in another format, so the pipeline's ingest meets several. Opus is 48 kHz only.
OTHER_FORMATS = {
    1: Format(".flac", "FLAC", "PCM_16", 16_000, 1),
    2: Format(".wav", "WAV", "PCM_16", 44_100, 2),
    3: Format(".opus", "OGG", "OPUS", 48_000, 1),
}
# Planted broken files and the reason the pipeline fails each with (`AudioError.reason`).
BROKEN = {
    "broken_empty.wav": "empty",  # 0 bytes
    "broken_corrupt.flac": "not_audio",  # random bytes: FFmpeg's flac reader finds no audio in them
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
    audio = soxr.resample(audio, rate, MIMI_SAMPLE_RATE, quality="HQ")
    voiced = np.flatnonzero(np.abs(audio) > np.abs(audio).max() * 10 ** (TRIM_DB / 20))
    audio = audio[voiced[0] : voiced[-1] + 1]
    return (audio * (TURN_PEAK / np.abs(audio).max())).astype(np.float32)


def plan_conversation(seed: int, index: int, style: Style = Style()) -> dict:
    """Speakers, voices, lines, pauses and channel of conversation `index`, drawn from its own streams of `seed`
    (so it is the same whatever `num_conversations` is). Every speaker talks; no speaker has two sentence turns
    in a row. The default style draws only from `[seed, 0, index]`; what other styles add (overlaps,
    back-channels, levels, channel) comes from `[seed, 2, index]`, so the default corpus keeps its bytes."""
    rng, extra = np.random.default_rng([seed, 0, index]), np.random.default_rng([seed, 2, index])
    num_speakers = int(rng.integers(style.speakers[0], style.speakers[1] + 1))
    num_turns = int(rng.integers(style.turns[0], style.turns[1] + 1))
    if index == 0 and style.long_seconds:
        num_turns = max(num_turns, round(style.long_seconds / SECONDS_PER_TURN))
    speakers = list(SPEAKERS[:num_speakers])
    voices = dict(zip(speakers, rng.choice(VOICES, num_speakers, replace=False).tolist(), strict=True))
    order = rng.permutation(speakers).tolist()
    while len(order) < num_turns:
        order.append(str(rng.choice([s for s in speakers if s != order[-1]])))
    lines = rng.choice(len(SENTENCES), num_turns, replace=num_turns > len(SENTENCES))
    sentences = [
        {"speaker": s, "voice": voices[s], "text": SENTENCES[i], "speed": int(rng.integers(150, 166))}
        for s, i in zip(order, lines, strict=True)
    ]
    pauses = rng.uniform(*style.pause, num_turns - 1).tolist()
    lead, trail = float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.2, 0.5))

    turns, after_backchannel = [], False  # whether a back-channel filled the pause before this turn
    for i, turn in enumerate(sentences):
        gap, kind = (lead, 1.0) if i == 0 else (pauses[i - 1], extra.random())
        if kind < style.overlapped and not after_backchannel:  # a back-channel is too short to talk over
            gap = -float(extra.uniform(*style.overlap))
        elif kind < style.overlapped + style.quick:
            gap = float(extra.uniform(*style.quick_gap))
        turns.append({**turn, "gap": gap})
        after_backchannel = False
        if extra.random() < style.backchannels:
            listeners = [s for s in speakers if s != turn["speaker"]]
            nxt = order[i + 1] if i + 1 < num_turns else None
            speaker = str(extra.choice([s for s in listeners if s != nxt] or listeners))
            text, speed = str(extra.choice(list(BACKCHANNELS))), int(extra.integers(150, 166))
            if extra.random() < style.during:
                when = {"within": float(extra.uniform(0.2, 0.6))}
            else:
                when, after_backchannel = {"gap": float(extra.uniform(*style.quick_gap))}, True
            turns.append({"speaker": speaker, "voice": voices[speaker], "text": text, "speed": speed, **when})
    channel = {
        "gain_db": {s: float(extra.uniform(-style.loudness_db, 0.0)) for s in speakers},
        "telephone": bool(extra.random() < style.telephone),
        "snr_db": float(extra.uniform(*style.snr_db)) if style.snr_db else None,
    }
    return {"voices": voices, "turns": turns, "trail": trail, "channel": channel}


def assemble(plan: dict, clips: list[np.ndarray]) -> tuple[np.ndarray, list[dict]]:
    """The conversation's 24 kHz audio and its turns in order of start, in seconds on sample boundaries. A turn
    with a `gap` starts that long after the previous such turn ends (negative: over it, by at most half its
    length); a back-channel with `within` starts that far into it. Each speaker is scaled by their `gain_db`.
    Nobody talks over themselves: a speaker's turn waits MIN_SELF_GAP after their previous one."""
    placed, last_end, previous = [], {}, (0, 0)
    for turn, clip in zip(plan["turns"], clips, strict=True):
        if "within" in turn:
            start = previous[0] + round(turn["within"] * (previous[1] - previous[0]))
        else:
            start = previous[1] + max(round(turn["gap"] * MIMI_SAMPLE_RATE), -((previous[1] - previous[0]) // 2))
        if turn["speaker"] in last_end:
            start = max(start, last_end[turn["speaker"]] + round(MIN_SELF_GAP * MIMI_SAMPLE_RATE))
        end = last_end[turn["speaker"]] = start + len(clip)
        if "gap" in turn:
            previous = (start, end)
        placed.append((start, end, turn, clip))
    audio = np.zeros(max(end for _, end, _, _ in placed) + round(plan["trail"] * MIMI_SAMPLE_RATE), np.float32)
    turns = []
    for start, end, turn, clip in sorted(placed, key=lambda p: p[0]):
        audio[start:end] += clip * np.float32(10 ** (plan["channel"]["gain_db"][turn["speaker"]] / 20))
        turns.append(
            {
                "speaker": turn["speaker"],
                "voice": turn["voice"],
                "text": turn["text"],
                "start": start / MIMI_SAMPLE_RATE,
                "end": end / MIMI_SAMPLE_RATE,
            }
        )
    return audio, turns


def pink_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    """Noise with power falling 3 dB an octave, like most room and street noise (white noise shaped by 1/√f)."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, length)
    return noise / np.sqrt(np.mean(noise**2))


def telephone(audio: np.ndarray) -> np.ndarray:
    """A telephone channel: down to 8 kHz, the 300–3400 Hz voice band (zero-phase, so turn edges stay put),
    and back up to 24 kHz."""
    narrow = signal.sosfiltfilt(TELEPHONE_BAND, soxr.resample(audio, MIMI_SAMPLE_RATE, TELEPHONE_RATE, quality="HQ"))
    wide = soxr.resample(narrow.astype(np.float32), TELEPHONE_RATE, MIMI_SAMPLE_RATE, quality="HQ")
    return np.pad(wide, (0, max(0, len(audio) - len(wide))))[: len(audio)]


def degrade(audio: np.ndarray, turns: list[dict], channel: dict, rng: np.random.Generator) -> np.ndarray:
    """Background noise at `snr_db` (to the mean power of the speech inside the turns), then the telephone
    channel if any (the noise is at the talker's end, so it is band-limited too); a mix louder than PEAK_LIMIT
    is scaled down. The default corpus's audio passes unchanged."""
    if channel["snr_db"] is not None:
        speech = np.zeros(len(audio), bool)
        for t in turns:
            speech[round(t["start"] * MIMI_SAMPLE_RATE) : round(t["end"] * MIMI_SAMPLE_RATE)] = True
        level = np.sqrt(np.mean(audio[speech].astype(np.float64) ** 2)) * 10 ** (-channel["snr_db"] / 20)
        audio = (audio + level * pink_noise(len(audio), rng)).astype(np.float32)
    if channel["telephone"]:
        audio = telephone(audio)
    peak = float(np.abs(audio).max())
    return audio * np.float32(PEAK_LIMIT / peak) if peak > PEAK_LIMIT else audio


def encode(audio: np.ndarray, fmt: Format) -> bytes:
    """24 kHz mono `audio` as a file in `fmt`: resampled, and for stereo the right channel 4 dB quieter."""
    if fmt.sample_rate != MIMI_SAMPLE_RATE:
        audio = soxr.resample(audio, MIMI_SAMPLE_RATE, fmt.sample_rate, quality="HQ")
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
    noise = rng.standard_normal(8 * MIMI_SAMPLE_RATE) * 10 ** (-60 / 20)  # -60 dBFS: above the loudness gate
    contents = {
        "broken_empty.wav": b"",
        "broken_corrupt.flac": rng.bytes(16_384),
        "broken_short.wav": encode(speech[: MIMI_SAMPLE_RATE // 5], DEFAULT_FORMAT),
        "broken_silence.wav": encode(noise.astype(np.float32), DEFAULT_FORMAT),
    }
    for name, data in contents.items():
        (audio_dir / name).write_bytes(data)
    return dict(BROKEN)


def write_demo_corpus(
    out_dir: str | Path, num_conversations: int = 8, seed: int = 0, broken: bool = True, style: str | Style = "default"
) -> dict:
    """Synthesise the corpus into `out_dir` (audio/ and truth/) in `style` (a name in STYLES, or a Style);
    returns a summary."""
    require_espeak()
    style = STYLES[style] if isinstance(style, str) else style
    out = Path(out_dir)
    audio_dir, truth_dir = out / "audio", out / "truth"
    audio_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*audio_dir.glob("conv_*"), *audio_dir.glob("broken_*"), *truth_dir.glob("*")]:
        stale.unlink()  # an earlier build's: a smaller or other corpus must not inherit its files
    plans = [plan_conversation(seed, i, style) for i in range(num_conversations)]
    progress = tqdm(total=sum(len(p["turns"]) for p in plans), desc="synthesising turns", unit="turn")
    seconds, speech_seconds, voices, overlapped = 0.0, 0.0, set(), 0
    for i, plan in enumerate(plans):
        name, fmt = f"conv_{i:04d}", OTHER_FORMATS.get(i % 8, DEFAULT_FORMAT)
        clips = []
        for turn in plan["turns"]:
            clips.append(speak(BACKCHANNELS.get(turn["text"], turn["text"]), turn["voice"], turn["speed"]))
            progress.update()
        audio, turns = assemble(plan, clips)
        audio = degrade(audio, turns, plan["channel"], np.random.default_rng([seed, 3, i]))
        (audio_dir / f"{name}{fmt.suffix}").write_bytes(encode(audio, fmt))
        truth = {
            "audio": f"{name}{fmt.suffix}",
            "duration": len(audio) / MIMI_SAMPLE_RATE,
            "voices": plan["voices"],
            "turns": turns,
        }
        if style != Style():  # the default corpus's truth keeps its bytes
            truth["channel"] = plan["channel"]
        (truth_dir / f"{name}.json").write_text(json.dumps(truth, indent=2) + "\n")
        (truth_dir / f"{name}.rttm").write_text(rttm(name, turns))
        seconds += truth["duration"]
        speech_seconds += sum(t["end"] - t["start"] for t in turns)
        voices.update(plan["voices"].values())
        overlapped += sum(b["start"] < max(a["end"] for a in turns[:j]) for j, b in enumerate(turns) if j)
    progress.close()
    broken_files = write_broken(audio_dir, seed) if broken else {}
    (truth_dir / "broken.json").write_text(json.dumps(broken_files, indent=2) + "\n")
    return {
        "out_dir": str(out),
        "conversations": num_conversations,
        "turns": sum(len(p["turns"]) for p in plans),
        "backchannels": sum(t["text"] in BACKCHANNELS for p in plans for t in p["turns"]),
        "overlapped_turns": overlapped,
        "speakers": sum(len(p["voices"]) for p in plans),
        "voices": sorted(voices),
        "seconds": round(seconds, 2),
        "speech_seconds": round(speech_seconds, 2),
        "broken": broken_files,
    }


@hydra.main(config_path=CONFIG_DIR, config_name="demo_corpus", version_base=None)
def main(cfg: DictConfig) -> None:
    style = replace(STYLES[cfg.style], long_seconds=cfg.long_seconds) if cfg.long_seconds else cfg.style
    s = write_demo_corpus(cfg.out, cfg.num_conversations, cfg.seed, cfg.broken, style)
    print(
        f"{s['conversations']} conversations, {s['turns']} turns ({s['backchannels']} back-channels,"
        f" {s['overlapped_turns']} overlapped), {s['seconds']:.1f} s of audio"
        f" ({s['speech_seconds']:.1f} s speech) in {s['out_dir']}/audio; truth in {s['out_dir']}/truth\n"
        f"voices: {', '.join(s['voices'])}\n"
        f"broken files: {', '.join(f'{k} ({v})' for k, v in s['broken'].items()) or 'none'}"
    )


if __name__ == "__main__":
    main()
