"""Lhotse manifests as the pipeline's input (data_pipeline/corpora.py): a corpus's own transcripts and speakers
go to the shards as they are, and ASR/diarization run only where the corpus lacks them."""

import json
import shutil

import numpy as np
import pytest
from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.audio import AudioSource
from lhotse.supervision import AlignmentItem

from data_pipeline.audio import AudioError
from data_pipeline.corpora import LhotseTranscripts, supervision_words
from data_pipeline.run import merge
from data_pipeline.shards import read_samples
from data_pipeline.transcribe import Transcriber
from data_pipeline.turns import SpeakerSpan, Word


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """Lhotse manifests written from the demo corpus's truth, plus one recording the corpus left untranscribed.
    Conversation 2 is a stereo file: its turns sit on alternate channels, as a telephone corpus's sides do."""
    from data_pipeline.demo_corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("lhotse")
    write_demo_corpus(root / "corpus", num_conversations=3, seed=156, broken=False)
    recordings, supervisions, truth = [], [], {}
    for path in sorted((root / "corpus" / "truth").glob("conv_*.json")):
        conversation = json.loads(path.read_text())
        recording = Recording.from_file(root / "corpus" / "audio" / conversation["audio"])
        recordings.append(recording)
        truth[conversation["audio"]] = conversation["turns"]
        supervisions += [
            SupervisionSegment(
                id=f"{recording.id}-{i}",
                recording_id=recording.id,
                start=turn["start"],
                duration=turn["end"] - turn["start"],
                channel=recording.channel_ids[i % recording.num_channels],
                text=turn["text"],
                speaker=f"{recording.id}-{turn['speaker']}",
            )
            for i, turn in enumerate(conversation["turns"])
        ]
    untranscribed = root / "corpus" / "audio" / "extra" / "untranscribed.wav"
    untranscribed.parent.mkdir()
    shutil.copy(root / "corpus" / "audio" / "conv_0000.wav", untranscribed)
    recordings.append(Recording.from_file(untranscribed))
    RecordingSet.from_recordings(recordings).to_file(root / "recordings.jsonl.gz")
    SupervisionSet.from_segments(supervisions).to_file(root / "supervisions.jsonl.gz")
    return root, truth


def test_shards_carry_the_corpus_words_and_speakers(manifests, tmp_path):
    root, truth = manifests
    transcripts = LhotseTranscripts(root / "recordings.jsonl.gz", root / "supervisions.jsonl.gz")
    names = ["conv_0000.wav", "conv_0001.flac", "conv_0002.wav", "untranscribed.wav"]
    assert [p.name for p in transcripts.inputs()] == names
    from hydra import compose, initialize_config_dir

    from data_pipeline.__main__ import CONFIG_DIR, build

    overrides = [f"output_dir={tmp_path}", "transcripts=lhotse", f"lhotse.recordings={root / 'recordings.jsonl.gz'}",
                 f"lhotse.supervisions={root / 'supervisions.jsonl.gz'}", "lhotse.fallback=false",
                 "codec=mimi_random", "max_positions=512"]  # fmt: skip
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        pipeline = build(compose("config", overrides))  # as `python -m data_pipeline` builds it: no input_dir
    assert pipeline.inputs == transcripts.inputs()  # the manifest's recordings, not a directory walk
    pipeline.run_part(0, progress=False)
    card = merge(tmp_path, 1)

    turns = {}  # recording → its turns in order, as (speaker, text), across its windows
    for _key, sample in read_samples(tmp_path):
        source = json.loads(sample["meta.json"])["source"]
        turns.setdefault(source, []).extend((s["speaker"], s["text"]) for s in json.loads(sample["segments.json"]))
    expected = {}
    for audio, conversation in truth.items():
        numbers = {}  # the shards number a recording's speakers 0, 1, ... by first turn
        expected[audio] = [(numbers.setdefault(turn["speaker"], len(numbers)), turn["text"]) for turn in conversation]
    assert turns == expected
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [(f["input"].split("/")[-1], f["stage"], f["reason"]) for f in failures] == [
        ("untranscribed.wav", "transcribe", "no_transcript")
    ]
    assert card["recordings"] == 3 and card["rejected"] == {"transcribe:no_transcript": 1}


class FakeTranscriber(Transcriber):
    """ASR and diarization stand-ins: a fixed transcript, and speaker X before 1 s, Y after."""

    def __init__(self):
        super().__init__(vad=None, asr=None, diarizer=lambda audio, regions: self.spans(regions))

    @staticmethod
    def spans(regions):
        assert regions == [(0.5, 2.5)]  # the supervisions' spans, overlaps joined
        return [SpeakerSpan("X", 0.0, 1.0), SpeakerSpan("Y", 1.0, 3.0)]

    def __call__(self, path, audio):
        self.seconds["asr"] += 1.0
        return [(Word("hello", 0.1, 0.5), "0")]


