#!/usr/bin/env bash
# A/B of the QoS end-to-end ratio: main's HEAD (base) against qos2 (new), one
# repetition each, alternating base new new base base new, each under the lock.
cd /work/wt-qos2
i=0
for v in base new new base base new; do
  i=$((i+1))
  if [ $v = base ]; then b=/work/wt-qos2-base/build; else b=/work/wt-qos2/build; fi
  echo "== $i $v $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  REPS=1 SAS_LIST=4096 TOGGLES=8 TOGGLE_S=2 flock /tmp/moat-bench.lock bench/qos-runs.sh $b /tmp/qos2-e2e/$i-$v > /tmp/qos2-e2e/$i-$v.out 2>&1
  echo "rc $? $(date -u +%T)"; grep -E "^\|" /tmp/qos2-e2e/$i-$v.out
done
