#!/usr/bin/python3
"""Moat's ESP checked by implementations that are not Moat's.

For every cipher, with and without NAT-T (RFC 3948), with and without ESN:
  - scapy's SecurityAssociation decrypts what Moat's esp_outbound made, and the
    inner packet is the original byte for byte;
  - Moat's esp_inbound decrypts what scapy made, to the original inner packet;
  - a flipped ciphertext bit is refused by Moat (esp_bad_icv).
tshark (which has no ChaCha20 for ESP in 4.0) decrypts and authenticates
Moat's AES-GCM and AES-CBC+HMAC-SHA-256 output given the keys.
Moat decrypts ESP captured from a real strongSwan tunnel (tests/esp/samples).

scapy 2.5 leaves the ESN out of the HMAC of non-AEAD ESP (it handles ESN for
AEAD and AH only), contrary to RFC 4303 §2.2.1/§3.3.2.1; for AES-CBC with ESN
the check uses a few lines of ESP over python3-cryptography instead.

Runs esp_tool (tests/esp/esp_tool.cc) from $ESP_TOOL. Exit 0 only if all pass.
"""
import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import tempfile

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, conf, rdpcap, wrpcap
from scapy.layers.ipsec import ESP, SecurityAssociation

conf.verb = 0
TOOL = os.environ.get("ESP_TOOL", "build/tests/esp_tool")
HERE = os.path.dirname(os.path.abspath(__file__))

LOCAL, PEER = "192.0.2.1", "192.0.2.2"
CIPHERS = {
    # Moat name: (scapy crypt_algo, key bytes incl. salt, scapy auth_algo, auth key bytes)
    "aes-gcm-128": ("AES-GCM", 20, None, 0),
    "aes-gcm-256": ("AES-GCM", 36, None, 0),
    "aes-cbc-128-sha256": ("AES-CBC", 16, "SHA2-256-128", 32),
    "aes-cbc-256-sha256": ("AES-CBC", 32, "SHA2-256-128", 32),
    "chacha20-poly1305": ("CHACHA20-POLY1305", 36, None, 0),
}
TSHARK_ALGO = {
    "aes-gcm-128": ("AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    "aes-gcm-256": ("AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    "aes-cbc-128-sha256": ("AES-CBC [RFC3602]", "HMAC-SHA-256-128 [RFC4868]"),
    "aes-cbc-256-sha256": ("AES-CBC [RFC3602]", "HMAC-SHA-256-128 [RFC4868]"),
}

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def inner_packets():
    """Inner packets of several sizes: padding lengths differ for each cipher."""
    pkts = []
    for i, size in enumerate([0, 1, 2, 3, 13, 15, 16, 17, 100, 473, 1000, 1350]):
        pkts.append(IP(src="10.1.0.10", dst="10.2.0.10", id=100 + i, tos=0x28) /
                    UDP(sport=50000 + i, dport=51000) / Raw(bytes((i + k) & 0xff for k in range(size))))
    pkts.append(IP(src="10.1.0.10", dst="10.2.0.10", flags="DF") / TCP(sport=40000, dport=80, flags="S"))
    pkts.append(IP(src="10.1.0.11", dst="10.2.0.12") / ICMP(id=7, seq=1) / Raw(b"x" * 56))
    return [IP(bytes(p)) for p in pkts]


def tool(mode, cipher, key, auth_key, spi, esn, nat_t, seq, inp, out, extra=()):
    args = [TOOL, mode, "--cipher", cipher, "--key", key.hex(), "--spi", str(spi),
            "--local", LOCAL if mode == "encrypt" else LOCAL, "--peer", PEER]
    if auth_key:
        args += ["--auth-key", auth_key.hex()]
    if esn:
        args.append("--esn")
    if nat_t:
        args.append("--nat-t")
    if seq is not None:
        args += ["--seq", str(seq)]
    args += list(extra) + [inp, out]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr}")
    return json.loads(r.stdout)