def write_manifests(root, recordings, supervisions):
    RecordingSet.from_recordings(recordings).to_file(root / "recordings.jsonl")
    SupervisionSet.from_segments(supervisions).to_file(root / "supervisions.jsonl")
    return root / "recordings.jsonl", root / "supervisions.jsonl"


def file_recording(path, recording_id):
    return Recording(recording_id, [AudioSource("file", [0], str(path))], 24000, 72000, 3.0)


def test_asr_and_diarization_run_only_where_the_corpus_lacks_them(tmp_path):
    untranscribed, captioned = tmp_path / "untranscribed.wav", tmp_path / "captioned.wav"
    paths = write_manifests(
        tmp_path,
        [file_recording(untranscribed, "untranscribed"), file_recording(captioned, "captioned")],
        [
            SupervisionSegment("c0", "captioned", 0.5, 1.0, text="good morning"),
            SupervisionSegment("c1", "captioned", 1.2, 1.3, text="hi there"),
        ],
    )
    audio = np.zeros(72000, np.float32)
    with pytest.raises(AudioError, match="no_transcript"):
        LhotseTranscripts(*paths)(untranscribed, audio)
    with pytest.raises(AudioError, match="no_speakers"):
        LhotseTranscripts(*paths)(captioned, audio)
    transcripts = LhotseTranscripts(*paths, fallback=FakeTranscriber())
    assert transcripts(untranscribed, audio) == [(Word("hello", 0.1, 0.5), "0")] and transcripts.seconds["asr"] == 1.0
    words = transcripts(captioned, audio)
    assert [(w.text, speaker) for w, speaker in words] == [("good", "X"), ("morning", "Y"), ("hi", "Y"), ("there", "Y")]
    assert "diarize" in transcripts.seconds


def test_word_times_come_from_the_alignment_or_spread_over_the_supervision():
    aligned = SupervisionSegment("s", "r", 1.0, 2.0, text="Hello, world!").with_alignment(
        "word", [AlignmentItem("HELLO", 1.1, 0.4, 0.8), AlignmentItem("WORLD", 1.9, 0.5)]
    )
    assert supervision_words(aligned) == [Word("Hello,", 1.1, 1.5, 0.8), Word("world!", 1.9, 2.4, 1.0)]
    normalised = SupervisionSegment("s", "r", 1.0, 2.0, text="Hello there").with_alignment(
        "word",
        [AlignmentItem("HELLO", 1.1, 0.4)],  # another word count: the alignment's own words
    )
    assert [w.text for w in supervision_words(normalised)] == ["HELLO"]
    spread = supervision_words(SupervisionSegment("s", "r", 1.0, 2.0, text="a bbb"))
    assert [(w.text, w.start, w.end) for w in spread] == [("a", 1.0, 1.5), ("bbb", 1.5, 3.0)]


def test_manifests_the_pipeline_cannot_use_are_refused_clearly(tmp_path):
    headsets = Recording(
        "meeting", [AudioSource("file", [0], "a.wav"), AudioSource("file", [1], "b.wav")], 16000, 16000, 1.0
    )
    streamed = Recording("stream", [AudioSource("url", [0], "https://example.com/a.wav")], 16000, 16000, 1.0)
    faster = file_recording(tmp_path / "fast.wav", "fast").perturb_speed(1.1)
    paths = write_manifests(tmp_path, [headsets, streamed, faster, file_recording(tmp_path / "ok.wav", "ok")], [])
    with pytest.raises(ValueError, match=r"3 of 4 recordings .*meeting: 2 audio sources.*stream: a 'url' source.*"
                       r"fast_sp1.1: transforms \['Speed'\]"):  # fmt: skip
        LhotseTranscripts(*paths)
    twice = [file_recording(tmp_path / "ok.wav", "left"), file_recording(tmp_path / "ok.wav", "right")]
    with pytest.raises(ValueError, match="left and right are both"):
        LhotseTranscripts(*write_manifests(tmp_path, twice, []))
    with pytest.raises(ValueError, match="holds no recordings"):
        LhotseTranscripts(*write_manifests(tmp_path, [], []))
    recordings, supervisions = write_manifests(tmp_path, twice[:1], [SupervisionSegment("s", "left", 0.0, 1.0)])
    with pytest.raises(ValueError, match="supervisions.jsonl is not a Lhotse RecordingSet manifest"):
        LhotseTranscripts(supervisions, recordings)  # swapped
