# The two commands of the README: `make demo` and `make test`. Both install what they need first.
VENV ?= .venv
export VENV

.PHONY: install demo test reports export clean-nbs

install:
	bash tools/install.sh

# The main job: train the default preset on the built-in synthetic data set on the CPU and write the run folder
# (runs/<preset>-synthetic-demo-seed0) and the executed notebook (runs/demo.ipynb).
demo: install
	mkdir -p runs
	$(VENV)/bin/papermill nbs/train.ipynb runs/demo.ipynb

test: install
	bash tools/test.sh

# The committed reports/: the synthetic sweeps (3 seeds each; finished runs are skipped, so a re-run resumes, and a
# run that one grid shares with another is trained once), then the tables and figures built from the run folders.
# Hours on a CPU: see reports/README.md. Paper scale on a GPU machine, e.g.
#   make reports SWEEP_ARGS="-p dataset voc -p data_root ~/data/VOCdevkit/VOC2012 -p out_root runs/sweeps/voc \
#        -y '{gpus: [0, 1, 2, 3]}'" TABLE_ARGS="-p runs_root runs/sweeps/voc -p reports_dir reports/voc"
GRIDS ?= ablation thresholds loss_weights methods
SEEDS ?= 3
WORKERS ?= 1
SWEEP_ARGS ?=
TABLE_ARGS ?=
reports: install
	mkdir -p runs
	for g in $(GRIDS); do $(VENV)/bin/papermill nbs/ablation.ipynb runs/$$g.ipynb -p grid $$g -p seeds $(SEEDS) \
		-p workers $(WORKERS) $(SWEEP_ARGS) || exit 1; done
	$(VENV)/bin/papermill nbs/tables.ipynb runs/tables.ipynb $(TABLE_ARGS)

# Developer helpers: regenerate synernet/ from the notebooks, and clean the notebooks.
export: install
	$(VENV)/bin/nbdev_export
clean-nbs: install
	$(VENV)/bin/nbdev_clean
