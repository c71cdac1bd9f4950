# Two quick-start commands (README): `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
# Ray's usage-stats reporting is off in every start path here (set RAY_USAGE_STATS_ENABLED=1 to opt in).
export RAY_USAGE_STATS_ENABLED ?= 0
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0   # the CPU build on this machine's disk; a newer pin pulls a multi-GB CUDA build

.PHONY: install demo test test-slow lint format prometheus clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PY) -m edge_agents.demo

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint: install  # ruff: the lint rules and the formatting pyproject.toml sets (line length 120)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  # apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

prometheus:  # Prometheus on 127.0.0.1:9090 with configs/prometheus/prometheus.yml (installs Debian's package if missing)
	bash scripts/prometheus.sh

clean:
	rm -rf $(VENV) .pytest_cache runs
