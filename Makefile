# make demo   - create .venv if missing, train a small model on real images (2 CPU processes), evaluate it
# make test   - create .venv if missing, run the test suite, then timm's own model tests on our six models
# make test-fast - the test suite without the speed tooling's tests (bench/, gpu_check) and timm's suite
# make bench  - speed table for the T variants and Swin-T (see bench/benchmark.py)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL  ?= msg
# test processes: one per core (pytest-xdist); each test file stays in one process, its module fixtures once
TEST_WORKERS ?= auto
EPOCHS ?=

.PHONY: demo test test-fast bench clean-env
$(STAMP): requirements.txt requirements-demo.txt requirements-dev.txt requirements-onnx.txt \
		requirements-dense.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --model $(MODEL) $(if $(EPOCHS),--epochs $(EPOCHS))

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(PY) tools/run_timm_suite.py -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m 'not bench' --deselect tests/test_gpu_check.py

bench: $(STAMP)
	$(PY) bench/benchmark.py --cfg configs/msg_tiny_p4_win7_224.yaml configs/MG-SSAF/MG-SSAF-T.yaml --timm swin_tiny_patch4_window7_224

clean-env:
	rm -rf $(VENV)
