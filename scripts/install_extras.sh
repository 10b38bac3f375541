#!/usr/bin/env bash
# Production pipeline backends into an existing project venv: pyannote.audio 4.0.7 (diarizer=pyannote) and
# whisperx 3.7.2 (asr=whisperx). Idempotent: run it again and it changes nothing.
#
#   scripts/install_extras.sh [PYTHON]     # PYTHON: the venv's interpreter, default .venv/bin/python
#
# Why a script and not just an extra:
# * whisperx 3.7.2 (the only release that accepts torch 2.13) declares pyannote-audio<4, pandas<2.3,
#   numpy<2.1, av<16, yet runs with pyannote.audio 4 and the newer packages for what we use (faster-whisper
#   transcription via our FasterWhisperASR, then whisperx.load_align_model/align). So it goes in with --no-deps,
#   plus the one import-time dependency the project lacks (nltk); `pip check` then lists those declared pins.
# * pyannote.audio pulls PyPI's torchaudio, a CUDA build whose C++ extensions do not load beside a CPU torch.
#   Without them torchaudio imports in its pure-Python mode, which is all pyannote and whisperx need here.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
[[ $PY = /* ]] || PY="$PWD/$PY"  # relative to where the script was started
cd "$ROOT"
[ -x "$PY" ] || { echo "no python at $PY: create the venv first (make test, or see README)"; exit 1; }
PIP=("$PY" -m pip install -qq --disable-pip-version-check)
quiet() { grep -v "^WARNING: Location\|dependency resolver does not\|^whisperx 3.7.2 requires" || true; }  # known noise

echo "installing the pyannote extra (pyannote.audio 4.0.7) ..."
DS_BUILD_OPS=0 "${PIP[@]}" -c constraints.txt -e ".[pyannote]" 2>&1 | quiet

echo "installing whisperx 3.7.2 (--no-deps) and nltk ..."
"${PIP[@]}" -c constraints.txt --no-deps whisperx==3.7.2 2>&1 | quiet
"${PIP[@]}" -c constraints.txt "nltk==3.10.4" 2>&1 | quiet

# torchaudio: only touch it when it fails to import *because* it is a CUDA build next to a CPU torch.
if ! error=$("$PY" -c "import torchaudio" 2>&1); then
    if "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" && grep -qi "cuda" <<<"$error"; then
        lib=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('torchaudio').origin).parent / 'lib')")
        echo "torchaudio is a CUDA build and torch is CPU-only: its C++ extensions cannot load."
        echo "removing $lib/*.so so that torchaudio imports without them (pure-Python APIs; pyannote/whisperx work)."
        rm -f "$lib"/*.so
        "$PY" -c "import torchaudio" || { echo "torchaudio still does not import"; exit 1; }
    else
        echo "import torchaudio fails for another reason:"; echo "$error"; exit 1
    fi
fi

"$PY" - <<'EOF'
import warnings

warnings.filterwarnings("ignore")
import pyannote.audio, torchaudio, whisperx.alignment  # noqa: E401,F401

print(f"ok: pyannote.audio {pyannote.audio.__version__}, torchaudio {torchaudio.__version__}, whisperx 3.7.2")
EOF
echo "pip check (whisperx's declared pins are expected here, see the top of this script):"
"$PY" -m pip check || true
