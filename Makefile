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

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
PYTEST = rc=0; $(PY) -m pytest -q --durations=15 $(1) || rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests ($(1))" >&2; exit 1; fi; exit $$rc
# Two pytest-xdist workers (tests/conftest.py groups them by file and shared fixture). The autoscaling
# tests start (and stop) their own Ray cluster, so they run in a pytest process of their own, beside
# the rest (they mostly wait for nodes); their output follows the main run's.
test: venv
	@log=$$(mktemp); ( $(call PYTEST,-m autoscaling) ) > $$log 2>&1 & auto=$$!; \
	main=0; ( $(call PYTEST,-n 2 --dist loadgroup --no-loadscope-reorder -m "not autoscaling") ) || main=$$?; \
	scaling=0; wait $$auto || scaling=$$?; \
	echo "---- the autoscaling tests (their own pytest process, run beside the rest):"; cat $$log; rm -f $$log; \
	[ $$main -eq 0 ] && [ $$scaling -eq 0 ]

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(OUT) .pytest_cache
