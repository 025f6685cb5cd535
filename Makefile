# yolo-distill: `make demo` runs the main job on CPU, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv test demo demo-smoke clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	PY=$(PY) scripts/demo.sh

# The demo's steps on a tiny generated data set (teacher 1 epoch, students 2): CI runs it so the main job cannot break.
SMOKE := runs/demo-smoke
demo-smoke: $(STAMP)
	$(PY) -m utils.data.synthetic --out $(SMOKE)/data --train 16 --val 8 --img 128
	PY=$(PY) DEMO_RUNS=$(SMOKE) DEMO_DATA=$(SMOKE)/data/data.yaml DEMO_SOURCE=$(SMOKE)/data/images/val \
	  DEMO_IMG=128 DEMO_BATCH=8 DEMO_TEACHER= DEMO_TEACHER_EPOCHS=1 DEMO_STUDENT_EPOCHS=2 DEMO_MAX_BATCHES=2 scripts/demo.sh

clean:
	rm -rf runs .pytest_cache
