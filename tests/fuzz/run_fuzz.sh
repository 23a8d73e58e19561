#!/bin/bash
# Builds the IKEv2 parser fuzz target with clang (libFuzzer, ASan, UBSan) and
# runs it for a bounded time (FUZZ_SECONDS, default 30) from a seed corpus of
# valid messages. Fails on any crash, leak or sanitizer report.
set -eu
SRC="${MOAT_SRC:?set MOAT_SRC to the source tree}"
SECS="${FUZZ_SECONDS:-30}"
command -v clang++ >/dev/null || { echo "FAIL: clang++ missing (scripts/setup.sh installs clang)"; exit 1; }
OUT="$(mktemp -d /tmp/moat-fuzz.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
cd "$OUT"
clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I"$SRC" \
    "$SRC"/tests/fuzz/fuzz_ike.cc "$SRC"/ctrl/ike/{types,message,crypto,cert,engine}.cc \
    -o fuzz_ike $(pkg-config --cflags --libs fmt openssl)
mkdir corpus
# Seeds: real strongSwan IKE_SA_INIT messages are in the unit tests' style; a
# minimal valid header and chains give the fuzzer a start.
printf '\x11\x22\x33\x44\x55\x66\x77\x88\x00\x00\x00\x00\x00\x00\x00\x00\x21\x20\x22\x08\x00\x00\x00\x00\x00\x00\x00\x24\x00\x00\x00\x08\x00\x00\x00\x00' >corpus/init
./fuzz_ike -max_total_time="$SECS" -max_len=2048 -print_final_stats=1 corpus 2>&1 | tail -15
