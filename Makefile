# The README's two commands. Each installs what it needs on first use: espeak-ng (apt, for the demo corpus's
# speech), for the tests also Chromium (apt, for the playground page's browser test), and the project in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= data/demo

.PHONY: quickstart test bench system-deps test-deps

# apt_install,CHECK,PACKAGES,WHY: install Debian packages (as root or with sudo) unless CHECK already succeeds
define apt_install
@$(1) >/dev/null 2>&1 || { \
  echo "installing $(2) (apt): $(3)"; \
  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
  $$SUDO apt-get install -y --no-install-recommends $(2) >/dev/null \
    || { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends $(2) >/dev/null; } \
    || { echo "could not install $(2): install it with your package manager and run again"; exit 1; }; }
endef

system-deps:
	$(call apt_install,command -v espeak-ng,espeak-ng,the demo corpus is speech it synthesises offline)

test-deps: system-deps
	$(call apt_install,test -x /usr/bin/chromedriver,chromium chromium-driver,tests/test_serve_playground.py drives the playground page in headless Chromium)

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# demo corpus (espeak-ng conversations) → data pipeline → tiny CSM training → evaluation, offline on CPU.
# The phoneme judge of the pronunciation suites needs the Hub: a random one runs their code, and they refuse a number.
quickstart: system-deps $(VENV)/.extras
	$(PY) -m data_pipeline.demo_corpus out=$(DEMO)/corpus
	$(PY) -m data_pipeline input_dir=$(DEMO)/corpus/audio output_dir=$(DEMO)/dataset codec=mimi_random max_positions=512
	$(PY) -m csm_train +experiment=tiny data=speech_demo data.path=$(DEMO)/dataset run_id=speech_demo
	$(PY) -m eval checkpoint=runs/tiny/speech_demo limit=4 speaker.max_seconds=5 judges.phonemes=random-init

# pyannote.audio and whisperx: the default diarizer's segmentation model (shipped in whisperx) and recipe (pyannote),
# and the production backends (diarizer=pyannote, asr=whisperx) whose adapters the tests exercise
$(VENV)/.extras: $(VENV)/.installed scripts/install_extras.sh
	scripts/install_extras.sh $(PY)
	touch $@

# Lint, then every test. The SLURM tests start a real local cluster (launch/local_slurm.sh installs SLURM with apt,
# as root or with sudo) and fail where it cannot run: `CSM_SKIP_SLURM=1 make test` skips them instead.
test: test-deps $(VENV)/.extras
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/bench_step.py --preset tiny
	$(PY) bench/bench_step.py --preset 100m --batch 1 --frames 512 --steps 4
