#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a GPU lease that holds torch, transformers and little else
# (no network there): Assay's serve and train closure minus what that image already has, pinned to
# the versions this repository's .venv runs, for CPython 3.12 on x86-64 Linux. About 14 MB, into
# .whl/ (ignored by git; name it in the device call's `carry`). See bench/README.md, gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    annotated-types==0.8.0 antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill==0.4.1 fastapi==0.136.3 \
    grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 httpcore2==2.16.2 httptools==0.9.0 \
    httpx2==2.16.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 latex2sympy2-extended==1.11.0 \
    math-verify==0.9.0 multiprocess==0.70.19 pebble==5.2.3 protobuf==7.36.2 pydantic==2.14.4 \
    pydantic-core==2.50.5 python-dotenv==1.2.4 referencing==0.37.0 rpds-py==2026.9.1 starlette==1.10.0 \
    truststore==0.10.5 typing-inspection==0.4.5 tzdata==2026.6 uvicorn==0.54.0 watchfiles==1.3.0 websockets==17.4
ls .whl | wc -l
