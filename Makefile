# One entry per habit. `make serve` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= deploy/serve_config.yaml

.PHONY: install serve test prometheus browser nginx report lint format bench bench-multi-gpu \
  loadtest train-demo clean

# The virtualenv is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/serve $(CONFIG)

# The observability tests run a real Prometheus server, the page's tests a real browser
# and the front proxy's tests a real nginx: Debian's packages, installed as root here
# and in CI; elsewhere, put `prometheus`, `promtool`, `chromium` and `nginx` on PATH first.
test: prometheus browser nginx
test: install
	$(BIN)/python -m pytest

prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  scripts/apt-install prometheus

browser:
	@command -v chromium >/dev/null || scripts/apt-install chromium

# Debian's nginx is in /usr/sbin, which a non-root PATH may lack.
nginx:
	@PATH=$$PATH:/usr/sbin command -v nginx >/dev/null || scripts/apt-install nginx

# Stage-by-stage latency and VRAM peaks of a running service, e.g.
#   make report REPORT_ARGS='--config 1024x1024 --out report.md'
T2I_URL ?= http://127.0.0.1:8000
report: install
	$(BIN)/python -m serve_app.report --url $(T2I_URL) $(REPORT_ARGS)

# On a GPU machine: stock diffusers vs our engine vs the service, and the steps x guidance x
# size sweep of our engine, in one run; results to load_tests/results.
bench: install
	$(BIN)/python -m load_tests.bench_gpu $(BENCH_ARGS)

# On a machine of several GPUs: deploy/serve_config.multi_gpu.yaml laid out for them, images/s
# with one Denoiser and with one per other card (load_tests/bench_multi_gpu.py); results to
# load_tests/results/<gpu>-x<N>-<date>-multi-gpu.*. One model a call, the second appended:
#   make bench-multi-gpu BENCH_ARGS='--models sdxl --append'
bench-multi-gpu: install
	$(BIN)/python -m load_tests.bench_multi_gpu $(BENCH_ARGS)

# A short CPU run of the load tests against the embedded default, started here: capacity,
# then steady, burst, overload and a disconnect storm, ~2 min; reports to
# load_tests/results/cpu-*-loadtest-*. Fails on a 5xx but deliberate 503s, a wrong image
# or a replica stuck afterwards. Against a running service, e.g.
#   .venv/bin/python -m load_tests.loadtest --url $(T2I_URL) --metrics-url URL --scenario soak
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/python -m load_tests.loadtest --local --scenario steady burst overload storm \
	  --duration 15 --capacity-duration 10 $(LOADTEST_ARGS)

# Train the demo model (training/train_demo.py) into serve_app/data/demo, where `make serve`
# finds it: ~8 minutes on one H100/H200 (the README's "The demo model" says what the
# shipped weights took). TRAIN_ARGS='--plan cpu-resume --resume' continues it on a CPU.
DEMO_OUT ?= serve_app/data/demo
TRAIN_ARGS ?=
train-demo: install
	$(BIN)/python -m training.train_demo --out $(DEMO_OUT) $(TRAIN_ARGS)

lint: install
	$(BIN)/ruff check serve_app tests load_tests training deploy scripts
	$(BIN)/ruff format --check serve_app tests load_tests training deploy scripts

format: install
	$(BIN)/ruff format serve_app tests load_tests training deploy scripts
	$(BIN)/ruff check --fix serve_app tests load_tests training deploy scripts

clean:
	rm -rf $(VENV) .cache .pytest_cache
