# vae-serve: train and export a VAE, serve it over gRPC on ONNX Runtime.
# `make serve` and `make test` are all a newcomer needs; the rest are named as a reader guesses.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MODEL_REPO ?= models
MODEL_NAME ?= mnist-vae
RUN_DIR ?= runs/default
MNIST ?= ../shared/data/mnist

# Large gRPC payloads: keep glibc from mmap-ing (and page-faulting) every ~1 MB reply.
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 134217728

.PHONY: install proto model serve test lint format bench-quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev,client]'
	touch $@

proto: install
	PATH=$(BIN):$$PATH $(PY) -m grpc_tools.protoc -Iservice/proto=proto \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. proto/vae/v1/vae.proto \
		proto/inference/v2/grpc_predict_v2.proto

# Train and export the default model, unless the repository already holds a version of it.
model: install
	@if ls $(MODEL_REPO)/$(MODEL_NAME)/*/manifest.json >/dev/null 2>&1; then \
		echo "$(MODEL_REPO)/$(MODEL_NAME) already has a model version; 'make clean-models' to retrain"; \
	else \
		$(BIN)/vae-train --out $(RUN_DIR) && \
		$(BIN)/vae-export --checkpoint $(RUN_DIR)/best.pt --model-repo $(MODEL_REPO) --name $(MODEL_NAME) \
			--k 1000; \
	fi

serve: model
	$(BIN)/vae-serve --model-repo $(MODEL_REPO) --model-name $(MODEL_NAME)

test: model
	$(PY) -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy export service vae_client vae_data tests bench

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Quality on the full MNIST (not a test): the 1,000 epochs trained in 4,978 s (a median 4.69 s
# an epoch on a shared host) and the k=5000 evaluation of the 10,000 test images took 716 s
# (bench/results/quality.json). Two torch threads assume free cores (BENCH_QUALITY_THREADS=1 on shared
# ones: same results, bit for bit).
BENCH_QUALITY_EPOCHS ?= 1000
BENCH_QUALITY_THREADS ?= 2
bench-quality: install
	$(BIN)/vae-train --data-dir $(MNIST) --out runs/mnist-full --epochs $(BENCH_QUALITY_EPOCHS) \
		--threads $(BENCH_QUALITY_THREADS)
	$(BIN)/vae-evaluate --checkpoint runs/mnist-full/best.pt --data-dir $(MNIST) --k 5000 \
		--threads $(BENCH_QUALITY_THREADS) --out bench/results/quality.json

clean-models:
	rm -rf $(MODEL_REPO)/$(MODEL_NAME) $(RUN_DIR)

# ---- Throughput (bench/run_bench.py; README "Performance") ----
# The service against the in-process limit, the no-op gRPC floor and the peers' last
# `make bench-peers`, in one run: servers on core 0, the load on core 1. 68 load points of
# BENCH_WARMUP + BENCH_DURATION seconds: about 13 minutes at the defaults.
BENCH_DURATION ?= 8
BENCH_WARMUP ?= 1
BENCH_PROFILE_DURATION ?= 15
LATEST_MODEL = $$(ls -d $(MODEL_REPO)/$(MODEL_NAME)/*/ | sort -V | tail -1)

.PHONY: bench bench-profile bench-hot-path

bench: model
	$(PY) -m bench.run_bench $(LATEST_MODEL) --duration $(BENCH_DURATION) --warmup $(BENCH_WARMUP)

# The hot path's per-call costs README quotes (PNG encoding, in-place replies, the allocator):
# in process, about 30 s; bench/results/hot_path.json.
bench-hot-path: install
	$(PY) -m bench.hot_path

# Where the server's time goes at Sample(1) and Sample(1024): py-spy, bench/results/profile.md.
bench-profile: model
	$(PY) -m bench.profile $(LATEST_MODEL) --duration $(BENCH_PROFILE_DURATION)

# The README's pictures of the latent space (docs/explore/*.png): serves the default model on a
# free loopback port, runs the vae-client exploration commands against it, then stops it.
.PHONY: explore
# The commands and their summaries go to docs/explore/summary.txt, which the README quotes.
explore: model
	$(PY) -m vae_client.gallery --model-repo $(MODEL_REPO) --model-name $(MODEL_NAME) \
		--out docs/explore > docs/explore/summary.log
	sed -e 's|$(CURDIR)/||' -e '/^vae-serve on /d' docs/explore/summary.log > docs/explore/summary.txt
	rm docs/explore/summary.log && cat docs/explore/summary.txt

