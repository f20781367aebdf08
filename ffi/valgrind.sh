#!/usr/bin/env bash
# Runs the C example and the C contract test (tests/c/api_test.c) under valgrind memcheck
# against libmassv.so: no invalid reads/writes, no use of uninitialised memory, and no
# definite or indirect leaks. Exits non-zero on any of them.
#
#   ffi/valgrind.sh [--release]        (default: the dev profile, as `cargo test` builds it)
#
# "Possibly lost" and "still reachable" blocks are not counted: they are process-lifetime
# statics of Rust dependencies (lazily built tables of minijinja and tokenizers, the rayon
# pool), allocated once whatever the number of engines and generations.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dev
dir=target/debug
if [ "${1:-}" = "--release" ]; then
  profile=release
  dir=target/release
fi
command -v valgrind >/dev/null || { echo "error: valgrind is not installed" >&2; exit 1; }
cc="${CC:-cc}"

echo "== building libmassv ($profile)"
cargo build --profile "$profile" -p massv-ffi
lib="$(pwd)/$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for prog in examples/generate tests/c/api_test; do
  "$cc" -std=c99 -g -O1 -Wall -Wextra -Werror -pedantic -pthread -I ffi/include "ffi/$prog.c" \
    -L "$lib" -lmassv "-Wl,-rpath,$lib" -o "$tmp/$(basename "$prog")"
done

vg=(valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect
    --show-leak-kinds=definite,indirect --track-origins=yes)
fx=tests/fixtures
status=0
run() {
  local name="$1"; shift
  local start=$SECONDS
  echo "== valgrind: $name"
  if "${vg[@]}" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err"; then
    echo "   clean ($((SECONDS - start)) s)"
  else
    echo "   FAILED (exit $?, $((SECONDS - start)) s):"
    tail -n 60 "$tmp/$name.err"
    status=1
  fi
}
run generate "$tmp/generate" --device cpu --max-new-tokens 32 "$fx/qwen2_5_vl-tiny-hub" \
  "$fx/images/nonsquare_150x100.png" "Describe the image."
run generate-drafter "$tmp/generate" --device cpu --max-new-tokens 16 --gamma 3 "$fx/qwen2-tiny-gqa4-tied" \
  "$fx/qwen2-tiny-mha-untied" - "Tell me a story about a cat."
if [ -d "$fx/drafter-tiny-massv" ]; then
  run generate-massv "$tmp/generate" --device cpu --max-new-tokens 16 --gamma 3 "$fx/qwen2_5_vl-tiny-hub" \
    "$fx/drafter-tiny-massv" "$fx/images/nonsquare_150x100.png" "Describe the image."
else
  echo "== valgrind: generate-massv SKIPPED ($fx/drafter-tiny-massv does not exist yet)"
fi
run api_test "$tmp/api_test" "$fx/qwen2_5_vl-tiny-hub" "$fx/images/nonsquare_150x100.png" "$fx/qwen2-tiny-gqa4-tied"
grep -q "checks passed" "$tmp/api_test.out" || { echo "api_test did not finish"; status=1; }
exit $status
