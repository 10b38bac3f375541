"""The evaluation suites' sentence data, shipped in eval/data/ (see eval/data/README.md):

* `homographs` — Sesame's homograph disambiguation: 200 sentences, 5 homographs × 2 pronunciations × 20;
* `consistency` — Sesame's pronunciation continuation consistency: 200 context/continuation pairs,
  10 words × 2 pronunciations × 10;
* `wer` — 100 sentences for intelligibility (and the MOS and speaker-similarity set generated with them);
* `prompts` — the speaker prompts, one espeak-ng voice each;

and `espeak_variants.json`, the espeak-ng phoneme-mnemonic spelling (`[[r'aUt]]`) that forces each
pronunciation of eval/pronunciation.py's words when espeak-ng speaks a consistency context.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def espeak_variants() -> dict:
    """{"voice": the espeak-ng voice the spellings were verified with, "words": {word: {variant: "[[...]]"}}}."""
    return json.loads((DATA_DIR / "espeak_variants.json").read_text(encoding="utf-8"))


def load_suite_data(name: str) -> list[dict]:
    """The rows of eval/data/<name>.jsonl (sorted by id), one dict per line."""
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no suite data {name!r} ({path}); available: {', '.join(available)}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
