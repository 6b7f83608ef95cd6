# Two commands do all set-up: `make demo` and `make test` (each builds/refreshes .venv from
# pyproject.toml with the exact versions in constraints.txt).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format bench paper experiments accuracy accuracy-exploratory fashion-mnist clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,cluster,tensorboard]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/sisajax demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make bench` runs every benchmark (~25 min); `make bench QUICK=1` a smoke run (~1 min).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all $(if $(QUICK),--quick,)

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PAPER_PRESETS ?= shards slices requests dist_aware transfer
experiments: paper
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or pass data.params.path=DIR"; exit 1; fi; \
	fi

paper: $(STAMP) fashion-mnist
	for p in $(PAPER_PRESETS); do $(BIN)/sisajax paper experiment=$$p experiment.out_dir=outputs/paper/$$p || exit 1; done
	$(BIN)/sisajax report dir=outputs/paper

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache

# The accuracy study: every S (the full model included) tuned with the same grid on the
# validation split, tested once on other seeds, gaps with paired intervals; ~25 min on 2 CPU
# cores. Tables and plots go to docs/accuracy/tune_*/, the headline table of docs/accuracy.md
# and README.md is rewritten from what they stored.
TUNE_STUDIES := docs/accuracy/tune_digits docs/accuracy/tune_purchase docs/accuracy/tune_fashion
accuracy: $(STAMP) fashion-mnist
	$(BIN)/sisajax paper experiment=tune_digits 'experiment.seeds=[0,1,2]' experiment.out_dir=docs/accuracy/tune_digits
	$(BIN)/sisajax paper experiment=tune_purchase 'experiment.seeds=[0,1,2]' experiment.out_dir=docs/accuracy/tune_purchase
	$(BIN)/sisajax paper experiment=tune_fashion 'experiment.seeds=[0,1,2]' experiment.out_dir=docs/accuracy/tune_fashion
	$(BIN)/python -m sisajax.experiments.tune docs/accuracy.md $(TUNE_STUDIES)
	$(BIN)/python -m sisajax.experiments.tune README.md $(TUNE_STUDIES)

# The earlier, exploratory study (recipes selected on test): baseline vs a hand-picked recipe,
# S = 1..50, 3 seeds, 100 deletions; ~35 min.
accuracy-exploratory: $(STAMP) fashion-mnist
	$(BIN)/sisajax paper experiment=accuracy_digits 'experiment.seeds=[0,1,2]' experiment.out_dir=docs/accuracy/digits
	$(BIN)/sisajax paper experiment=accuracy 'experiment.seeds=[0,1,2]' experiment.out_dir=docs/accuracy/fashion_mnist
	$(BIN)/sisajax paper experiment=accuracy_purchase 'experiment.seeds=[0,1,2]' experiment.out_dir=docs/accuracy/purchase_hard
