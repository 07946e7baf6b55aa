# tandem — one entry point for set-up, tests, the local stack and builds.
SHELL := /bin/bash
PY := .venv/bin/python
MODE ?= disagg
MODEL ?=
PREFILL ?= 1
DECODE ?= 1
TP ?= 1
EMBED ?=

.PHONY: setup codegen test test-tools test-fresh test-fast lint demo-models deploy-local stop-local pants package bench bench-micro clean
.PHONY: images images-docker test-images validate-deploy lock

# cpu: the CPU build of torch (dist/, default.lock); cuda: PyPI's CUDA 13 build for GPU workers
# (dist/cuda/, cuda.lock, build-support/pants-cuda.toml; only prefill and decode differ).
TORCH_VARIANT ?= cpu
ifeq ($(TORCH_VARIANT),cuda)
PANTS_VARIANT := "--pants-config-files=+['build-support/pants-cuda.toml']"
SERVICE_PEXES := services/prefill:: services/decode::
else ifeq ($(TORCH_VARIANT),cpu)
PANTS_VARIANT :=
SERVICE_PEXES := services/router:: services/prefill:: services/decode:: services/eplb::
else
$(error TORCH_VARIANT=$(TORCH_VARIANT): must be cpu or cuda)
endif

setup:  ## create .venv, install pinned deps, generate protobuf code (idempotent)
	@build-support/setup.sh

codegen:
	@build-support/codegen.sh

demo-models: setup  ## build the small demo checkpoints into models/ (offline, deterministic)
	@$(PY) -m deploy.demo_models --out models

test:  ## set-up, Debian tools and the Pants build side by side; then layering contracts, the whole test suite (slow tests too), the PEX smoke run, deploy-file checks; the time of each and the total
	@build-support/test.sh

test-tools:  ## the Debian tools tests run: Prometheus + promtool, etcd (installed when missing)
	@build-support/install-prometheus.sh
	@build-support/install-etcd.sh

test-fresh:  ## `make test` in a fresh clone of HEAD with a scrubbed environment (new HOME, no caches)
	@build-support/test-fresh.sh

test-fast: setup
	$(PY) -m pytest -q -x tests/unit

lint: setup  ## ruff (private reach-ins included) and the layering contracts (import-linter, pyproject.toml)
	$(PY) -m ruff check libs services tests benchmarks
	.venv/bin/lint-imports

bench-micro: setup demo-models  ## pytest-benchmark micro-benchmarks (routing, KV index, block hashing, detokenizer, config); saved in .benchmarks/, compared with the previous run
	$(PY) -m pytest -q benchmarks/micro --benchmark-only --benchmark-autosave --benchmark-compare \
	  --benchmark-columns=min,median,mean,iqr,rounds --benchmark-sort=name

deploy-local: setup demo-models  ## run the whole stack on loopback (Ctrl-C stops it)
	@build-support/install-prometheus.sh
	@MODE=$(MODE) MODEL=$(MODEL) PREFILL=$(PREFILL) DECODE=$(DECODE) EMBED=$(EMBED) TLS=$(TLS) TP=$(TP) LORA=$(LORA) $(PY) -m deploy.local.run

stop-local:
	@$(PY) -m deploy.local.run --stop

pants:  ## bootstrap Pants 2.17.1 and its offline tools into .tools/
	@build-support/pants-bootstrap.sh

package: pants  ## one PEX per service into dist/ (TORCH_VARIANT=cuda: the GPU workers into dist/cuda/)
	@build-support/pants $(PANTS_VARIANT) package $(SERVICE_PEXES)

lock: pants  ## regenerate the Pants lockfile (TORCH_VARIANT=cuda: 3rdparty/python/cuda.lock)
	@build-support/pants $(PANTS_VARIANT) generate-lockfiles --resolve=python-default

images: package  ## one OCI image per service into build/images/ (root; no Docker; TORCH_VARIANT=cpu|cuda)
	@build-support/install-image-tools.sh build
	@python3 build-support/images/build.py --variant $(TORCH_VARIANT)

images-docker: package  ## images, plus build/images/<name>.docker.tar for `docker load`
	@build-support/install-image-tools.sh build
	@python3 build-support/images/build.py --variant $(TORCH_VARIANT) --docker-archive

test-images: setup demo-models  ## run the built images: --help each, then the compose stack (podman-compose)
	@build-support/install-image-tools.sh test
	@$(PY) build-support/images/test_images.py

validate-deploy: setup  ## render the Kubernetes overlays and validate them (also part of make test)
	@$(PY) build-support/validate_deploy.py

clean:
	rm -rf gen .pytest_cache .ruff_cache dist .pants.d build