def make_sa(cipher, key, auth_key, spi, src, dst, nat_t, esn):
    algo, _, auth, _ = CIPHERS[cipher]
    kw = dict(spi=spi, crypt_algo=algo, crypt_key=key, tunnel_header=IP(src=src, dst=dst))
    if auth:
        kw.update(auth_algo=auth, auth_key=auth_key)
    if nat_t:
        kw["nat_t_header"] = UDP(sport=4500, dport=4500)
    if esn:
        kw["esn_en"] = True
    return SecurityAssociation(ESP, **kw)


def case(tmp, cipher, nat_t, esn):
    name = f"{cipher}{' nat-t' if nat_t else ''}{' esn' if esn else ''}"
    _, klen, auth, alen = CIPHERS[cipher]
    key = os.urandom(klen)
    auth_key = os.urandom(alen) if auth else b""
    spi = 0x1000 + (hash(name) & 0xffff)
    inners = inner_packets()
    inp = os.path.join(tmp, "inner.pcap")
    wrpcap(inp, [Ether() / p for p in inners])

    # 1. Moat encrypts, scapy decrypts. With ESN, start just below 2^32 so
    # the high half changes within the run.
    start = 0xfffffffa if esn else None
    outp = os.path.join(tmp, "moat-esp.pcap")
    res = tool("encrypt", cipher, key, auth_key, spi, esn, nat_t, start, inp, outp)
    got = rdpcap(outp)
    check(len(got) == len(inners) and not res["drops"], f"{name}: Moat encrypted {len(got)}/{len(inners)} {res['drops']}")
    sa = make_sa(cipher, key, auth_key, spi, LOCAL, PEER, nat_t, esn)
    good = 0
    for k, (frame, orig) in enumerate(zip(got, inners)):
        outer = frame[IP]
        if nat_t:
            ok_hdr = outer.proto == 17 and outer[UDP].sport == 4500 and outer[UDP].dport == 4500 and outer[UDP].chksum == 0
        else:
            ok_hdr = outer.proto == 50
        seq64 = (start or 0) + k + 1
        try:
            if esn and auth:
                raw_esp = bytes(outer[UDP].payload) if nat_t else bytes(outer[ESP])
                dec = cbc_esn_open(raw_esp, key, auth_key, seq64 >> 32)
            else:
                dec = sa.decrypt(IP(bytes(outer)), esn_en=esn, esn=seq64 >> 32)
            same = bytes(dec) == bytes(orig)
        except Exception as e:  # noqa: BLE001 - any failure is a failed check
            print(f"     #{k}: scapy: {type(e).__name__} {e}")
            same = False
        esp = ESP(bytes(outer[UDP].payload)) if nat_t else outer[ESP]
        # RFC 6040 normal mode and DSCP copy: inner tos 0x28 → outer 0x28.
        ok_tos = outer.tos == orig.tos
        if same and ok_hdr and ok_tos and esp.seq == seq64 & 0xffffffff and esp.spi == spi:
            good += 1
        else:
            print(f"     #{k}: same={same} hdr={ok_hdr} tos={ok_tos} seq={esp.seq} want {seq64 & 0xffffffff}")
    check(good == len(inners), f"{name}: scapy decrypts Moat's ESP to the original inner packets ({good}/{len(inners)})")

    if cipher in TSHARK_ALGO and not esn:
        enc, authn = TSHARK_ALGO[cipher]
        uat = (f'"IPv4","{LOCAL}","{PEER}","0x{spi:08x}","{enc}","0x{key.hex()}",'
               f'"{authn}","{"0x" + auth_key.hex() if auth_key else ""}"')
        r = subprocess.run(["tshark", "-r", outp, "-o", "esp.enable_encryption_decode:TRUE",
                            "-o", "esp.enable_authentication_check:TRUE", "-o", f"uat:esp_sa:{uat}",
                            "-Y", "esp.icv_good == 1 && ip.dst == 10.2.0.10 || esp.icv_good == 1 && ip.dst == 10.2.0.12",
                            "-T", "fields", "-e", "frame.number"],
                           capture_output=True, text=True, timeout=120)
        n = len([ln for ln in r.stdout.splitlines() if ln.strip()])
        check(n == len(inners), f"{name}: tshark authenticates and decrypts Moat's ESP ({n}/{len(inners)}) {r.stderr.strip()[:200]}")

    # 2. scapy encrypts, Moat decrypts.
    sa_in = make_sa(cipher, key, auth_key, spi, PEER, LOCAL, nat_t, esn)
    start_in = 0xfffffffc if esn else 0
    frames = []
    for k, p in enumerate(inners):
        seq64 = start_in + k + 1
        if esn and auth:
            frames.append(Ether() / cbc_esn_seal(p, key, auth_key, spi, seq64, PEER, LOCAL, nat_t))
            continue
        e = seal(sa_in, p, seq64, esn)
        if nat_t:
            e[UDP].len = None  # scapy 2.5 leaves it at 8 (lab NOTES)
            e[UDP].chksum = 0
        frames.append(Ether() / IP(bytes(e)))
    # A flipped bit inside the ciphertext of one more packet.
    if esn and auth:
        bad = bytearray(bytes(cbc_esn_seal(inners[0], key, auth_key, spi, start_in + 100, PEER, LOCAL, nat_t)))
    else:
        bad = bytearray(bytes(seal(sa_in, inners[0], start_in + 100, esn)))
        if nat_t:
            bad = bytearray(bytes(fix_natt(IP(bytes(bad)))))
    bad[-20] ^= 1
    frames.append(Ether() / IP(bytes(bad)))
    # And a replay of the first packet.
    frames.append(frames[0])
    sp = os.path.join(tmp, "scapy-esp.pcap")
    wrpcap(sp, frames)
    outp = os.path.join(tmp, "moat-inner.pcap")
    res = tool("decrypt", cipher, key, auth_key, spi, esn, nat_t, start_in if esn else None, sp, outp)
    got = rdpcap(outp)
    same = sum(1 for g, o in zip(got, inners) if bytes(g[IP]) == bytes(o))
    check(same == len(inners) and len(got) == len(inners),
          f"{name}: Moat decrypts scapy's ESP to the original inner packets ({same}/{len(inners)})")
    check(res["drops"] == {"esp_bad_icv": 1, "esp_replayed": 1},
          f"{name}: tampered packet → esp_bad_icv, replay → esp_replayed: {res['drops']}")


