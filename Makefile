# The two commands of the README: `make demo` and `make test`. Both install what they need first.
VENV ?= .venv
export VENV

.PHONY: install demo test export clean-nbs

install:
	bash tools/install.sh

demo: install
	$(VENV)/bin/python -m synernet.core --preset base

test: install
	bash tools/test.sh

# Developer helpers: regenerate synernet/ from the notebooks, and clean the notebooks.
export: install
	$(VENV)/bin/nbdev_export
clean-nbs: install
	$(VENV)/bin/nbdev_clean
