# genlab: `make train` and `make test` install into .venv first (pip, from the committed lock).
# Use an existing environment instead: `make test VENV=/path/to/venv` (it must already hold the
# lock's packages, or `make install VENV=...` puts them there).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genlab-installed
# the default job: a CPU-sized recipe of the voxel VAE-GAN (see conf/experiment/)
ARGS ?= experiment=voxel_vaegan_cpu
# the suite runs in PYTEST_WORKERS processes (pytest-xdist), one test file per process at a time
# (module fixtures are built once), one thread each; PYTEST_WORKERS=0 runs it in this process
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=
# `make parity`: a separate venv with the unofficial pytorch3d wheel (needs torch 2.12.1, see
# requirements-parity.lock), used only to compare genlab's geometry code against pytorch3d
PARITY_VENV ?= .venv-p3d
PARITY_STAMP := $(PARITY_VENV)/.parity-installed

.PHONY: install train test lint lock clean-cache help parity

help:
	@echo "make train  - install (if needed) and run the default job: python train.py $$ARGS"
	@echo "make test   - install (if needed) and run the whole test suite"
	@echo "make lint   - ruff lint + format check via pre-commit"
	@echo "make lock   - rewrite requirements.lock from the current environment"
	@echo "make parity - build $(PARITY_VENV) (torch 2.12.1 + pytorch3d wheel) and run tests/parity"

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.lock
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@touch $@

train: install
	$(BIN)/python train.py $(ARGS)

test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^genlab' > requirements.lock

clean-cache:
	rm -rf .cache

parity: $(PARITY_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PARITY_VENV)/bin/python -m pytest tests/parity -v $(PYTEST_ARGS)

$(PARITY_STAMP): requirements-parity.lock pyproject.toml
	@test -x $(PARITY_VENV)/bin/python || $(PYTHON) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements-parity.lock
	$(PARITY_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
	@touch $@