# ---- Reliability (bench/reliability.py; README "Reliability and security") ----
# The long runs behind the reliability tests: thousands of fuzz cases, open-loop overload at
# 4x capacity, SIGTERM and SIGKILL under load, model reloads under load, TLS faults and a
# 3-minute soak, against real vae-serve processes (its scenarios took 292 s together in the
# last run, their wall_seconds), results in bench/results/reliability.json.
# E.g. RELIABILITY_ARGS="--only fuzz,soak --soak-seconds 60".
RELIABILITY_ARGS ?=

.PHONY: reliability

reliability: model
	$(PY) -m bench.reliability $(RELIABILITY_ARGS)

# ---- Peers (benchmark only, bench/peers/README.md) ----
# Triton through PyTriton and Seldon MLServer serve the same decoder.onnx, each from its own venv
# (never the project's); `make bench-peers` drives both and writes bench/results/peers.json.
PEERS := bench/peers
PEERS_PYTHON ?= $(PYTHON)
PEERS_MODEL_DIR ?=
PEERS_ARGS ?= --duration 5 --warmup 1

.PHONY: peers bench-peers

peers: $(PEERS)/.venv-triton/perf-libs $(PEERS)/.venv-mlserver/.installed

$(PEERS)/.venv-%/.installed: $(PEERS)/requirements-%.txt
	rm -rf $(PEERS)/.venv-$*
	$(PEERS_PYTHON) -m venv $(PEERS)/.venv-$*
	$(PEERS)/.venv-$*/bin/pip install -q -r $<
	touch $@

# perf_analyzer (tritonclient wheel) finds two of its libraries in the PyTriton wheel.
$(PEERS)/.venv-triton/perf-libs: $(PEERS)/.venv-triton/.installed
	mkdir -p $@
	libs=$$(echo $(PEERS)/.venv-triton/lib/python3*/site-packages/nvidia_pytriton.libs) && \
	ln -sf "$$(realpath $$libs/libb64-*.so.0d)" $@/libb64.so.0d && \
	ln -sf "$$(realpath $$libs/libcudart-*.so.12.*)" $@/libcudart.so.12
	touch $@

