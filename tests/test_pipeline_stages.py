"""Stages 2–4 in isolation: VAD chunking, the diarizer's windows and clustering, DNSMOS' ranking. Their
quality on real speech (WER, DER) is measured end to end in test_pipeline_demo.py."""

import numpy as np
import pytest

from data_pipeline.diarize import cluster, spans_from_labels, windows
from data_pipeline.turns import SpeakerSpan
from data_pipeline.vad import merge_regions


def test_merge_regions_fills_whisper_windows_and_cuts_long_regions():
    regions = [(0.0, 4.0), (5.0, 20.0), (21.0, 31.0), (40.0, 105.0)]
    assert merge_regions(regions, max_seconds=30.0) == [
        (0.0, 20.0),
        (21.0, 31.0),
        (40.0, 70.0),
        (70.0, 100.0),
        (100.0, 105.0),
    ]
    assert merge_regions([], 30.0) == []


def test_windows_tile_long_regions_and_split_overlaps_at_the_midpoint():
    tiles = windows([(0.0, 2.0), (10.0, 16.0)], window=3.0, step=1.5)
    assert tiles[0] == (0.0, 2.0, 0.0, 2.0)  # shorter than a window: itself
    embedded = [(s, e) for s, e, _, _ in tiles[1:]]
    assert embedded == [(10.0, 13.0), (11.5, 14.5), (13.0, 16.0)]
    owned = [(s, e) for _, _, s, e in tiles[1:]]
    assert owned == [(10.0, 12.25), (12.25, 13.75), (13.75, 16.0)]  # contiguous, covering the region


def test_cluster_separates_speakers_by_cosine_and_numbers_them_by_first_appearance():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64))
    order = [2, 2, 0, 1, 0, 2, 1]
    vectors = np.stack([centres[i] + 0.1 * rng.normal(size=64) for i in order])
    assert cluster(vectors, threshold=0.3).tolist() == [0, 0, 1, 2, 1, 0, 2]
    assert cluster(vectors, threshold=0.3, num_speakers=2).max() == 1
    assert cluster(vectors[:1], threshold=0.3).tolist() == [0]


def test_spans_join_adjacent_stretches_of_one_speaker():
    spans = spans_from_labels([(0, 1), (1, 2), (3, 4), (4, 5)], np.array([0, 0, 0, 1]))
    assert spans == [
        SpeakerSpan("SPEAKER_00", 0, 2),
        SpeakerSpan("SPEAKER_00", 3, 4),  # a pause separates them
        SpeakerSpan("SPEAKER_01", 4, 5),
    ]


@pytest.mark.slow
def test_dnsmos_scores_clean_speech_above_the_same_speech_in_noise(speech):
    from data_pipeline.quality import DNSMOS

    mos = DNSMOS()
    noisy = speech + 0.05 * np.random.default_rng(0).normal(size=len(speech)).astype(np.float32)
    clean_score, noisy_score = mos(speech), mos(noisy)
    assert 1.0 <= noisy_score < clean_score - 0.5 <= 5.0
