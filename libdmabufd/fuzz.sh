#!/bin/sh
# Builds and runs the libFuzzer target for libdmabufd's decoder. `fuzz.sh` runs 30 s (a smoke run);
# `fuzz.sh SECONDS` runs longer. The corpus lives in build/fuzz-corpus (seeded by the unit tests' bytes).
set -eu
cd "$(dirname "$0")"
seconds=${1:-30}
make -s build/fuzz_decode FUZZ_CC="${FUZZ_CC:-clang}"
mkdir -p build/fuzz-corpus
exec ./build/fuzz_decode -max_total_time="$seconds" -max_len=65600 -print_final_stats=1 build/fuzz-corpus
