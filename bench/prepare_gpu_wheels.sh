#!/usr/bin/env bash
# Prepare, on a CPU machine with PyPI, the wheels bench/gpu_check.sh installs on a GPU machine that has its own
# CUDA torch, lightning, transformers and peft but no package index (Python 3.12, x86_64 Linux):
#
#     bench/prepare_gpu_wheels.sh            # → bench/gpu_wheels/ (git-ignored; carry it with the code)
#
# What the GPU machine lacks on the training path: hydra-core + omegaconf + antlr4 (python -m csm_train),
# webdataset + braceexpand (csm_train/data.py, data_pipeline/shards.py), deepspeed (trainer=deepspeed_*,
# csm_train.convert --to ours) and deepspeed's small requirements (hjson, ninja, py-cpuinfo, msgpack, einops,
# psutil, pydantic); for the serve check (python -m serve driven by bench/bench_serve.py, issue 16): fastapi +
# starlette + annotated-doc, uvicorn + click + h11, python-multipart, httpx + httpcore + anyio + sniffio + idna +
# certifi, rich + markdown-it-py + mdurl + pygments (the bench's table), and what serve imports through
# data_pipeline.audio and serve.encode: av (PyAV, 36 MB: most of the directory), soundfile + cffi + pycparser, soxr,
# pyloudnorm. Not scipy (pyloudnorm needs it; 35 MB would take the directory past the device tool's 64 MiB carry):
# gpu_check.sh reports the serve check as skipped where the GPU machine lacks it. submitit is not here: only
# hydra/launcher=slurm imports it, never the training path.
# gpu_check.sh installs with pip's resolver against what is already installed there, so a package the GPU
# machine has (numpy, pyyaml, packaging, tqdm, typing-extensions, torch) is never replaced.
# Binary wheels are fetched for cp312 manylinux; sdists are built here: antlr4-python3-runtime 4.9.3 (no
# wheel on PyPI) and deepspeed 0.19.8 with DS_BUILD_OPS=0 (pure python; ops would compile on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=bench/gpu_wheels
mkdir -p "$OUT"

binary=(
    hydra-core==1.3.8 omegaconf==2.3.0 webdataset==1.0.2 braceexpand==0.1.7
    hjson py-cpuinfo msgpack ninja einops psutil
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
    fastapi==0.163.2 starlette==1.10.0 annotated-doc uvicorn==0.54.0 click h11 python-multipart==0.0.34
    httpx==0.28.1 httpcore anyio sniffio idna certifi rich markdown-it-py mdurl pygments
    av==18.1.0 soundfile==0.14.0 cffi pycparser soxr pyloudnorm
)
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any "${binary[@]}"

# sdists: antlr4 is pure python; deepspeed's setup.py imports torch, so it builds against this venv's CPU
# torch (no build isolation: an isolated build would fetch a multi-GB CUDA torch) with every op off.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation \
    --wheel-dir "$OUT" deepspeed==0.19.8

# pydantic pins pydantic-core exactly: keep the pair pip's resolver will accept.
"$PYTHON" - "$OUT" <<'EOF'
import sys, zipfile, pathlib, re
out = pathlib.Path(sys.argv[1])
pyd = next(out.glob("pydantic-[0-9]*.whl"))
meta = zipfile.ZipFile(pyd).read(next(n for n in zipfile.ZipFile(pyd).namelist() if n.endswith("METADATA"))).decode()
want = re.search(r"Requires-Dist: pydantic-core==([\w.]+)", meta).group(1)
have = [p.name for p in out.glob("pydantic_core-*.whl")]
if not any(f"pydantic_core-{want}-" in h for h in have):
    sys.exit(f"{pyd.name} needs pydantic-core=={want}, have {have}: rerun with that pin")
for whl in sorted(out.glob("*.whl")):
    if not re.search(r"-(py3|py2\.py3|cp312|cp3\d*-abi3)-", whl.name):  # abi3: cp36 to cp312 (av's is cp311)
        sys.exit(f"{whl.name}: not installable on CPython 3.12")
EOF
du -ch "$OUT"/*.whl | tail -1
ls "$OUT"
