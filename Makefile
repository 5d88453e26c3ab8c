# Two commands: `make test` (what CI runs) and `make demo`. Both create/reuse the virtualenv in $(VENV) and install
# the project with the pinned versions of ci/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_DIR ?= output_dir/demo

.PHONY: venv test demo demo-seg bench clean

$(STAMP): setup.py ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c ci/constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# A tiny Scale-MAE on built-in synthetic scenes, on CPU, in about a minute: progress display, checkpoints,
# TensorBoard logs, reconstruction PNGs and a multiscale kNN table. Rerunning resumes (delete $(DEMO_DIR) to restart).
DEMO_FLAGS = --config config/demo.yaml --model mae_vit_tiny_patch16 --input_size 64 --batch_size 32 --epochs 8 \
	--warmup_epochs 1 --blr 5e-3 --device cpu --num_workers 1 --print_freq 8 --checkpoint_interval 4 \
	--eval_dataset demo --eval_scale 32 64 --eval_base_resolution 3.75 --knn_eval_freq 4 \
	--output_dir $(DEMO_DIR) --log_dir $(DEMO_DIR)

demo: $(STAMP)
	$(PY) main_pretrain.py $(DEMO_FLAGS)
	@echo
	@echo "Demo finished. Look at:"
	@echo "  $(DEMO_DIR)/vis/*.png             reconstructions (masked input, target, high/low/combined bands)"
	@echo "  $(DEMO_DIR)/knn-epoch0008.md      multiscale kNN table (also .json and an accuracy-vs-scale .png)"
	@echo "  $(DEMO_DIR)/log.txt               one JSON line per epoch;  checkpoints: $(DEMO_DIR)/checkpoint-*.pth"
	@echo "  $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)   loss, lr, grad norm, images/s, reconstructions"

# Building segmentation (UPerNet on a tiny encoder) on synthetic georeferenced scenes written to a temporary folder:
# GeoTIFF tiles in UTM + building polygons in EPSG:4326; prints the per-scale IoU table. Rerunning resumes.
DEMO_SEG_DIR ?= output_dir/demo-seg
DEMO_SEG_FLAGS = --model vit_tiny_patch16 --allow_random_init --input_size 64 --batch_size 16 --epochs 8 --warmup_epochs 1 --blr 1e-2 \
	--layer_decay 1.0 --head_channels 64 --aux_channels 32 --device cpu --num_workers 1 --print_freq 8 --eval_freq 4 \
	--eval_scales 1.0 0.75 0.5 --object_f1 --save_predictions --polygonize --overlays \
	--output_dir $(DEMO_SEG_DIR) --log_dir $(DEMO_SEG_DIR)

demo-seg: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m dataloaders.seg_synthetic "$$tmp" && \
	$(PY) main_segment.py --config "$$tmp/seg_demo.yaml" $(DEMO_SEG_FLAGS)
	@echo
	@echo "Segmentation demo finished. Look at:"
	@echo "  $(DEMO_SEG_DIR)/seg-epoch0008.md       IoU table per evaluation scale (also .json and a .png plot)"
	@echo "  $(DEMO_SEG_DIR)/predictions/           GeoTIFF predictions (source transform/CRS), GeoPackages, overlay PNGs"
	@echo "  $(VENV)/bin/tensorboard --logdir $(DEMO_SEG_DIR)"

bench: $(STAMP)
	$(PY) bench/run.py --suite quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
