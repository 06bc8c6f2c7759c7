#!/usr/bin/env bash
# Host packages from Debian that the image build, QEMU boots and integration tests use.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v mkfs.erofs >/dev/null || need+=(erofs-utils)  # the image's root filesystem
# The test suite also renders the dashboard in headless Chromium and compiles the stand-in
# libcuda.so.1 that runs the GPU code through cuda-python's real bindings.
if [ "${1:-}" = "--tests" ]; then
    command -v chromium >/dev/null || need+=(chromium)
    command -v cc >/dev/null || need+=(gcc libc6-dev)
    # veritysetup: the tests compare the image's dm-verity hash trees with cryptsetup's
    command -v veritysetup >/dev/null || need+=(cryptsetup-bin)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "ukgpu: please install: ${need[*]} (apt-get install ${need[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