def cbc_esn_open(esp, key, auth_key, hi):
    """RFC 4303 ESP with AES-CBC + HMAC-SHA-256-128 and ESN, receiver side."""
    body, icv = esp[:-16], esp[-16:]
    want = hmac.new(auth_key, body + struct.pack("!L", hi), hashlib.sha256).digest()[:16]
    if want != icv:
        raise ValueError("ICV mismatch")
    d = Cipher(algorithms.AES(key), modes.CBC(body[8:24])).decryptor()
    pt = d.update(body[24:]) + d.finalize()
    pad, nh = pt[-2], pt[-1]
    if nh != 4 or pt[-2 - pad:-2] != bytes(range(1, pad + 1)):
        raise ValueError(f"trailer: pad {pad} nh {nh}")
    return IP(pt[:-2 - pad])


def cbc_esn_seal(inner, key, auth_key, spi, seq64, src, dst, nat_t):
    """RFC 4303 ESP with AES-CBC + HMAC-SHA-256-128 and ESN, sender side."""
    data = bytes(inner)
    pad = (-(len(data) + 2)) % 16
    pt = data + bytes(range(1, pad + 1)) + bytes([pad, 4])
    iv = os.urandom(16)
    e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    body = struct.pack("!LL", spi, seq64 & 0xffffffff) + iv + e.update(pt) + e.finalize()
    icv = hmac.new(auth_key, body + struct.pack("!L", seq64 >> 32), hashlib.sha256).digest()[:16]
    if nat_t:
        return IP(bytes(IP(src=src, dst=dst) / UDP(sport=4500, dport=4500, chksum=0) / Raw(body + icv)))
    return IP(bytes(IP(src=src, dst=dst, proto=50) / Raw(body + icv)))


