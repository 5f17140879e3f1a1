#!/bin/sh
# Builds and runs the libFuzzer target for libdmabufd's decoder. `fuzz.sh` runs 30 s (a smoke run);
# `fuzz.sh SECONDS` runs longer. New inputs go to build/fuzz-corpus; the Swift fuzzer's committed seeds
# (../Fuzz/corpus/wire: an fd-count byte, then a message, which this target reads alike) seed it.
set -eu
cd "$(dirname "$0")"
seconds=${1:-30}
make -s build/fuzz_decode FUZZ_CC="${FUZZ_CC:-clang}"
mkdir -p build/fuzz-corpus
seeds=../Fuzz/corpus/wire
[ -d "$seeds" ] || seeds=
exec ./build/fuzz_decode -max_total_time="$seconds" -max_len=65600 -print_final_stats=1 build/fuzz-corpus $seeds
