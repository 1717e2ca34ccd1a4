# The two commands of the README: `make demo` and `make test`. Both create .venv with pip if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo-out

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) jobs/demo.py --out $(OUT)

# pytest exits 5 when it collected no tests: that is a failure here, not a pass. The autoscaling tests
# start (and stop) their own Ray cluster, so they run in a second pytest process of their own.
PYTEST = rc=0; $(PY) -m pytest -q --durations=15 $(1) || rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests ($(1))" >&2; exit 1; fi; exit $$rc

test: venv
	$(call PYTEST,-n 2 --dist loadgroup --no-loadscope-reorder -m "not autoscaling")
	$(call PYTEST,-m autoscaling)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(OUT) .pytest_cache
