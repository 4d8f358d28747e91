#!/usr/bin/env bash
# Fashion-MNIST for tests and benchmarks: Debian's dataset-fashion-mnist package puts the
# four IDX files in /usr/share/datasets/fashion-mnist/. Nothing is downloaded at run time.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist'" >&2; exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
