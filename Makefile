# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse .venv and install with the tested pins in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.piip-installed

.PHONY: install data test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# real aerial photographs with tree-crown boxes for the tests and `piip data trees`; --no-deps: only
	# its data files are read (its own dependencies are PyTorch Lightning and more)
	$(PY) -m pip install --quiet --no-deps -c constraints.txt deepforest
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST (the original IDX files) from Debian's package; needs root (or: sudo apt-get install
# dataset-fashion-mnist). Without it the tests that read it are skipped, saying how to install it.
data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "could not install dataset-fashion-mnist: run 'sudo apt-get install dataset-fashion-mnist'"

test: $(STAMP) data
	$(PY) -m pytest -q

demo: $(STAMP) data
	$(VENV)/bin/piip demo

bench: $(STAMP)
	$(PY) benchmarks/run_benchmarks.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
