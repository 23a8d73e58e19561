#!/usr/bin/env bash
# Round 2: main's HEAD (base) against qos2 at 42d26d8 (new), alternating, each under the lock.
cd /work/wt-qos2
i=10
for v in base new new base base new new base; do
  i=$((i+1))
  if [ $v = base ]; then b=/work/wt-qos2-base/build; else b=/tmp/qos2-new2/build; fi
  echo "== $i $v $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  REPS=1 SAS_LIST=4096 TOGGLES=8 TOGGLE_S=2 flock /tmp/moat-bench.lock bench/qos-runs.sh $b /tmp/qos2-e2e/$i-$v > /tmp/qos2-e2e/$i-$v.out 2>&1
  echo "rc $? $(date -u +%T)"; grep -E "CPU second" /tmp/qos2-e2e/$i-$v.out
done
