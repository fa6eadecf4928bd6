# The two commands a new user runs are `make demo` and `make test`; each installs what is missing.
PY    := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install demo test bench clean

$(STAMP): requirements/base.txt requirements/cpu.txt requirements/cuda.txt requirements/torchrec.txt pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) trainer/main.py --train.overwrite=true

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_data.py

clean:
	rm -rf runs .pytest_cache
