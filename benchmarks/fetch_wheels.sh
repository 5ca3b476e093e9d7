#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.sh installs on the GPU machine (Python 3.12, x86_64,
# no network there). Run here, from anywhere; writes <repo>/.whl/ (git-ignored, ~16 MB).
#
# The GPU machine already has torch, torchvision, pytorch-lightning, torchmetrics, opencv,
# matplotlib, scipy, pandas, rich, h5py, ml-dtypes, numpy, pillow, tqdm, PyYAML and
# typing-extensions. What bench.py (and the CLI) need on top of that:
#   captum; jsonargparse + docstring-parser + typeshed-client (the CLI's [signatures]);
#   keras + namex + optree + absl-py (the Keras peer, KERAS_BACKEND=torch);
#   grad-cam + ttach + scikit-learn + joblib + threadpoolctl (pytorch_grad_cam imports
#   sklearn at import time; scikit-learn 1.7 because 1.8+ also pulls narwhals/cloudpickle).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl

PINS=(
  captum==0.9.0
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
  keras==3.15.1 namex==0.1.0 optree==0.20.0 absl-py==2.5.1
  ttach==0.0.3 scikit-learn==1.7.2 joblib==1.5.2 threadpoolctl==3.6.0
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${PINS[@]}"

# grad-cam is published as an sdist only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl grad-cam==1.5.7

ls -l .whl
du -sh .whl
