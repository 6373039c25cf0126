# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Overridable: on this project's machines pip serves these two from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
RUN ?= runs/quickstart

.PHONY: install test demo pipeline clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(OFFLINE) $(BIN)/python -m pytest -q

demo: pipeline

# phantom data -> statistics; grows into train -> eval as those commands land.
pipeline: install
	$(OFFLINE) $(BIN)/medvqa phantom $(RUN)/phantom --images 400 --seed 0 --overwrite
	$(OFFLINE) $(BIN)/medvqa data stats $(RUN)/phantom/vqa-rad --format vqa-rad

clean:
	rm -rf $(VENV) runs .pytest_cache
