"""Generation and evaluation suites (WER, MOS, speaker similarity, homographs, consistency). Built in issue #5."""
