#!/usr/bin/env bash
# The portable profile promises edge boxes without AVX (APU2, Atom): no
# instruction of ours may touch ymm/zmm registers. DPDK's shared libraries
# choose their SIMD path at run time and are not part of this binary.
set -euo pipefail
bin=$1 profile=$2
if [ "$profile" != portable ]; then
  echo "profile $profile: no ISA restriction to check"; exit 0
fi
n=$(objdump -d --no-show-raw-insn "$bin" | grep -cE '%[yz]mm[0-9]' || true)
echo "$bin: $n instructions using ymm/zmm registers"
[ "$n" -eq 0 ]
