#!/usr/bin/python3
"""Checks one interop case: strongSwan's view (swanctl --list-sas, charon's
log at chd=4) against moat-iked's (its --sa-log of ChildSaSink calls).

usage: swan_check.py LIST_SAS_FILE CHARON_LOG SA_LOG ROLE [expect-proposal]
  ROLE: moat's role in the exchange that created the newest CHILD SA,
        "i" (moat initiated it) or "r".
Exits 0 when: one IKE SA ESTABLISHED and a CHILD SA INSTALLED at
strongSwan; moat's newest installed CHILD SA has the mirrored SPIs; and
both sides derived the same ESP keys. Prints what it compared.
"""
import json
import re
import sys

list_sas, charon_log, sa_log, role = sys.argv[1:5]
expect = sys.argv[5] if len(sys.argv) > 5 else None
fail = []

text = open(list_sas).read()
ike = re.findall(r"#\d+, (\w+), IKEv2, ([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r", text)
child = re.findall(r"#\d+, reqid \d+, (\w+), [\w-]+, (ESP:\S+)", text)
ins = re.findall(r"^\s+in\s+([0-9a-f]{8})", text, re.M)
outs = re.findall(r"^\s+out\s+([0-9a-f]{8})", text, re.M)
print(f"strongSwan: IKE {ike} CHILD {child} in {ins} out {outs}")
if not any(s == "ESTABLISHED" for s, _, _ in ike):
    fail.append("no ESTABLISHED IKE SA at strongSwan")
if not any(s == "INSTALLED" for s, _ in child):
    fail.append("no INSTALLED CHILD SA at strongSwan")
if expect and expect not in text:
    fail.append(f"strongSwan's SAs do not show {expect}")

events = [json.loads(l) for l in open(sa_log) if l.strip()]
live = {}
for e in events:
    if e["event"] in ("install",):
        live[e["spi_in"]] = e
    elif e["event"] == "remove":
        live.pop(e["spi_in"], None)
if not live:
    fail.append("moat has no installed CHILD SA")
else:
    m = list(live.values())[-1]
    print(f"moat: in {m['spi_in']} out {m['spi_out']} {m['proposal']} encap={m['udp_encap']} "
          f"{m['local_ts']} === {m['remote_ts']}")
    if m["spi_in"] not in outs or m["spi_out"] not in ins:
        fail.append(f"SPIs differ: moat in/out {m['spi_in']}/{m['spi_out']}, strongSwan in {ins} out {outs}")
    if not m["udp_encap"]:
        fail.append("moat did not UDP-encapsulate although strongSwan claims a NAT")

    # charon (chd=4): "encryption initiator key => N bytes @ 0x..", then hexdump lines.
    keys = {}
    cur = None
    hexline = re.compile(r"\d+\[\w+\]\s+(?:<[^>]*>\s+)?\s*\d+:\s+((?:[0-9A-F]{2} ){1,16})")
    for line in open(charon_log, errors="replace"):
        mm = re.search(r"(encryption|integrity) (initiator|responder) key => \d+ bytes", line)
        if mm:
            cur = (mm.group(1), mm.group(2))
            keys[cur] = ""
            continue
        h = hexline.search(line)
        if h and cur:
            keys[cur] += h.group(1).replace(" ", "").lower()
        else:
            cur = None
    mine_out = "initiator" if role == "i" else "responder"
    mine_in = "responder" if role == "i" else "initiator"
    checks = [("encr_key_out", ("encryption", mine_out)), ("encr_key_in", ("encryption", mine_in)),
              ("integ_key_out", ("integrity", mine_out)), ("integ_key_in", ("integrity", mine_in))]
    for field, k in checks:
        theirs = keys.get(k, "")
        if m[field] != theirs:
            fail.append(f"{field}: moat {m[field] or '(none)'} != strongSwan's {k[0]} {k[1]} key {theirs or '(none)'}")
        elif theirs:
            print(f"keys agree: {field} = strongSwan {k[0]} {k[1]} key ({len(theirs)//2} bytes)")

for f in fail:
    print("FAIL:", f)
sys.exit(1 if fail else 0)
