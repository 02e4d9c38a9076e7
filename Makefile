# The two commands of the README: `make demo` and `make test`. Both install what they need first.
VENV ?= .venv
export VENV

.PHONY: install demo test export clean-nbs

install:
	bash tools/install.sh

# The main job: train the default preset on the built-in synthetic data set on the CPU and write the run folder
# (runs/<preset>-synthetic-demo-seed0) and the executed notebook (runs/demo.ipynb).
demo: install
	mkdir -p runs
	$(VENV)/bin/papermill nbs/train.ipynb runs/demo.ipynb

test: install
	bash tools/test.sh

# Developer helpers: regenerate synernet/ from the notebooks, and clean the notebooks.
export: install
	$(VENV)/bin/nbdev_export
clean-nbs: install
	$(VENV)/bin/nbdev_clean
