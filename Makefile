# Two commands: `make test` (what CI runs) and `make demo`. Both create/reuse the virtualenv in $(VENV) and install
# the project with the pinned versions of ci/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_DIR ?= output_dir/demo

.PHONY: venv test demo bench clean

$(STAMP): setup.py ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c ci/constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) main_pretrain.py --config config/demo.yaml --model mae_vit_tiny_patch16 --output_dir $(DEMO_DIR) \
		--log_dir $(DEMO_DIR) --demo

bench: $(STAMP)
	$(PY) bench/run.py --suite quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