def seal(sa, p, seq64, esn):
    if seq64 & 0xffffffff == 0:
        # scapy takes seq_num=0 for "not given": go through its own counter.
        sa.seq_num = 0
        return sa.encrypt(p, esn_en=esn, esn=seq64 >> 32)
    return sa.encrypt(p, seq_num=seq64 & 0xffffffff, esn_en=esn, esn=seq64 >> 32)


def fix_natt(e):
    e[UDP].len = None
    e[UDP].chksum = 0
    return IP(bytes(e))


def strongswan_samples(tmp):
    for folder in ("gcm", "cbc"):
        d = os.path.join(HERE, "samples", folder)
        sas = json.load(open(os.path.join(d, "sas.json")))
        for s in sas:
            cipher = "aes-gcm-128" if s["crypt_algo"] == "AES-GCM" else "aes-cbc-128-sha256"
            key = bytes.fromhex(s["crypt_key"])
            auth_key = bytes.fromhex(s["auth_key"]) if s.get("auth_key") else b""
            outp = os.path.join(tmp, f"swan-{folder}-{s['spi']}.pcap")
            args = [TOOL, "decrypt", "--cipher", cipher, "--key", key.hex(), "--spi", str(s["spi"]),
                    "--local", s["dst"], "--peer", s["src"]]
            if auth_key:
                args += ["--auth-key", auth_key.hex()]
            r = subprocess.run(args + ["--nat-t", os.path.join(d, "esp.pcap"), outp],
                               capture_output=True, text=True, timeout=60)
            res = json.loads(r.stdout)
            got = rdpcap(outp)
            pings = [g for g in got if ICMP in g and g[IP].src.startswith("10.")]
            check(len(got) == 3 and len(pings) == 3 and res["drops"] == {"esp_unknown_spi": 3},
                  f"strongSwan {folder} SPI 0x{s['spi']:08x}: Moat decrypts 3 pings "
                  f"({len(pings)}; drops {res['drops']}: the other direction's SPI)")


def many_sas(tmp, k=3):
    """esp_tool --sas K (the pcap harness's sealer for K moats): frame j goes
    out on SA j mod K, whose SPI and local address are the first's + j mod K
    and whose sequence numbers count 1, 2, ... on their own; scapy opens
    every frame with its SA's key and gets the inner packet back."""
    key = os.urandom(20)
    spi = 0x7000
    inners = inner_packets()
    inp, outp = os.path.join(tmp, "inner-k.pcap"), os.path.join(tmp, "moat-esp-k.pcap")
    wrpcap(inp, [Ether() / p for p in inners])
    res = tool("encrypt", "aes-gcm-128", key, b"", spi, False, False, None, inp, outp, extra=["--sas", str(k)])
    got = rdpcap(outp)
    check(len(got) == len(inners) and not res["drops"], f"--sas {k}: {len(got)}/{len(inners)} sealed {res['drops']}")
    base = struct.unpack("!I", bytes(int(x) for x in LOCAL.split(".")))[0]
    good = 0
    for j, (frame, orig) in enumerate(zip(got, inners)):
        outer, sa_i = frame[IP], j % k
        src = ".".join(str(b) for b in struct.pack("!I", base + sa_i))
        sa = make_sa("aes-gcm-128", key, b"", spi + sa_i, src, PEER, False, False)
        try:
            same = bytes(sa.decrypt(IP(bytes(outer)))) == bytes(orig)
        except Exception as e:  # noqa: BLE001 - any failure is a failed check
            print(f"     #{j}: scapy: {type(e).__name__} {e}")
            same = False
        good += (same and outer.src == src and outer[ESP].spi == spi + sa_i and outer[ESP].seq == j // k + 1)
    check(good == len(inners), f"--sas {k}: {good}/{len(inners)} on their own SA, address and sequence, opened by scapy")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for cipher in CIPHERS:
            for nat_t in (False, True):
                for esn in (False, True):
                    case(tmp, cipher, nat_t, esn)
        many_sas(tmp)
        strongswan_samples(tmp)
    print(f"{len(failures)} failed" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
