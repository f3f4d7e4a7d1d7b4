#!/usr/bin/env bash
# Make sure the built-in default dataset (Fashion-MNIST, Debian's dataset-fashion-mnist) is there.
# Installs it with apt-get when it is missing and apt-get is usable; otherwise says what to do.
set -u
dir=/usr/share/datasets/fashion-mnist
if ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST missing: installing Debian's dataset-fashion-mnist"
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 && exit 0
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 && exit 0
fi
echo "Fashion-MNIST not found in $dir and could not be installed with apt-get." >&2
echo "Put the four IDX files (train-images-idx3-ubyte.gz ...) in a directory and pass --data-dir DIR" >&2
echo "(make demo ARGS='--data-dir DIR'); tests that need it are skipped." >&2
exit 0
