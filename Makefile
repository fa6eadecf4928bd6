# The two commands a new user runs are `make demo` and `make test`; each installs what is missing.
PY    := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install demo test test-quick bench clean

$(STAMP): requirements/base.txt requirements/cpu.txt requirements/cuda.txt requirements/torchrec.txt pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

# The daily pipeline on the tiny synthetic world: every step a TorchX job (local_cwd runs
# torchrun from the venv). A second `make demo` finds every step done and only prints the table.
demo: $(STAMP)
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) -m pipeline --config configs/pipeline-demo.toml

# Everything: unit, multi-process gloo, end-to-end and fault tests (README.md, Tests).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast tier for your own loop: every test not marked slow (no TorchX jobs, no end-to-end runs).
test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Every benchmark prints a table; figures and machines are kept in docs/benchmarks.md and
# docs/lifecycle.md. About 45 minutes on 2 cores.
bench: $(STAMP)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_infer.py
	$(PY) bench/bench_aggregate.py
	$(PY) bench/bench_serving.py
	$(PY) bench/bench_projection.py
	$(PY) bench/bench_precision.py

clean:
	rm -rf runs .pytest_cache
