#!/usr/bin/env bash
# Prints the oldest glibc / libstdc++ a binary can run with: the highest versioned symbol
# it imports from each (GLIBC_x, GLIBCXX_x, CXXABI_x, GCC_x), plus its NEEDED libraries.
#   cross/floor.sh target/deb/aarch64-unknown-linux-gnu/release/fwdllm-agent
set -euo pipefail
bin="${1:?usage: cross/floor.sh BINARY}"
objdump=objdump
if readelf -h "$bin" | grep -q 'Machine:.*AArch64'; then objdump=aarch64-linux-gnu-objdump; fi
syms=$("$objdump" -T "$bin")
for tag in GLIBC GLIBCXX CXXABI GCC; do
  v=$(grep -o "(${tag}_[0-9.]*)" <<<"$syms" | tr -d '()' | sed "s/^${tag}_//" | sort -V | tail -n1 || true)
  echo "$tag ${v:-none}"
done
readelf -d "$bin" | awk '/NEEDED/ {gsub(/[][]/, "", $5); print "NEEDED " $5}'