# PEERS_MODEL_DIR=<repo>/<name>/<version> serves that version; else the newest of `make model`.
bench-peers: peers $(if $(PEERS_MODEL_DIR),,model)
	$(PY) $(PEERS)/run_peers.py \
		$(or $(PEERS_MODEL_DIR),$$(ls -d $(MODEL_REPO)/$(MODEL_NAME)/*/ | sort -V | tail -1)) \
		$(PEERS_ARGS)

# ---- The Open Inference Protocol's own clients (README "Open Inference Protocol") ----
# tritonclient and perf_analyzer in their own venv (tritonclient 2.51.0 pins protobuf<5 and
# numpy<2): the tritonclient tests in tests/v2 run when it exists. perf_analyzer also needs
# libb64 (Debian's libb64-0d, unpacked here, not installed) and libcudart (a wheel).
V2_CLIENT := $(PEERS)/.venv-tritonclient

.PHONY: v2-client

v2-client: $(V2_CLIENT)/perf-libs

$(V2_CLIENT)/perf-libs: $(V2_CLIENT)/.installed
	rm -rf $@ $@.deb && mkdir -p $@.deb
	cd $@.deb && { apt-get download libb64-0d 2>/dev/null || { apt-get update -q >/dev/null \
		&& apt-get download libb64-0d; }; } && dpkg -x libb64-0d_*.deb root
	mkdir -p $@.tmp
	cp -L $@.deb/root/usr/lib/*/libb64.so.0d $@.tmp/
	ln -sf "$$(realpath $(V2_CLIENT)/lib/python3*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12)" \
		$@.tmp/libcudart.so.12
	rm -rf $@.deb && mv $@.tmp $@

# V2 ModelInfer beside vae.v1 Sample for the same images (count 1, 64, 1024), then perf_analyzer
# at the same points: servers on core 0, load on core 1; bench/results/v2.json (about 1 minute).
BENCH_V2_ARGS ?= --duration 3 --warmup 1

.PHONY: bench-v2

bench-v2: model v2-client
	$(PY) -m bench.v2_bench $(LATEST_MODEL) $(BENCH_V2_ARGS)

# ---- Containers and Kubernetes (deploy/README.md) ----
# docker where a daemon answers, else podman (`deploy/podman/setup.sh` installs it on Debian).
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
KUBECTL ?= kubectl
IMAGE ?= vae-serve
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# baked: models/$(MODEL_NAME) goes into the image; mounted: the image expects a volume at /models.
MODEL_SOURCE ?= baked
OVERLAY ?= cpu
MANIFESTS_DIR ?= deploy/rendered
# The Python base image (Dockerfile.cpu's PYTHON_IMAGE); empty: the Dockerfile's registry default.
PYTHON_IMAGE ?=
# A base made here from Debian's packages, for machines that reach no image registry.
LOCAL_BASE_IMAGE ?= localhost/vae-serve-base:bookworm
# podman 4.3 resolves `FROM model-${MODEL_SOURCE}` only with every stage built; RUN steps trust
# this machine's CA bundle (a proxy may intercept TLS to the package index), mounted so that
# it never lands in a layer.
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
PODMAN_BUILD_FLAGS = --skip-unused-stages=false \
	$(if $(wildcard $(CA_BUNDLE)),--volume $(CA_BUNDLE):/etc/ssl/certs/ca-certificates.crt:ro)
BUILD_FLAGS = $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	$(if $(filter podman,$(notdir $(CONTAINER_ENGINE))),$(PODMAN_BUILD_FLAGS))

NO_ENGINE = no container engine is running ('$(CONTAINER_ENGINE) info' failed): start one, \
	set CONTAINER_ENGINE, or run 'make image-base' (installs podman)

.PHONY: image image-gpu image-base image-test deploy manifests

# vae-serve:<version> (CPU) and vae-serve:<version>-gpu. The model is trained first if missing.
image: DOCKERFILE := deploy/docker/Dockerfile.cpu
image: TAG = $(IMAGE_TAG)
image-gpu: DOCKERFILE := deploy/docker/Dockerfile.gpu
image-gpu: TAG = $(IMAGE_TAG)-gpu
image image-gpu:
	@$(CONTAINER_ENGINE) info >/dev/null 2>&1 || { echo "make $@: $(NO_ENGINE)" >&2; exit 1; }
	$(if $(filter baked,$(MODEL_SOURCE)),@$(MAKE) --no-print-directory model)
	$(CONTAINER_ENGINE) build -f $(DOCKERFILE) $(BUILD_FLAGS) --build-arg MODEL_SOURCE=$(MODEL_SOURCE) \
		--build-arg MODEL_NAME=$(MODEL_NAME) -t $(IMAGE):$(TAG) .

# podman, runc and a Python base image made locally with mmdebstrap (no registry needed).
image-base:
	deploy/podman/setup.sh

# Build the CPU image twice (model baked; model mounted) on the local base and run it for real:
# read-only and non-root, the RPCs through the SDK, metrics, JSON logs, a drain under load, a
# rolling update, `podman kube play` of the CPU overlay. Figures to bench/results/image.json.
# Skipped, with the reason, only where no container engine can be installed (not root).
image-test: install model
	@deploy/podman/setup.sh || { status=$$?; if [ $$status = 3 ]; then \
		echo "make image-test: SKIPPED: no container engine here, and none can be installed"; \
		exit 0; fi; exit $$status; }; \
	$(MAKE) --no-print-directory image CONTAINER_ENGINE=podman PYTHON_IMAGE=$(LOCAL_BASE_IMAGE) \
		&& $(MAKE) --no-print-directory image CONTAINER_ENGINE=podman \
			PYTHON_IMAGE=$(LOCAL_BASE_IMAGE) MODEL_SOURCE=mounted IMAGE_TAG=$(IMAGE_TAG)-nomodel \
		&& podman image prune --force >/dev/null \
		&& VAE_TEST_IMAGE=$(IMAGE):$(IMAGE_TAG) VAE_TEST_IMAGE_NOMODEL=$(IMAGE):$(IMAGE_TAG)-nomodel \
			VAE_TEST_MODEL_REPO=$(MODEL_REPO) $(PY) -m pytest tests/image -p no:cacheprovider

# Apply an overlay (OVERLAY=cpu or gpu) to the current kubectl context and wait for the rollout.
deploy:
	$(KUBECTL) apply -k deploy/k8s/overlays/$(OVERLAY)
	$(KUBECTL) --namespace vae-serve rollout status deployment/vae-serve --timeout=10m

# Render every overlay to $(MANIFESTS_DIR)/<overlay>.yaml, to read or to hand to GitOps.
manifests:
	@mkdir -p $(MANIFESTS_DIR)
	@for overlay in cpu gpu; do \
		$(KUBECTL) kustomize deploy/k8s/overlays/$$overlay > $(MANIFESTS_DIR)/$$overlay.yaml || exit 1; \
		echo "$(MANIFESTS_DIR)/$$overlay.yaml"; \
	done
