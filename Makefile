# Two commands: `make demo` and `make test`. Both build .venv from scratch when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.switchyard-installed
# CPU build of torch where there is no GPU (pip finds 2.13.0+cpu on local disk); default build otherwise.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.5,<2.15' || echo 'torch==2.13.0')
PYTEST_ARGS ?=
# DeepSpeed compiles its CPU all-reduce op per torch build: one directory per venv, so that two checkouts' venvs do not
# rebuild it in turn (each rebuild is a window in which a killed rank leaves a lock behind: deepspeed/build_lock.py)
RUN_ENV = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" TORCH_EXTENSIONS_DIR="$${TORCH_EXTENSIONS_DIR:-$(CURDIR)/$(VENV)/torch_extensions}"

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,serve]"
	# DeepSpeed's CPU all-reduce op, built as its first CPU run would build it (~40 s on 2 cores), so that neither the
	# first `make demo` nor the suite's first DeepSpeed test waits on the compiler (nothing to build where CUDA is)
	$(RUN_ENV) $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

demo: install
	$(RUN_ENV) bash launch/quickstart.sh

test: install
	$(RUN_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(RUN_ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info integration/*.egg-info
