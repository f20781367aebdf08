# Lane-by-lane emulation of cuda/attention.cu's attention_body (f32, no bf16 rounding):
# the mma.sync m16n8k16 fragment layouts of the PTX ISA (checked against
# microsoft/MMA-Sim's tests), the Q/K/V/P fragment indexing, masking, online softmax,
# split-K and the merge of the splits (combine_splits), against a plain reference. Runs without a GPU:
#     python3 cuda/dev/attention_emu.py
# Keep it in step with the kernel when the kernel changes.
import math, random

BC = 64
INF = float('inf')

def mma(c, a, b0, b1):
    # c[lane][4], a[lane][4][2], b0/b1[lane][2]; PTX m16n8k16 layouts.
    A = [[0.0]*16 for _ in range(16)]
    B = [[0.0]*8 for _ in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e in range(2):
            A[g][t*2+e] = a[lane][0][e]
            A[g+8][t*2+e] = a[lane][1][e]
            A[g][t*2+8+e] = a[lane][2][e]
            A[g+8][t*2+8+e] = a[lane][3][e]
            B[t*2+e][g] = b0[lane][e]
            B[t*2+8+e][g] = b1[lane][e]
    C = [[sum(A[i][k]*B[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e in range(2):
            c[lane][e] += C[g][t*2+e]
            c[lane][2+e] += C[g+8][t*2+e]

def body(p, D, MODE, bx, by, bz, nw, gz, q, k, v, out, o_part, ml_part):
    LD = D + 8; KC = D // 16; NT = D // 8; NJ = BC // 8
    head = by
    if MODE == 'varlen':
        seg_lo = p['cu'][bz]; rows_total = p['cu'][bz+1] - seg_lo; group = 1
    else:
        seg_lo = 0; group = p['hq'] // p['hkv']; rows_total = p['n'] * group
    row_base = bx * nw * 16
    if row_base >= rows_total: return
    if MODE == 'varlen':
        lo, hi = seg_lo, seg_lo + rows_total
    else:
        t_first = row_base // group
        t_last = min(rows_total - 1, row_base + nw*16 - 1) // group
        if MODE == 'causal':
            hi = min(p['kv_len'], p['start'] + t_last + 1)
            lo = max(0, p['start'] + t_first + 1 - p['window']) if p['window'] > 0 else 0
        else:
            hi = min(p['kv_len'], p['start'] + p['n']); lo = 0
        s_lo = bz * p['kps']
        lo = max(lo, s_lo); hi = min(hi, s_lo + p['kps'])
    for warp in range(nw):
        tok = [[0,0] for _ in range(32)]; qh = [[0,0] for _ in range(32)]; valid = [[False,False] for _ in range(32)]
        for lane in range(32):
            g = lane >> 2
            for h in range(2):
                r = row_base + warp*16 + g + 8*h
                valid[lane][h] = r < rows_total
                if MODE == 'varlen': tok[lane][h] = seg_lo + r; qh[lane][h] = head
                else: tok[lane][h] = r // group; qh[lane][h] = head*group + r % group
        qa = [[[[0.0,0.0] for _ in range(4)] for _ in range(KC)] for _ in range(32)]
        for lane in range(32):
            tig = lane & 3
            for kc in range(KC):
                for i in range(4):
                    h = i & 1; col = kc*16 + tig*2 + (i >> 1)*8
                    if valid[lane][h]:
                        base = tok[lane][h]*p['q_stride'] + qh[lane][h]*D + col
                        qa[lane][kc][i] = [q[base], q[base+1]]
        o = [[[0.0]*4 for _ in range(NT)] for _ in range(32)]
        m = [[-INF, -INF] for _ in range(32)]; l = [[0.0, 0.0] for _ in range(32)]
        key0 = lo
        while key0 < hi:
            ks = [0.0]*(BC*LD); vs = [0.0]*(BC*LD)
            for c in range(BC*(D//8)):
                key = c // (D//8); col = (c % (D//8))*8; gk = key0 + key
                for e in range(8):
                    if gk < hi:
                        off = gk*p['kv_stride'] + head*D + col + e
                        ks[key*LD + col + e] = k[off]; vs[key*LD + col + e] = v[off]
            s = [[[0.0]*4 for _ in range(NJ)] for _ in range(32)]
            for j in range(NJ):
                for kc in range(KC):
                    b0 = []; b1 = []; a = []
                    for lane in range(32):
                        g, tig = lane >> 2, lane & 3
                        kr = (j*8 + g)*LD + kc*16 + tig*2
                        b0.append([ks[kr], ks[kr+1]]); b1.append([ks[kr+8], ks[kr+9]])
                        a.append(qa[lane][kc])
                    cc = [s[lane][j] for lane in range(32)]
                    mma(cc, a, b0, b1)
            mx = [[-INF, -INF] for _ in range(32)]
            for lane in range(32):
                tig = lane & 3
                for j in range(NJ):
                    for c in range(4):
                        h = c >> 1; key = key0 + j*8 + tig*2 + (c & 1)
                        vis = key < hi
                        if MODE == 'causal':
                            last = p['start'] + tok[lane][h]
                            vis = vis and key <= last and (p['window'] <= 0 or key > last - p['window'])
                        elif MODE == 'masked':
                            jb = key - p['start']
                            vis = vis and (jb < 0 or (jb < p['n'] and valid[lane][h] and p['mask'][tok[lane][h]*p['n'] + jb] != 0))
                        s[lane][j][c] = s[lane][j][c]*p['scale_log2'] if vis else -INF
                        mx[lane][h] = max(mx[lane][h], s[lane][j][c])
            for h in range(2):
                for off in (1, 2):
                    mx2 = [max(mx[lane][h], mx[lane ^ off][h]) for lane in range(32)]
                    for lane in range(32): mx[lane][h] = mx2[lane]
            m_use = [[0,0] for _ in range(32)]
            for lane in range(32):
                for h in range(2):
                    m_new = max(m[lane][h], mx[lane][h])
                    m_use[lane][h] = 0.0 if m_new == -INF else m_new
                    corr = 2.0 ** (m[lane][h] - m_use[lane][h]) if m[lane][h] != -INF else 0.0
                    m[lane][h] = m_new; l[lane][h] *= corr
                    for i in range(NT):
                        o[lane][i][2*h] *= corr; o[lane][i][2*h+1] *= corr
            for lane in range(32):
                for j in range(NJ):
                    for c in range(4):
                        x = s[lane][j][c] - m_use[lane][c >> 1]
                        s[lane][j][c] = 0.0 if x == -INF else 2.0 ** x
                        l[lane][c >> 1] += s[lane][j][c]
            for kk in range(BC // 16):
                a = []
                for lane in range(32):
                    a.append([[s[lane][2*kk][0], s[lane][2*kk][1]], [s[lane][2*kk][2], s[lane][2*kk][3]],
                              [s[lane][2*kk+1][0], s[lane][2*kk+1][1]], [s[lane][2*kk+1][2], s[lane][2*kk+1][3]]])
                for dn in range(NT):
                    b0 = []; b1 = []
                    for lane in range(32):
                        g, tig = lane >> 2, lane & 3
                        v0 = (kk*16 + tig*2)*LD + g + dn*8
                        b0.append([vs[v0], vs[v0 + LD]]); b1.append([vs[v0 + 8*LD], vs[v0 + 9*LD]])
                    cc = [o[lane][dn] for lane in range(32)]
                    mma(cc, a, b0, b1)
            key0 += BC
        for h in range(2):
            for off in (1, 2):
                l2 = [l[lane][h] + l[lane ^ off][h] for lane in range(32)]
                for lane in range(32): l[lane][h] = l2[lane]
        split = MODE != 'varlen' and gz > 1
        for lane in range(32):
            tig = lane & 3
            for h in range(2):
                if not valid[lane][h]: continue
                inv = 1.0 / l[lane][h] if l[lane][h] > 0 else 0.0
                if not split:
                    base = tok[lane][h]*p['out_stride'] + qh[lane][h]*D
                    for dn in range(NT):
                        out[base + dn*8 + tig*2] = o[lane][dn][2*h]*inv
                        out[base + dn*8 + tig*2 + 1] = o[lane][dn][2*h+1]*inv
                else:
                    row = bz*p['n']*p['hq'] + tok[lane][h]*p['hq'] + qh[lane][h]
                    for dn in range(NT):
                        o_part[row*D + dn*8 + tig*2] = o[lane][dn][2*h]*inv
                        o_part[row*D + dn*8 + tig*2 + 1] = o[lane][dn][2*h+1]*inv
                    if tig == 0: ml_part[row*2] = m[lane][h]; ml_part[row*2+1] = l[lane][h]

def combine(o_part, ml_part, out, rows, hq, d, splits, out_stride):
    for row in range(rows):
        M = max(ml_part[(s*rows+row)*2] for s in range(splits))
        wsum = 0.0
        for s in range(splits):
            ms = ml_part[(s*rows+row)*2]
            if ms != -INF: wsum += ml_part[(s*rows+row)*2+1] * 2.0**(ms - M)
        inv = 1.0/wsum if wsum > 0 else 0.0
        for i in range(d):
            acc = 0.0
            for s in range(splits):
                ms = ml_part[(s*rows+row)*2]
                if ms != -INF: acc += ml_part[(s*rows+row)*2+1]*2.0**(ms-M)*o_part[(s*rows+row)*d+i]
            out[(row//hq)*out_stride + (row % hq)*d + i] = acc*inv

def launch(MODE, D, q, k, v, n, start, kv_len, hq, hkv, window=0, mask=None, cu=None, max_seqlen=0, splits_req=1):
    out = [0.0]*(n*hq*D)
    p = dict(n=n, start=start, kv_len=kv_len, hq=hq, hkv=hkv, window=window, mask=mask, cu=cu,
             q_stride=hq*D, kv_stride=hkv*D, out_stride=hq*D, scale_log2=math.log2(math.e)/math.sqrt(D))
    if MODE == 'varlen':
        warps = min(4, -(-max_seqlen // 16)); gx = -(-max_seqlen // (warps*16))
        p['kps'] = 1 << 30
        for bz in range(len(cu)-1):
            for by in range(hq):
                for bx in range(gx):
                    body(p, D, MODE, bx, by, bz, warps, len(cu)-1, q, k, v, out, None, None)
        return out
    group = hq // hkv; rows = n*group
    warps = min(4, -(-rows // 16)); row_tiles = -(-rows // (warps*16))
    kps = -(-(-(-kv_len // splits_req)) // 64) * 64
    splits = -(-kv_len // kps)
    p['kps'] = kps
    o_part = [0.0]*(splits*n*hq*D); ml_part = [0.0]*(splits*n*hq*2)
    for bz in range(splits):
        for by in range(hkv):
            for bx in range(row_tiles):
                body(p, D, MODE, bx, by, bz, warps, splits, q, k, v, out, o_part, ml_part)
    if splits > 1:
        combine(o_part, ml_part, out, n*hq, hq, D, splits, hq*D)
    return out

def ref(q, k, v, n, hq, hkv, D, visible):
    group = hq // hkv; out = [0.0]*(n*hq*D); sc = 1/math.sqrt(D)
    for t in range(n):
        for h in range(hq):
            kh = h // group
            js = [j for j in range(len(k)//(hkv*D)) if visible(t, j)]
            s = [sum(q[(t*hq+h)*D+i]*k[(j*hkv+kh)*D+i] for i in range(D))*sc for j in js]
            mx = max(s); e = [math.exp(x-mx) for x in s]; z = sum(e)
            for i in range(D):
                out[(t*hq+h)*D+i] = sum(e[a]/z*v[(js[a]*hkv+kh)*D+i] for a in range(len(js)))
    return out

def rnd(n): return [random.uniform(-1, 1) for _ in range(n)]

def check(name, got, want):
    err = max(abs(a-b) for a, b in zip(got, want))
    print(f"{name}: max err {err:.2e}", "OK" if err < 1e-4 else "FAIL")
    assert err < 1e-4

random.seed(0)
# causal prefill, GQA 7 (rows span tiles), D=80, start>0, window, splits
for (D, n, start, hq, hkv, window, splits) in [(64, 5, 0, 2, 2, 0, 1), (80, 3, 70, 7, 1, 0, 1), (64, 3, 70, 7, 1, 0, 3),
                                               (80, 20, 10, 4, 2, 7, 1), (128, 2, 130, 4, 1, 0, 2),
                                               (16, 9, 3, 4, 2, 0, 1), (16, 2, 100, 4, 1, 0, 2)]:
    kv = start + n
    q, k, v = rnd(n*hq*D), rnd(kv*hkv*D), rnd(kv*hkv*D)
    got = launch('causal', D, q, k, v, n, start, kv, hq, hkv, window=window, splits_req=splits)
    want = ref(q, k, v, n, hq, hkv, D, lambda t, j: j <= start+t and (window == 0 or j > start+t-window))
    check(f"causal D={D} n={n} start={start} hq={hq} hkv={hkv} window={window} splits={splits}", got, want)
# masked verify with a tree, splits
for (D, n, start, hq, hkv, splits) in [(64, 4, 66, 14, 2, 2), (80, 3, 5, 2, 2, 1), (16, 6, 40, 4, 2, 2)]:
    kv = start + n
    q, k, v = rnd(n*hq*D), rnd(kv*hkv*D), rnd(kv*hkv*D)
    parent = [0] + [random.randrange(i) for i in range(1, n)]
    mask = [0]*(n*n)
    for t in range(n):
        a = t
        while True:
            mask[t*n+a] = 1
            if a == 0: break
            a = parent[a]
    got = launch('masked', D, q, k, v, n, start, kv, hq, hkv, mask=mask, splits_req=splits)
    want = ref(q, k, v, n, hq, hkv, D, lambda t, j: j < start or mask[t*n + j - start] != 0)
    check(f"verify D={D} n={n} start={start} tree={parent} splits={splits}", got, want)
# varlen
D, heads = 80, 2
cu = [0, 3, 20, 21]
total = cu[-1]
q, k, v = rnd(total*heads*D), rnd(total*heads*D), rnd(total*heads*D)
got = launch('varlen', D, q, k, v, total, 0, total, heads, heads, cu=cu, max_seqlen=17)
seg = lambda i: max(s for s in range(len(cu)-1) if cu[s] <= i)
want = ref(q, k, v, total, heads, heads, D, lambda a, b: seg(a) == seg(b))
check("varlen D=80", got, want)
# varlen at head dim 16 (the fixtures' vision tower)
D = 16
q, k, v = rnd(total*heads*D), rnd(total*heads*D), rnd(total*heads*D)
got = launch('varlen', D, q, k, v, total, 0, total, heads, heads, cu=cu, max_seqlen=17)
want = ref(q, k, v, total, heads, heads, D, lambda a, b: seg(a) == seg(b))
check("varlen D=16", got, want)
