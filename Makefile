# The only place that knows how to install raykd: `make study` and `make test` create .venv when
# missing and install the package with the pinned constraints.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raykd-installed

.PHONY: install study test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# the quickstart study; run again, it resumes (or just re-reports) the same study folder
study: $(STAMP)
	@if [ -f runs/quickstart/study.yaml ]; then $(BIN)/raykd study resume runs/quickstart; \
	else $(BIN)/raykd study run studies/quickstart.yaml; fi

test: $(STAMP)
	$(BIN)/ruff check raykd tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check raykd tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
