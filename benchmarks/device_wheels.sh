#!/usr/bin/env bash
# The GPU machine has no package registry and lacks what the HTTP front, structured output and the gRPC extras
# need (fastapi, uvicorn, httpx, xgrammar, grpcio-health-checking, ...; DESIGN.md section 6). Bring them as wheels
# (and a 128k tokenizer for bench_structured, wheels/tekken-tokenizer):
#   bash benchmarks/device_wheels.sh fetch     # here: downloads the Python 3.12 wheels into wheels/ (~9 MB, ignored)
#   bash benchmarks/device_wheels.sh install   # there (run's carry=["wheels"]): installs them where they only add
# `install` puts them in a directory appended after site-packages (a .pth file), so every package the machine
# already has (pydantic, numpy, torch, ...) keeps its own version and only the missing ones come from here.
set -euo pipefail
WHEELS=(fastapi starlette annotated-doc opentelemetry-api uvicorn httptools uvloop click h11 httpx httpcore anyio idna
        certifi pydantic pydantic-core typing-inspection annotated-types typing-extensions xgrammar apache-tvm-ffi
        prometheus-client
        "grpcio-health-checking==1.84.*" "grpcio-reflection==1.84.*" importlib-metadata zipp)
case "${1:-}" in
  fetch)
    pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
      --platform manylinux_2_28_x86_64 --platform any -d wheels "${WHEELS[@]}"
    # A real 128k vocabulary for bench_structured on presets (benchmarks/wide_tokenizer.py): Tekken, from the
    # mistral-common wheel, which is downloaded aside and not installed there.
    pip download --no-deps -d wheels/tekken mistral-common
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], "wheels/tekken")' \
      wheels/tekken/mistral_common-*.whl mistral_common/data/tekken_240911.json
    PYTHONPATH=. python3 benchmarks/wide_tokenizer.py wheels/tekken/mistral_common/data/tekken_240911.json \
      wheels/tekken-tokenizer
    rm -rf wheels/tekken
    ;;
  install)
    extra=/tmp/nexus-extra
    if python3 -m pip --version > /dev/null 2>&1; then
      python3 -m pip install --quiet --no-deps --no-index --target "$extra" wheels/*.whl
    else  # a wheel is a zip laid out for site-packages: unpacking it is an install without the metadata scripts
      python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$extra" wheels/*.whl
    fi
    echo "$extra" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/nexus-extra.pth"
    python3 -c 'import fastapi, uvicorn, httptools, uvloop, httpx, xgrammar, grpc_health; print("device wheels: ok")'
    ;;
  *)
    echo "usage: bash benchmarks/device_wheels.sh fetch|install" >&2
    exit 2
    ;;
esac
