#!/usr/bin/env bash
# Builds the fwdllm-agent and fwdllm-aggregator Debian packages.
#
#   cross/build.sh amd64     native build          (make deb)
#   cross/build.sh arm64     cross build for boards (make cross; then cross/smoke-arm64.sh)
#
# Packages land in cross/out/<arch>/. Missing toolchain pieces are installed (apt as
# root or with passwordless sudo; cargo-deb into .cache/cargo-deb). Environment:
#   CARGO_TARGET_DIR        where cargo builds (default: target/deb)
#   RUSTFLAGS               default: -C target-cpu=x86-64-v3 (amd64), none (arm64)
#   FWDLLM_CROSS_ROUTE      arm64 toolchain: "rustup" (default when rustup can add the
#                           target) or "debian" (Debian rustc-web + libstd-rust-web-dev:arm64,
#                           run from /usr/bin with its own CARGO_HOME, never shadowing rustup)
#   FWDLLM_DEB_OUT          output directory (default: cross/out/<arch>)
#   FWDLLM_PACKAGES         which packages (default: "fwdllm-agent fwdllm-aggregator")
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
arch="${1:-}"
case "$arch" in
  amd64) triple="" ;;
  arm64) triple="aarch64-unknown-linux-gnu" ;;
  *) echo "usage: cross/build.sh amd64|arm64" >&2; exit 2 ;;
esac
out="${FWDLLM_DEB_OUT:-$root/cross/out/$arch}"
read -r -a packages <<<"${FWDLLM_PACKAGES:-fwdllm-agent fwdllm-aggregator}"
# Packages target a portable CPU baseline, not the build host (.cargo/config.toml uses
# target-cpu=native for local builds); RUSTFLAGS replaces those flags. A target directory of
# their own keeps the two flag sets from rebuilding each other's llama.cpp.
case "$arch" in
  amd64) export RUSTFLAGS="${RUSTFLAGS:--C target-cpu=x86-64-v3}" ;;
  arm64) export RUSTFLAGS="${RUSTFLAGS:-}" ;;
esac
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/deb}"
cargo_deb_version=3.8.0

log() { echo "cross/build.sh: $*" >&2; }

# --- apt packages ------------------------------------------------------------------
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else
    log "need root to run: $*"
    log "run it yourself (or this script as root) and try again"
    exit 1
  fi
}

apt_updated=0
need_apt() { # pkg[:arch]... -> installs the ones not installed
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if printf '%s\n' "${missing[@]}" | grep -q ':arm64$' && ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "enabling the arm64 dpkg architecture (multiarch)"
    as_root dpkg --add-architecture arm64
    apt_updated=0
  fi
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- cargo-deb -----------------------------------------------------------------------
cargo_deb_root="$root/.cache/cargo-deb"
if [ -x "$cargo_deb_root/bin/cargo-deb" ]; then
  cargo_deb="$cargo_deb_root/bin/cargo-deb"
elif command -v cargo-deb >/dev/null; then
  cargo_deb="$(command -v cargo-deb)"
else
  log "installing cargo-deb $cargo_deb_version into $cargo_deb_root"
  cargo install --quiet --locked cargo-deb --version "$cargo_deb_version" --root "$cargo_deb_root"
  cargo_deb="$cargo_deb_root/bin/cargo-deb"
fi

# dpkg-shlibdeps computes Depends ($auto in the [package.metadata.deb] sections).
need_apt dpkg-dev

# --- toolchain -----------------------------------------------------------------------
cargo=(cargo)
target_args=()
if [ "$arch" = arm64 ]; then
  # The cross compilers; libc6/libstdc++6/libgcc-s1:arm64 (multiarch) let dpkg-shlibdeps
  # resolve arm64 Depends and give qemu-aarch64-static the target's own loader at
  # /lib/ld-linux-aarch64.so.1, so the smoke test needs no -L.
  need_apt gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu \
    qemu-user-static libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64

  route="${FWDLLM_CROSS_ROUTE:-}"
  if [ -z "$route" ]; then
    route=debian
    if command -v rustup >/dev/null; then
      if rustup target list --installed | grep -qx "$triple" || rustup target add "$triple" >&2; then
        route=rustup
      else
        log "rustup cannot add $triple here; falling back to Debian's rustc-web"
      fi
    fi
  fi
  if [ "$route" = debian ]; then
    # rustc-web and its arm64 std must be exactly the same version, so pin all three to
    # rustc-web's candidate instead of trusting two independent resolutions.
    need_apt rustc-web
    v=$(dpkg-query -W -f='${Version}' rustc-web)
    if [ "$(dpkg-query -W -f='${Version}' libstd-rust-web-dev:arm64 2>/dev/null || true)" != "$v" ] ||
       [ "$(dpkg-query -W -f='${Version}' cargo-web 2>/dev/null || true)" != "$v" ]; then
      need_apt libc6:arm64 # also enables the arm64 architecture
      log "installing cargo-web=$v libstd-rust-web-dev:arm64=$v"
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "cargo-web=$v" "libstd-rust-web-dev:arm64=$v" >/dev/null
    fi
    export CARGO_HOME="$root/.cache/cargo-debian"
    export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
    cargo=(/usr/bin/cargo)
    log "using $(/usr/bin/rustc --version) from Debian (CARGO_HOME=$CARGO_HOME)"
  fi

  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
  export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  # cargo-deb strips with these rather than the host's binutils.
  export STRIP_aarch64_unknown_linux_gnu=aarch64-linux-gnu-strip
  export OBJCOPY_aarch64_unknown_linux_gnu=aarch64-linux-gnu-objcopy
  # llama-cpp-sys-2 pins Linux aarch64 to GGML_CPU_ARM_ARCH=armv8-a (runs on Pi 4 and
  # up); see cross/README.md for why we keep that rather than dynamic-backends.
  target_args=(--target "$triple")
fi

# --- build and package -----------------------------------------------------------------
bin_args=()
for pkg in "${packages[@]}"; do
  case "$pkg" in fwdllm-agent|fwdllm-aggregator) ;; *) log "unknown package $pkg"; exit 2 ;; esac
  for f in "systemd/$pkg.service" "systemd/$pkg.toml" cross/README.md; do
    [ -f "$f" ] || { log "missing $f (packaged as an asset of $pkg)"; exit 1; }
  done
  bin_args+=(-p "$pkg" --bin "$pkg")
done

start=$(date +%s)
log "building release binaries${triple:+ for $triple} (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
"${cargo[@]}" build --release "${target_args[@]}" "${bin_args[@]}"
log "build took $(( $(date +%s) - start )) s"

mkdir -p "$out"
for pkg in "${packages[@]}"; do
  # cargo-deb is a cargo subcommand: it finds cargo through $CARGO.
  CARGO="${cargo[0]}" "$cargo_deb" -p "$pkg" --no-build "${target_args[@]}" --output "$out/" >&2
done
ls -1 "$out"/*.deb
