# make demo: set up .venv if needed, make the toy dataset, pretrain a tiny MAE on CPU.
# make test: set up .venv if needed, run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
TOY := data/toy

.PHONY: venv demo test test-fast clean-demo

venv: $(STAMP)

# Re-installs only when requirements.txt changes (or the venv is missing).
$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed, found " + sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

$(TOY)/.done: tools/make_toy_data.py | $(STAMP)
	$(PY) tools/make_toy_data.py --out $(TOY)
	@touch $@

demo: $(STAMP) $(TOY)/.done
	$(PY) main_pretrain.py --data_path $(TOY) --mask_method four_channels --coverage_ratio 40 \
		--model mae_vit_tiny_patch8 --input_size 64 --batch_size 16 --epochs 8 --warmup_epochs 1 \
		--blr 1e-3 --num_workers 2 --print_freq 6 --save_freq 4 \
		--output_dir output_demo/pretrain --log_dir output_demo/pretrain
	@echo "Demo done: checkpoints, log.txt and TensorBoard logs are in output_demo/pretrain"

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean-demo:
	rm -rf output_demo $(TOY)
