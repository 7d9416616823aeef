# make demo: set up .venv if needed, make the toy datasets, run the benchmark on CPU (a few minutes).
# make test: set up .venv if needed, run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAM2_SPEC := sam2>=1.1
# The venv is (re)installed when what it should hold changes, decided from the content of
# requirements.txt and the SAM 2 spec (a hash in the stamp's name), never from file times: a fresh
# clone next to an existing venv installs nothing.
REQ_HASH := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha256(open('requirements.txt', 'rb').read() + sys.argv[1].encode()).hexdigest()[:16])" '$(SAM2_SPEC)')
STAMP := $(VENV)/.installed-$(REQ_HASH)
TOY := data/toy

.PHONY: venv demo demo-compare test test-fast clean-demo

venv: $(STAMP)

# SAM 2 ships as a source archive whose build would fetch a second torch: it is built against ours,
# without its CUDA extension.
$(STAMP):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed, found " + sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --disable-pip-version-check -q --no-build-isolation '$(SAM2_SPEC)'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

TOY_ADE := data/toy_ade20k

data/.toy_done: tools/make_toy_data.py | $(STAMP)
	$(PY) tools/make_toy_data.py --out $(TOY) --ade20k_out $(TOY_ADE)
	@touch $@

# The benchmark on the toy data: a tiny MAE pretrained in three chunks, a Segmenter trained and
# scored after each (mIoU rises from chunk to chunk); ends with the results table and
# output_demo/miou_vs_epochs.png. tests/test_demo.py runs these settings and checks the rise.
DEMO_PRETRAIN := --input_size 64 --batch_size 16 --warmup_epochs 1 --blr 1.5e-2 --num_workers 2 --print_freq 6
DEMO_ARGS := --in1k-dir $(TOY) --ade20k-dir $(TOY_ADE) --output-dir output_demo \
	--mask-method four_channels --coverage-ratio 40 --model mae_vit_tiny_patch8 \
	--pretrain-epochs 18 --eval-freq 6 --seg-epochs 8 --crop-size 32 --seg-decoder linear \
	--pretrain-args "$(DEMO_PRETRAIN)" \
	--seg-args "--batch-size 8 --lr 0.01 --num-workers 2 --print-freq 5"

# Every mask method on the demo's harness (two chunks of 6 epochs), one run each, and the SAM
# methods' other segment choices, into output_compare/, each chunk scored by kNN, the frozen probe
# and the Segmenter; then one table and plot of them all (the README's "Comparing masking strategies").
COMPARE_ARGS := $(subst --pretrain-epochs 18,--pretrain-epochs 12,$(subst output_demo,output_compare,$(subst --mask-method four_channels ,,$(DEMO_ARGS)))) \
	--probe-eval --probe-args "--epochs 8 --batch-size 8 --lr 0.01 --num-workers 2 --print-freq 5" \
	--knn-eval --knn-bank-per-class 8 --knn-args "--num_workers 2 --batch_size 16"
COMPARE_METHODS := patches blocks blockwise noise segments four_channels preencoder segment_tokens

demo: $(STAMP) data/.toy_done
	$(PY) benchmark.py $(DEMO_ARGS)

demo-compare: $(STAMP) data/.toy_done
	for m in $(COMPARE_METHODS); do $(PY) benchmark.py $(COMPARE_ARGS) --mask-method $$m || exit 1; done
	$(PY) benchmark.py $(COMPARE_ARGS) --mask-method segments --pretrain-args "$(DEMO_PRETRAIN) --segment_choice random"
	$(PY) benchmark.py $(COMPARE_ARGS) --mask-method segment_tokens --pretrain-args "$(DEMO_PRETRAIN) --segment_choice union"
	$(PY) benchmark.py compare --output-dir output_compare

test: $(STAMP)
	$(PY) -m pytest -q -n auto tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow" tests

clean-demo:
	rm -rf output_demo output_compare $(TOY) $(TOY_ADE)
