#!/usr/bin/env bash
# Installs the C API of massv under a prefix: include/massv.h, lib/libmassv.{so,a} and
# lib/pkgconfig/massv.pc. Build first (cargo build --release -p massv-ffi).
#
#   ffi/install.sh PREFIX [BUILD_DIR]     BUILD_DIR defaults to target/release
#   MASSV_INSTALL_STATIC=0 ffi/install.sh PREFIX    skips libmassv.a
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 PREFIX [BUILD_DIR]" >&2
  exit 2
fi
prefix="$1"
build="${2:-$here/../target/release}"
if [ ! -f "$build/libmassv.so" ]; then
  echo "error: $build/libmassv.so not found; run: cargo build --release -p massv-ffi" >&2
  exit 1
fi
case "$prefix" in
  /*) ;;
  *) prefix="$(pwd)/$prefix" ;;
esac
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/Cargo.toml" | head -n 1)"

install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 644 "$here/include/massv.h" "$prefix/include/massv.h"
install -m 755 "$build/libmassv.so" "$prefix/lib/libmassv.so"
if [ "${MASSV_INSTALL_STATIC:-1}" != 0 ]; then
  install -m 644 "$build/libmassv.a" "$prefix/lib/libmassv.a"
fi
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/massv.pc.in" > "$prefix/lib/pkgconfig/massv.pc"
echo "installed massv $version under $prefix"
