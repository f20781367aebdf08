# Emulation of the top-k / top-p cut of cuda/sampling.cu's probabilities kernel (radix
# select over f32 bit patterns, 2^-56 fixed-point masses, ties kept lowest id first)
# against massv::sampling::probabilities' rule. Runs without a GPU:
#     python3 cuda/dev/radix_select_emu.py
import random, struct
S = 2.0**56
def bits(x): return struct.unpack('<I', struct.pack('<f', x))[0]
def f32(x): return struct.unpack('<f', struct.pack('<f', x))[0]
def fixed(x): return int(round(x * S))

def device(p, k, top_p):
    n = len(p); pf = fixed(top_p)
    prefix = mask = 0; above = 0; m_above = 0; digit = None
    for ps in range(4):
        shift = 24 - 8*ps
        cnt = [0]*256; mass = [0]*256
        for v in p:
            b = bits(v)
            if (b & mask) == prefix:
                d = (b >> shift) & 255; cnt[d] += 1; mass[d] += fixed(v)
        chosen = -1; a = above; ma = m_above
        for d in range(255, -1, -1):
            if a + cnt[d] >= k or ma + mass[d] >= pf: chosen = d; break
            a += cnt[d]; ma += mass[d]
        if chosen < 0: return list(p)  # keep all
        prefix |= chosen << shift; mask |= 255 << shift; above = a; m_above = ma; digit = chosen
    cut = prefix; ties = cnt[digit]; vcut = struct.unpack('<f', struct.pack('<I', cut))[0]
    t = 0; macc = m_above
    while t < ties:
        t += 1; macc += fixed(vcut)
        if above + t >= k or macc >= pf: break
    out = []; seen = 0
    for v in p:
        b = bits(v)
        keep = b > cut or (b == cut and seen < t)
        if b == cut: seen += 1
        out.append(v if keep else 0.0)
    tot = sum(out)
    return [x / tot for x in out]

def cpu(p, k, top_p):
    order = sorted(range(len(p)), key=lambda i: -p[i])  # stable: ties lower id first
    keep = 0; mass = 0.0
    while keep < k:
        mass += p[order[keep]]; keep += 1
        if mass >= top_p: break
    out = [0.0]*len(p)
    for i in order[:keep]: out[i] = p[i]
    tot = sum(out)
    return [x / tot for x in out]

random.seed(1)
for trial in range(3000):
    n = random.choice([1, 2, 5, 10, 50, 300])
    # Quantised values so ties are common.
    raw = [f32(random.choice([random.random(), round(random.random(), 1), 0.0 if random.random() < 0.1 else 0.5])) for _ in range(n)]
    z = sum(raw) or 1.0
    p = [f32(x / z) for x in raw]
    if sum(p) == 0: continue
    k = min(n, random.choice([n, 1, 2, 3, max(1, n//2)]))
    top_p = random.choice([1.0, 0.9, 0.5, 0.3])
    d, c = device(p, k, top_p), cpu(p, k, top_p)
    sd = [x != 0 for x in d]; sc = [x != 0 for x in c]
    if sd != sc:
        print("MISMATCH", n, k, top_p, p, d, c); break
else:
    print("radix select emulation: 3000 cases agree on the kept set")
