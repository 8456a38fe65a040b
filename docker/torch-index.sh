#!/bin/sh
# torch-index.sh FLAVOR CUDA_VERSION: the PyTorch wheel index for an image flavour (run by
# docker/Dockerfile). The CUDA one follows the CUDA release of the image's base
# (12.8.1 -> https://download.pytorch.org/whl/cu128), so wheels and base cannot disagree; the
# CPU one keeps the CUDA libraries (GBs) out of the CPU image.
set -eu
flavor="${1:-}"
cuda="${2:-}"
case "$flavor" in
  cpu)
    echo https://download.pytorch.org/whl/cpu ;;
  cuda)
    tag=$(echo "$cuda" | sed -n 's/^\([0-9][0-9]*\)\.\([0-9][0-9]*\)\(\.[0-9][0-9]*\)\{0,1\}$/cu\1\2/p')
    if [ -z "$tag" ]; then
      echo "torch-index.sh: CUDA_VERSION '$cuda' is not MAJOR.MINOR[.PATCH], e.g. 12.8.1" >&2
      exit 1
    fi
    echo "https://download.pytorch.org/whl/$tag" ;;
  *)
    echo "torch-index.sh: FLAVOR '$flavor' is not cpu or cuda" >&2
    exit 1 ;;
esac
