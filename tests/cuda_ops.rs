//! Every CUDA kernel against its CPU twin in `massv::reference` (ggml's test-backend-ops
//! idea), over a sweep of shapes: odd sizes, GQA ratios 1/2/4/7, head dims 32/64/80/128,
//! lengths 1..4096, γ + 1 = 2..9.
//!
//! Tolerances are dtype-aware. bf16 outputs follow flash-attention's rule: the reference
//! is computed in f32 from the bf16-rounded inputs, and also "in bf16" (the same
//! computation rounding where a bf16 framework would: the output, softmax probabilities,
//! a stored residual); the device's max error against the f32 reference must be at most
//! twice the bf16 computation's (+ 1e-5 of the output's scale). f32 outputs of sums
//! (GEMV logits) must be within the classic bound k·ε·Σ|xᵢwᵢ| per element. argmax,
//! sampling, verification, gathers, copies and conversions must be exact.
//!
//! Without a usable GPU (built without nvcc, no libcuda, no device) every test prints
//! `skipped: no CUDA device (<reason>)` and passes; with MASSV_REQUIRE_CUDA=1 (set by
//! bench/gpu.sh) a missing device fails instead.
//!
//! `bench_kernels` (ignored; `--ignored bench_kernels --nocapture`) times the decode
//! kernels at the real shapes of KERNELS.md against their memory-bandwidth floors and
//! writes JSON to $MASSV_BENCH_JSON.

mod common;

use massv::backend::cuda::{bf16, AttnShape, CudaDevice, DeviceLen, GemvFuse, ATTN_HEAD_DIMS, MAX_TOP_K};
use massv::reference as r;
use massv::sampling::{Rng, SamplingParams};
use massv::spec::tree::{verify_tree_greedy, verify_tree_sampled, Proposal, QRow, TokenTree, TreeVerdict};
use massv::spec::verify::Verdict;

// -------------------------------------------------------------------------------------
// Harness

fn device() -> Option<CudaDevice> {
    common::cuda_device()
}

macro_rules! dev_or_skip {
    () => {
        match device() {
            Some(d) => d,
            None => return,
        }
    };
}

fn rand_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32 * scale).collect()
}

fn round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Random bf16 values: (device-ready bf16, the same values in f32).
fn rand_bf16(rng: &mut Rng, n: usize, scale: f32) -> (Vec<bf16>, Vec<f32>) {
    let f = round(&rand_vec(rng, n, scale));
    (to_bf16(&f), f)
}

fn down_bf16(dev: &CudaDevice, x: &cudarc::driver::CudaSlice<bf16>, n: usize) -> Vec<f32> {
    dev.download(&x.slice(..n))
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).fold(0.0f32, |m, (&x, &y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// flash-attention's rule for bf16 outputs (see the module doc).
fn check_bf16(what: &str, dev: &[f32], ref32: &[f32], ref_lo: &[f32]) {
    let scale = ref32.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let err = max_err(dev, ref32);
    let err_lo = max_err(ref_lo, ref32);
    assert!(
        err <= 2.0 * err_lo + 1e-5 * scale,
        "{what}: device error {err:e} exceeds 2 × the bf16 computation's {err_lo:e} (scale {scale})"
    );
}

fn rows_of(v: &[f32], n: usize) -> Vec<Vec<f32>> {
    v.chunks(n).map(<[f32]>::to_vec).collect()
}

// -------------------------------------------------------------------------------------
// Element-wise and row-wise kernels

#[test]
fn rmsnorm_and_residual() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(1);
    for &(rows, dim) in &[(1, 64), (3, 5), (17, 896), (4, 1280), (2, 3584)] {
        let eps = 1e-6;
        let (xb, x) = rand_bf16(&mut rng, rows * dim, 2.0);
        let (wb, w) = rand_bf16(&mut rng, dim, 1.0);
        let (rb, res) = rand_bf16(&mut rng, rows * dim, 2.0);
        let (dx, dw) = (dev.upload(&xb).unwrap(), dev.upload(&wb).unwrap());
        let mut dy = dev.alloc_zeros::<bf16>(rows * dim).unwrap();
        dev.rmsnorm(&dx.as_view(), &dw.as_view(), &mut dy.as_view_mut(), rows, dim, eps)
            .unwrap();
        let mut want = vec![0.0; rows * dim];
        r::rmsnorm(&x, &w, &mut want, dim, eps);
        let got = down_bf16(&dev, &dy, rows * dim);
        check_bf16(&format!("rmsnorm {rows}x{dim}"), &got, &want, &round(&want));

        // Fused residual: the device stores the residual in bf16 and normalises that.
        let mut dr = dev.upload(&rb).unwrap();
        dev.rmsnorm_residual(
            &dx.as_view(),
            &mut dr.as_view_mut(),
            &dw.as_view(),
            &mut dy.as_view_mut(),
            rows,
            dim,
            eps,
        )
        .unwrap();
        let (mut res32, mut want) = (res.clone(), vec![0.0; rows * dim]);
        r::rmsnorm_residual(&x, &mut res32, &w, &mut want, dim, eps);
        let res_lo = round(&res32);
        let mut want_lo = vec![0.0; rows * dim];
        r::rmsnorm(&res_lo, &w, &mut want_lo, dim, eps);
        let what = format!("rmsnorm_residual {rows}x{dim}");
        check_bf16(&what, &down_bf16(&dev, &dr, rows * dim), &res32, &res_lo);
        check_bf16(&what, &down_bf16(&dev, &dy, rows * dim), &want, &round(&want_lo));
    }
}

#[test]
fn swiglu() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(2);
    for &(rows, inter) in &[(1, 7), (5, 4864), (3, 1)] {
        let (gb, g) = rand_bf16(&mut rng, rows * 2 * inter, 4.0);
        let dg = dev.upload(&gb).unwrap();
        let mut dout = dev.alloc_zeros::<bf16>(rows * inter).unwrap();
        dev.swiglu(&dg.as_view(), &mut dout.as_view_mut(), rows, inter).unwrap();
        let mut want = vec![0.0; rows * inter];
        r::swiglu(&g, &mut want, inter);
        check_bf16(
            &format!("swiglu {rows}x{inter}"),
            &down_bf16(&dev, &dout, rows * inter),
            &want,
            &round(&want),
        );
    }
}

#[test]
fn rope_mrope_rope_vision() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(3);
    for &(tokens, heads, hd, theta) in &[(1, 2, 64, 1e6f32), (9, 28, 128, 1e6), (5, 4, 80, 1e4), (3, 3, 6, 1e4)] {
        let (xb, x) = rand_bf16(&mut rng, tokens * heads * hd, 1.0);
        let pos: Vec<i32> = (0..tokens).map(|_| (rng.uniform() * 32768.0) as i32).collect();
        let mut dx = dev.upload(&xb).unwrap();
        let dp = dev.upload(&pos).unwrap();
        dev.rope(&mut dx.as_view_mut(), &dp.as_view(), tokens, heads, hd, theta)
            .unwrap();
        let mut want = x.clone();
        r::rope(&mut want, &pos, heads, hd, theta);
        let what = format!("rope t{tokens} h{heads} d{hd}");
        check_bf16(&what, &down_bf16(&dev, &dx, x.len()), &want, &round(&want));
    }
    for &(tokens, heads, hd, section) in &[
        (7, 28, 128, [16, 24, 24]),
        (3, 2, 64, [8, 12, 12]),
        (1, 1, 16, [2, 3, 3]),
    ] {
        let (xb, x) = rand_bf16(&mut rng, tokens * heads * hd, 1.0);
        let pos: Vec<i32> = (0..3 * tokens).map(|_| (rng.uniform() * 5000.0) as i32).collect();
        let mut dx = dev.upload(&xb).unwrap();
        let dp = dev.upload(&pos).unwrap();
        dev.mrope(&mut dx.as_view_mut(), &dp.as_view(), tokens, heads, hd, 1e6, section)
            .unwrap();
        let mut want = x.clone();
        r::mrope(&mut want, &pos, section, heads, hd, 1e6);
        let what = format!("mrope t{tokens} h{heads} d{hd}");
        check_bf16(&what, &down_bf16(&dev, &dx, x.len()), &want, &round(&want));
    }
    for &(tokens, heads, hd) in &[(64, 16, 80), (5, 2, 64), (1, 1, 8)] {
        let (xb, x) = rand_bf16(&mut rng, tokens * heads * hd, 1.0);
        let rows: Vec<i32> = (0..tokens).map(|_| (rng.uniform() * 64.0) as i32).collect();
        let cols: Vec<i32> = (0..tokens).map(|_| (rng.uniform() * 64.0) as i32).collect();
        let mut dx = dev.upload(&xb).unwrap();
        let (dr, dc) = (dev.upload(&rows).unwrap(), dev.upload(&cols).unwrap());
        dev.rope_vision(
            &mut dx.as_view_mut(),
            &dr.as_view(),
            &dc.as_view(),
            tokens,
            heads,
            hd,
            1e4,
        )
        .unwrap();
        let mut want = x.clone();
        r::rope_vision(&mut want, &rows, &cols, heads, hd, 1e4);
        let what = format!("rope_vision t{tokens} h{heads} d{hd}");
        check_bf16(&what, &down_bf16(&dev, &dx, x.len()), &want, &round(&want));
    }
}

#[test]
fn rope_kv_append_is_rope_then_kv_append() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(31);
    // (tokens, hq, hkv, head_dim, cache len before, M-RoPE section)
    let cases = [
        (1, 14, 2, 64, 37, None),
        (6, 28, 4, 128, 100, Some([16, 24, 24])),
        (9, 4, 4, 80, 0, None),
        (3, 3, 1, 6, 5, Some([1, 1, 1])),
        (64, 8, 2, 64, 3, None),
    ];
    for (n, hq, hkv, hd, len, section) in cases {
        let (qr, kvr, cap) = (hq * hd, hkv * hd, len + n + 2);
        let width = n * (qr + 2 * kvr);
        let (qkv_b, qkv) = rand_bf16(&mut rng, width, 1.0);
        let (kc_b, k_cache) = rand_bf16(&mut rng, cap * kvr, 1.0);
        let (vc_b, v_cache) = rand_bf16(&mut rng, cap * kvr, 1.0);
        let axes = if section.is_some() { 3 } else { 1 };
        let pos: Vec<i32> = (0..axes * n).map(|_| (rng.uniform() * 9000.0) as i32).collect();
        let theta = 1e6;
        let shape = AttnShape {
            n,
            start: len,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
        };
        let what = format!("rope_kv_append n{n} hq{hq} hkv{hkv} d{hd} len{len} {section:?}");
        let (dx, dp) = (dev.upload(&qkv_b).unwrap(), dev.upload(&pos).unwrap());
        let mut dq = dev.alloc_zeros::<bf16>(n * qr).unwrap();
        let (mut dk, mut dv) = (dev.upload(&kc_b).unwrap(), dev.upload(&vc_b).unwrap());
        dev.rope_kv_append(
            &dx.as_view(),
            &dp.as_view(),
            &mut dq.as_view_mut(),
            &mut dk.as_view_mut(),
            &mut dv.as_view_mut(),
            shape,
            theta,
            section,
            None,
        )
        .unwrap();
        let (got_q, got_k, got_v) = (
            down_bf16(&dev, &dq, n * qr),
            down_bf16(&dev, &dk, cap * kvr),
            down_bf16(&dev, &dv, cap * kvr),
        );

        // The start read on the device (as a CUDA graph's launch does; `start` unused):
        // the same bits.
        let at = dev.upload(&[len as i32]).unwrap();
        let mut dq2 = dev.alloc_zeros::<bf16>(n * qr).unwrap();
        let (mut dk2, mut dv2) = (dev.upload(&kc_b).unwrap(), dev.upload(&vc_b).unwrap());
        let ignored = AttnShape { start: cap, ..shape };
        let len_at = DeviceLen {
            at: &at.as_view(),
            capacity: cap,
        };
        dev.rope_kv_append(
            &dx.as_view(),
            &dp.as_view(),
            &mut dq2.as_view_mut(),
            &mut dk2.as_view_mut(),
            &mut dv2.as_view_mut(),
            ignored,
            theta,
            section,
            Some(len_at),
        )
        .unwrap();
        assert_eq!(
            down_bf16(&dev, &dq2, n * qr),
            got_q,
            "{what}: q with the start on the device"
        );
        assert_eq!(
            down_bf16(&dev, &dk2, cap * kvr),
            got_k,
            "{what}: k with the start on the device"
        );
        assert_eq!(
            down_bf16(&dev, &dv2, cap * kvr),
            got_v,
            "{what}: v with the start on the device"
        );

        // Against the twin: the rotated rows within the bf16 rule, the rest exact.
        let mut want_q = vec![0.0; n * qr];
        let (mut want_k, mut want_v) = (k_cache.clone(), v_cache.clone());
        r::rope_kv_append(
            &qkv,
            &pos,
            section,
            &mut want_q,
            &mut want_k,
            &mut want_v,
            len,
            (hq, hkv, hd),
            theta,
        );
        check_bf16(&format!("{what} q"), &got_q, &want_q, &round(&want_q));
        check_bf16(&format!("{what} k cache"), &got_k, &want_k, &round(&want_k));
        assert_eq!(got_v, want_v, "{what}: the values are copied exactly");
        assert_eq!(got_k[..len * kvr], k_cache[..len * kvr], "{what}: keys before len kept");
        assert_eq!(
            got_k[(len + n) * kvr..],
            k_cache[(len + n) * kvr..],
            "{what}: keys after kept"
        );

        // Against the kernels it replaces, on q, k, v split on the host: bit for bit.
        let part = |at: usize, w: usize| -> Vec<bf16> {
            qkv_b
                .chunks_exact(qr + 2 * kvr)
                .flat_map(|row| &row[at..at + w])
                .copied()
                .collect()
        };
        let (mut uq, mut uk) = (dev.upload(&part(0, qr)).unwrap(), dev.upload(&part(qr, kvr)).unwrap());
        let uv = dev.upload(&part(qr + kvr, kvr)).unwrap();
        for (x, heads) in [(&mut uq, hq), (&mut uk, hkv)] {
            let mut x = x.as_view_mut();
            match section {
                Some(sec) => dev.mrope(&mut x, &dp.as_view(), n, heads, hd, theta, sec).unwrap(),
                None => dev.rope(&mut x, &dp.as_view(), n, heads, hd, theta).unwrap(),
            }
        }
        let (mut ukc, mut uvc) = (dev.upload(&kc_b).unwrap(), dev.upload(&vc_b).unwrap());
        dev.kv_append(
            &uk.as_view(),
            &uv.as_view(),
            &mut ukc.as_view_mut(),
            &mut uvc.as_view_mut(),
            len,
            n,
            kvr,
        )
        .unwrap();
        assert_eq!(got_q, down_bf16(&dev, &uq, n * qr), "{what}: q as rope / mrope");
        assert_eq!(got_k, down_bf16(&dev, &ukc, cap * kvr), "{what}: keys as kv_append");
        assert_eq!(got_v, down_bf16(&dev, &uvc, cap * kvr), "{what}: values as kv_append");
    }
    // A cache too short for the rows, and a section that does not cover head_dim / 2.
    let shape = AttnShape {
        n: 2,
        start: 3,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 8,
    };
    let x = dev.alloc_zeros::<bf16>(2 * 4 * 8).unwrap();
    let p = dev.alloc_zeros::<i32>(6).unwrap();
    let mut q = dev.alloc_zeros::<bf16>(2 * 2 * 8).unwrap();
    let (mut kc, mut vc) = (
        dev.alloc_zeros::<bf16>(4 * 8).unwrap(),
        dev.alloc_zeros::<bf16>(5 * 8).unwrap(),
    );
    let mut call = |kc: &mut cudarc::driver::CudaSlice<bf16>, section| {
        dev.rope_kv_append(
            &x.as_view(),
            &p.as_view(),
            &mut q.as_view_mut(),
            &mut kc.as_view_mut(),
            &mut vc.as_view_mut(),
            shape,
            1e4,
            section,
            None,
        )
        .unwrap_err()
        .to_string()
    };
    let e = call(&mut kc, None);
    assert!(e.contains("k_cache holds 32 elements, needs 40"), "{e}");
    let e = call(&mut dev.alloc_zeros::<bf16>(5 * 8).unwrap(), Some([1, 1, 1]));
    assert!(e.contains("head_dim / 2"), "{e}");
}

#[test]
fn gelu_bias_gelu_bias_add_projector_norm_gather() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(4);
    for &(rows, cols) in &[(1, 1), (3, 7), (16, 4864)] {
        let n = rows * cols;
        let (xb, x) = rand_bf16(&mut rng, n, 4.0);
        let (bb, b) = rand_bf16(&mut rng, cols, 1.0);
        let db = dev.upload(&bb).unwrap();

        let mut dx = dev.upload(&xb).unwrap();
        dev.gelu(&mut dx.as_view_mut(), n).unwrap();
        let mut want = x.clone();
        r::gelu(&mut want);
        check_bf16(&format!("gelu {n}"), &down_bf16(&dev, &dx, n), &want, &round(&want));

        let mut dx = dev.upload(&xb).unwrap();
        dev.bias_gelu(&mut dx.as_view_mut(), &db.as_view(), rows, cols).unwrap();
        let mut want = x.clone();
        r::bias_gelu(&mut want, &b);
        check_bf16(
            &format!("bias_gelu {rows}x{cols}"),
            &down_bf16(&dev, &dx, n),
            &want,
            &round(&want),
        );

        let mut dx = dev.upload(&xb).unwrap();
        dev.bias_add(&mut dx.as_view_mut(), &db.as_view(), rows, cols).unwrap();
        let mut want = x.clone();
        r::bias_add(&mut want, &b);
        check_bf16(
            &format!("bias_add {rows}x{cols}"),
            &down_bf16(&dev, &dx, n),
            &want,
            &round(&want),
        );
    }
    for &(patches, dv, m2) in &[(16, 1280, 4), (9, 33, 9), (4, 8, 1)] {
        let (xb, x) = rand_bf16(&mut rng, patches * dv, 3.0);
        let (wb, w) = rand_bf16(&mut rng, dv, 1.0);
        let (dx, dw) = (dev.upload(&xb).unwrap(), dev.upload(&wb).unwrap());
        let mut dy = dev.alloc_zeros::<bf16>(patches * dv).unwrap();
        dev.projector_norm_gather(
            &dx.as_view(),
            &dw.as_view(),
            &mut dy.as_view_mut(),
            patches,
            dv,
            m2,
            1e-6,
        )
        .unwrap();
        let mut want = vec![0.0; patches * dv];
        r::projector_norm_gather(&x, &w, &mut want, dv, 1e-6);
        let what = format!("projector_norm_gather {patches}x{dv} m2={m2}");
        check_bf16(&what, &down_bf16(&dev, &dy, patches * dv), &want, &round(&want));
    }
}

#[test]
fn embedding_and_scatter_rows() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(5);
    for &(vocab, dim, n) in &[(1000, 896, 13), (50, 7, 9), (3, 8, 1)] {
        let (tb, table) = rand_bf16(&mut rng, vocab * dim, 1.0);
        // Ids past the table (the target's padding ids) must give zero rows.
        let ids: Vec<u32> = (0..n).map(|_| (rng.uniform() * (vocab + 5) as f64) as u32).collect();
        let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let (dt, di) = (dev.upload(&tb).unwrap(), dev.upload(&ids_i).unwrap());
        let mut dout = dev.alloc_zeros::<bf16>(n * dim).unwrap();
        dev.embedding(&di.as_view(), &dt.as_view(), &mut dout.as_view_mut(), n, dim)
            .unwrap();
        let mut want = vec![1.0; n * dim];
        r::embedding(&ids, &table, &mut want, dim);
        assert_eq!(down_bf16(&dev, &dout, n * dim), want, "embedding {vocab}x{dim}");

        // Scatter into a prompt of 2n rows at distinct positions (one past the end: skipped).
        let rows = 2 * n;
        let (sb, src) = rand_bf16(&mut rng, n * dim, 1.0);
        let (pb, prompt) = rand_bf16(&mut rng, rows * dim, 1.0);
        let mut pos: Vec<u32> = (0..n as u32).map(|i| 2 * i + 1).collect();
        pos[n - 1] = rows as u32 + 3;
        let pos_i: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
        let (ds, dp) = (dev.upload(&sb).unwrap(), dev.upload(&pos_i).unwrap());
        let mut dd = dev.upload(&pb).unwrap();
        dev.scatter_rows(&ds.as_view(), &dp.as_view(), &mut dd.as_view_mut(), n, dim)
            .unwrap();
        let mut want = prompt.clone();
        r::scatter_rows(&src, &pos, &mut want, dim);
        assert_eq!(down_bf16(&dev, &dd, rows * dim), want, "scatter_rows {n}x{dim}");
    }
}

#[test]
fn kv_append_and_compact() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(6);
    for &(row, cap, len, n) in &[(512, 64, 10, 6), (128, 20, 0, 1), (12, 16, 7, 9)] {
        let (kb, k_cache) = rand_bf16(&mut rng, cap * row, 1.0);
        let (vb, v_cache) = rand_bf16(&mut rng, cap * row, 1.0);
        let (knb, k_new) = rand_bf16(&mut rng, n * row, 1.0);
        let (vnb, v_new) = rand_bf16(&mut rng, n * row, 1.0);
        let (mut dk, mut dv) = (dev.upload(&kb).unwrap(), dev.upload(&vb).unwrap());
        let (dkn, dvn) = (dev.upload(&knb).unwrap(), dev.upload(&vnb).unwrap());
        dev.kv_append(
            &dkn.as_view(),
            &dvn.as_view(),
            &mut dk.as_view_mut(),
            &mut dv.as_view_mut(),
            len,
            n,
            row,
        )
        .unwrap();
        let (mut wk, mut wv) = (k_cache.clone(), v_cache.clone());
        r::kv_append(&k_new, &v_new, &mut wk, &mut wv, len, row);
        assert_eq!(down_bf16(&dev, &dk, cap * row), wk, "kv_append keys row {row}");
        assert_eq!(down_bf16(&dev, &dv, cap * row), wv, "kv_append values row {row}");
    }
    // Compact a tree path in 3 buffers of one allocation (e.g. layers × K/V).
    for &(row, cap, dst, ref path) in &[
        (512, 32, 10, vec![11u32, 12, 15, 20]),
        (64, 16, 3, vec![3, 5, 6]),
        (8, 8, 0, vec![1]),
    ] {
        let buffers = 3;
        let stride = cap * row + 5;
        let (cb, cache) = rand_bf16(&mut rng, buffers * stride, 1.0);
        let path_i: Vec<i32> = path.iter().map(|&p| p as i32).collect();
        let mut dc = dev.upload(&cb).unwrap();
        let dp = dev.upload(&path_i).unwrap();
        dev.kv_compact(
            &mut dc.as_view_mut(),
            &dp.as_view(),
            path.len(),
            dst,
            row,
            buffers,
            stride,
        )
        .unwrap();
        let mut want = cache.clone();
        for b in 0..buffers {
            r::kv_compact(&mut want[b * stride..][..cap * row], path, dst, row);
        }
        assert_eq!(down_bf16(&dev, &dc, buffers * stride), want, "kv_compact {path:?}");
    }
}

#[test]
fn conversions_are_exact() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(7);
    let mut x = rand_vec(&mut rng, 10_007, 100.0);
    // Halfway cases (round to even), signed zeros, large and tiny normal values.
    x.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -0.0,
        0.0,
        3.0e38,
        -1.0e-30,
        65504.0,
    ]);
    let n = x.len();
    let dx = dev.upload(&x).unwrap();
    let mut dy = dev.alloc_zeros::<bf16>(n).unwrap();
    dev.f32_to_bf16(&dx.as_view(), &mut dy.as_view_mut(), n).unwrap();
    let mut want = vec![bf16::ZERO; n];
    r::f32_to_bf16(&x, &mut want);
    let got = dev.download(&dy.as_view()).unwrap();
    let bits = |v: &[bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got[..n]), bits(&want), "f32_to_bf16");
    let mut back = dev.alloc_zeros::<f32>(n).unwrap();
    dev.bf16_to_f32(&dy.as_view(), &mut back.as_view_mut(), n).unwrap();
    let mut want32 = vec![0.0; n];
    r::bf16_to_f32(&want, &mut want32);
    assert_eq!(dev.download(&back.as_view()).unwrap()[..n], want32[..], "bf16_to_f32");
}

// -------------------------------------------------------------------------------------
// GEMV / GEMM

/// The fusions a row count runs under in the GEMV sweeps: none, the input's RMS scale,
/// the add into y, both (a big shape's rows 1, 6 and 8 take the first three).
fn fuse_for(rows: usize) -> GemvFuse {
    [
        GemvFuse::NONE,
        GemvFuse::rms(1e-6),
        GemvFuse::ADD,
        GemvFuse {
            rms_eps: Some(1e-5),
            add_to_y: true,
        },
    ][rows % 4]
}

#[test]
fn gemv_bf16_all_row_counts() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(8);
    // (n, k): tiny, odd n, the drafter's o_proj, a 7B QKV, a tall head-like matrix, and
    // two short-and-wide ones that split K (gemv_splits > 1 with the scratch).
    let shapes = [
        (1, 8),
        (33, 64),
        (896, 896),
        (4608, 3584),
        (20011, 128),
        (100, 4096),
        (7, 18944),
    ];
    let mut scratch = dev.alloc_zeros::<f32>(64 * 8 * 4608).unwrap();
    for &(n, k) in &shapes {
        let (wb, w) = rand_bf16(&mut rng, n * k, 1.0);
        let (bb, bias) = rand_bf16(&mut rng, n, 1.0);
        let (dw, db) = (dev.upload(&wb).unwrap(), dev.upload(&bb).unwrap());
        for rows in 1..=8 {
            if n * k > 1 << 22 && !matches!(rows, 1 | 6 | 8) {
                continue; // keep the CPU reference's time modest on the big shapes
            }
            let fuse = fuse_for(rows);
            let (xb, x) = rand_bf16(&mut rng, rows * k, 1.0);
            // What y holds before an adding GEMV (the residual stream).
            let (y0b, y0) = rand_bf16(&mut rng, rows * n, 4.0);
            let dx = dev.upload(&xb).unwrap();
            let with_bias = rows % 2 == 1;
            let bias_view = db.as_view();
            let b = with_bias.then_some(&bias_view);
            let bias_ref = with_bias.then_some(&bias[..]);
            // The result before any add, then what y ends as.
            let mut v = vec![0.0; rows * n];
            r::gemv_bf16(
                &x,
                &w,
                bias_ref,
                &mut v,
                k,
                GemvFuse {
                    add_to_y: false,
                    ..fuse
                },
            );
            let mut want = if fuse.add_to_y { y0.clone() } else { vec![0.0; rows * n] };
            r::gemv_bf16(&x, &w, bias_ref, &mut want, k, fuse);
            // The bf16 computation: the result rounded, then (adding) the sum rounded.
            let want_lo: Vec<f32> = if fuse.add_to_y {
                round(&v).iter().zip(&y0).map(|(a, c)| a + c).collect()
            } else {
                v.clone()
            };
            // Per-element f32 bound k·ε·(Σ|x||w| · scale + |bias|), the scale's own
            // rounding (its sum of squares over k) on top, and the add's.
            let scales = fuse.rms_eps.map_or(vec![1.0; rows], |e| r::rms_row_scales(&x, k, e));
            let bound: Vec<f32> = (0..rows * n)
                .map(|i| {
                    let (b_, j) = (i / n, i % n);
                    let s: f32 = x[b_ * k..][..k]
                        .iter()
                        .zip(&w[j * k..][..k])
                        .map(|(a, c)| (a * c).abs())
                        .sum();
                    let eps = f32::EPSILON;
                    let bias_abs = if with_bias { bias[j].abs() } else { 0.0 };
                    (k as f32 + 2.0) * eps * (s * scales[b_] + bias_abs)
                        + (k as f32 + 8.0) * eps * v[i].abs()
                        + 2.0 * eps * want[i].abs()
                })
                .collect();
            let splits = dev.gemv_splits(rows, n, k, scratch.len());
            for split in [false, true] {
                let what = format!(
                    "gemv_bf16 rows={rows} n={n} k={k} bias={with_bias} {fuse:?} splits={}",
                    [1, splits][split as usize]
                );
                // bf16 output.
                let mut dy = dev.upload(&y0b).unwrap();
                let mut sv = scratch.as_view_mut();
                dev.gemv_bf16(
                    &dx.as_view(),
                    &dw.as_view(),
                    b,
                    &mut dy.as_view_mut(),
                    split.then_some(&mut sv),
                    rows,
                    n,
                    k,
                    fuse,
                )
                .unwrap();
                check_bf16(&what, &down_bf16(&dev, &dy, rows * n), &want, &round(&want_lo));
                // f32 output (logits).
                let mut dy = dev.upload(&y0).unwrap();
                let mut sv = scratch.as_view_mut();
                dev.gemv_bf16_f32(
                    &dx.as_view(),
                    &dw.as_view(),
                    b,
                    &mut dy.as_view_mut(),
                    split.then_some(&mut sv),
                    rows,
                    n,
                    k,
                    fuse,
                )
                .unwrap();
                let got = dev.download(&dy.as_view()).unwrap();
                for (i, ((g, w_), bd)) in got.iter().zip(&want).zip(&bound).enumerate() {
                    assert!(
                        (g - w_).abs() <= *bd,
                        "{what} (f32 out): [{i}] {g} vs {w_} (bound {bd:e})"
                    );
                }
            }
        }
    }
    assert!(
        dev.gemv_splits(1, 100, 4096, scratch.len()) > 1,
        "the sweep exercises split-K"
    );
    // Errors: K off the 16-byte grid, a bad eps.
    let (xb, _) = rand_bf16(&mut rng, 16, 1.0);
    let dx = dev.upload(&xb).unwrap();
    let mut dy = dev.alloc_zeros::<bf16>(4).unwrap();
    let gemv = |x: &cudarc::driver::CudaView<'_, bf16>, y: &mut cudarc::driver::CudaViewMut<'_, bf16>, k, fuse| {
        dev.gemv_bf16(x, &dx.as_view(), None, y, None, 1, 1, k, fuse)
            .unwrap_err()
            .to_string()
    };
    let e = gemv(&dx.slice(..12), &mut dy.as_view_mut(), 12, GemvFuse::NONE);
    assert!(e.contains("multiple of 8"), "{e}");
    let e = gemv(&dx.slice(..8), &mut dy.as_view_mut(), 8, GemvFuse::rms(-1.0));
    assert!(e.contains("eps -1 is not a finite non-negative number"), "{e}");
    let e = gemv(&dx.slice(..8), &mut dy.as_view_mut(), 8, GemvFuse::rms(f32::NAN));
    assert!(e.contains("eps NaN"), "{e}");
}

/// The LM head's fused argmax (gemv_bf16_argmax) picks each row's argmax of the very y
/// it writes (the twin's argmax of the downloaded rows, exactly), and y is the plain f32
/// GEMV's bit for bit: every row count, split and unsplit, with and without the RMS
/// scale and a bias, over one block, a handful and thousands. Some shapes rig ties for
/// the maximum (equal weight rows in one warp, in other blocks: the lowest column wins),
/// NaN and infinite logits, and rows of nothing but NaN (0). The keys and counter are
/// zero afterwards.
#[test]
fn gemv_bf16_argmax_is_the_argmax_of_y() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(81);
    let mut scratch = dev.alloc_zeros::<f32>(64 * 8 * 4608).unwrap();
    // (n, k, what the weights rig)
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Rig {
        Random,
        Ties,
        Special,
        AllNan,
    }
    let shapes = [
        (1, 8, Rig::Random),
        (16, 64, Rig::Random),
        (33, 64, Rig::Ties),
        (20011, 128, Rig::Ties),
        (100, 4096, Rig::Ties),
        (300, 64, Rig::Special),
        (40, 1024, Rig::AllNan),
    ];
    for &(n, k, rig) in &shapes {
        let (_, mut w) = rand_bf16(&mut rng, n * k, 1.0);
        let (_, mut bias) = rand_bf16(&mut rng, n, 1.0);
        // x > 0, so a weight row of ones has the sum of x: far above any random row's.
        let x_of = |rng: &mut Rng, rows: usize| {
            round(&rand_vec(rng, rows * k, 0.5).iter().map(|v| v + 0.5).collect::<Vec<_>>())
        };
        let set_row = |w: &mut Vec<f32>, j: usize, v: f32| w[j * k..][..k].fill(v);
        match rig {
            Rig::Random => {}
            Rig::Ties => {
                // The tied columns: two in one warp, one in another block, the last.
                for j in [n / 2 + 1, n / 2 + 3, n - 1, n / 2 + 17].into_iter().filter(|&j| j < n) {
                    set_row(&mut w, j, 1.0);
                    bias[j] = 0.25;
                }
            }
            Rig::Special => {
                set_row(&mut w, 7, f32::NAN); // NaN logits, never picked
                set_row(&mut w, 250, f32::INFINITY); // +inf logits, tied: 100 first
                set_row(&mut w, 100, f32::INFINITY);
            }
            Rig::AllNan => w.fill(f32::NAN),
        }
        let (wb, bb) = (to_bf16(&w), to_bf16(&bias));
        let (dw, db) = (dev.upload(&wb).unwrap(), dev.upload(&bb).unwrap());
        for rows in 1..=8 {
            if n * k > 1 << 20 && !matches!(rows, 1 | 6 | 8) {
                continue;
            }
            let fuse = [GemvFuse::NONE, GemvFuse::rms(1e-6)][rows % 2];
            let x = x_of(&mut rng, rows);
            let dx = dev.upload(&to_bf16(&x)).unwrap();
            let with_bias = rows % 3 != 0;
            let bias_view = db.as_view();
            let b = with_bias.then_some(&bias_view);
            let splits = dev.gemv_splits(rows, n, k, scratch.len());
            for split in [false, true] {
                let what = format!(
                    "gemv_bf16_argmax rows={rows} n={n} k={k} {rig:?} bias={with_bias} {fuse:?} splits={}",
                    [1, splits][split as usize]
                );
                let mut plain = dev.alloc_zeros::<f32>(rows * n).unwrap();
                let mut sv = scratch.as_view_mut();
                let (xv, wv) = (dx.as_view(), dw.as_view());
                dev.gemv_bf16_f32(
                    &xv,
                    &wv,
                    b,
                    &mut plain.as_view_mut(),
                    split.then_some(&mut sv),
                    rows,
                    n,
                    k,
                    fuse,
                )
                .unwrap();
                let mut dy = dev.alloc_zeros::<f32>(rows * n).unwrap();
                let mut ids = dev.upload(&vec![-7i32; rows]).unwrap();
                let mut sv = scratch.as_view_mut();
                dev.gemv_bf16_argmax(
                    &xv,
                    &wv,
                    b,
                    &mut dy.as_view_mut(),
                    &mut ids.as_view_mut(),
                    split.then_some(&mut sv),
                    rows,
                    n,
                    k,
                    fuse,
                )
                .unwrap();
                let y = dev.download(&dy.as_view()).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&dev.download(&plain.as_view()).unwrap()), "{what}: y");
                let got = dev.download(&ids.as_view()).unwrap();
                let want: Vec<i32> = y.chunks_exact(n).map(|row| r::argmax(row) as i32).collect();
                assert_eq!(got, want, "{what}: ids");
                match rig {
                    Rig::Ties if n > 40 => assert!(want.iter().all(|&i| i as usize == n / 2 + 1), "{what}: {want:?}"),
                    Rig::Special => assert!(want.iter().all(|&i| i == 100), "{what}: {want:?}"),
                    Rig::AllNan => assert!(want.iter().all(|&i| i == 0), "{what}: {want:?}"),
                    _ => {}
                }
                // The twin: the same ids where its logits' best stands out of rounding.
                let mut y_ref = vec![0.0; rows * n];
                let twin = r::gemv_bf16_argmax(&x, &w, with_bias.then_some(&bias[..]), &mut y_ref, k, fuse);
                if rig != Rig::Random {
                    let twin: Vec<i32> = twin.iter().map(|&i| i as i32).collect();
                    assert_eq!(got, twin, "{what}: twin");
                }
                assert_eq!(
                    dev.split_counters_set().unwrap(),
                    0,
                    "{what}: keys and counters left set"
                );
            }
        }
        if rig == Rig::Ties && n > 4096 {
            assert!(
                dev.gemv_splits(1, n, k, scratch.len()) == 1,
                "{n} columns take thousands of blocks"
            );
        }
    }
    assert!(
        dev.gemv_splits(1, 100, 4096, scratch.len()) > 1,
        "the sweep exercises split-K"
    );
    // Refused: an add into y, ids too short, rows of no entries.
    let dx = dev.alloc_zeros::<bf16>(16).unwrap();
    let mut dy = dev.alloc_zeros::<f32>(4).unwrap();
    let mut ids = dev.alloc_zeros::<i32>(2).unwrap();
    let mut e = |ids_len: usize, n: usize, fuse: GemvFuse| {
        dev.gemv_bf16_argmax(
            &dx.slice(..16),
            &dx.slice(..8 * n),
            None,
            &mut dy.slice_mut(..2 * n),
            &mut ids.slice_mut(..ids_len),
            None,
            2,
            n,
            8,
            fuse,
        )
        .unwrap_err()
        .to_string()
    };
    let msg = e(2, 2, GemvFuse::ADD);
    assert!(msg.contains("add_to_y"), "{msg}");
    let msg = e(1, 2, GemvFuse::NONE);
    assert!(msg.contains("ids"), "{msg}");
    let msg = e(2, 0, GemvFuse::NONE);
    assert!(msg.contains("no argmax"), "{msg}");
}

/// The QKV GEMV with RoPE and the cache write as its epilogue (gemv_rope_kv_append)
/// writes the very bits of gemv_bf16 (a bf16 qkv row) then rope_kv_append: q, and the
/// whole caches (rows before and after the block kept), for every row count, split over
/// K and not, plain RoPE and M-RoPE, head dims 4 to 128, with the start on the device too.
/// Against the twin within bf16's rounding of the qkv entries and of the rotation.
#[test]
fn gemv_rope_kv_append_is_the_gemv_then_rope_kv_append() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(83);
    let mut scratch = dev.alloc_zeros::<f32>(64 * 8 * 4608).unwrap();
    // (rows, hq, hkv, head_dim, k, cache len before, M-RoPE section)
    let cases = [
        (1, 14, 2, 64, 896, 37, None),
        (6, 28, 4, 128, 256, 100, Some([16, 24, 24])),
        (2, 2, 2, 4, 16, 1, None),
        (3, 3, 1, 8, 64, 5, Some([1, 2, 1])),
        (4, 4, 2, 64, 128, 0, None),
        (5, 1, 1, 32, 2048, 9, Some([4, 6, 6])),
        (7, 6, 2, 16, 32, 3, None),
        (8, 4, 2, 64, 128, 20, Some([8, 12, 12])),
    ];
    let mut split_seen = false;
    for (n, hq, hkv, hd, k, len, section) in cases {
        let (qr, kvr, cap) = (hq * hd, hkv * hd, len + n + 2);
        let width = qr + 2 * kvr;
        let (wb, w) = rand_bf16(&mut rng, width * k, 1.0);
        let (bb, bias) = rand_bf16(&mut rng, width, 1.0);
        let (xb, x) = rand_bf16(&mut rng, n * k, 2.0);
        let (kc_b, k_cache) = rand_bf16(&mut rng, cap * kvr, 1.0);
        let (vc_b, v_cache) = rand_bf16(&mut rng, cap * kvr, 1.0);
        let axes = if section.is_some() { 3 } else { 1 };
        let pos: Vec<i32> = (0..axes * n).map(|_| (rng.uniform() * 9000.0) as i32).collect();
        let (theta, eps) = (1e6, Some(1e-6));
        let shape = AttnShape {
            n,
            start: len,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
        };
        let (dx, dw, db, dp) = (
            dev.upload(&xb).unwrap(),
            dev.upload(&wb).unwrap(),
            dev.upload(&bb).unwrap(),
            dev.upload(&pos).unwrap(),
        );
        let splits = dev.gemv_splits(n, width, k, scratch.len());
        split_seen |= splits > 1;
        for split in [false, true] {
            let what = format!(
                "gemv_rope_kv_append n{n} hq{hq} hkv{hkv} d{hd} k{k} len{len} {section:?} splits={}",
                [1, splits][split as usize]
            );
            // The two kernels it replaces.
            let mut qkv = dev.alloc_zeros::<bf16>(n * width).unwrap();
            let mut sv = scratch.as_view_mut();
            dev.gemv_bf16(
                &dx.as_view(),
                &dw.as_view(),
                Some(&db.as_view()),
                &mut qkv.as_view_mut(),
                split.then_some(&mut sv),
                n,
                width,
                k,
                GemvFuse {
                    rms_eps: eps,
                    add_to_y: false,
                },
            )
            .unwrap();
            let mut q0 = dev.alloc_zeros::<bf16>(n * qr).unwrap();
            let (mut k0, mut v0) = (dev.upload(&kc_b).unwrap(), dev.upload(&vc_b).unwrap());
            dev.rope_kv_append(
                &qkv.as_view(),
                &dp.as_view(),
                &mut q0.as_view_mut(),
                &mut k0.as_view_mut(),
                &mut v0.as_view_mut(),
                shape,
                theta,
                section,
                None,
            )
            .unwrap();
            let want = [
                down_bf16(&dev, &q0, n * qr),
                down_bf16(&dev, &k0, cap * kvr),
                down_bf16(&dev, &v0, cap * kvr),
            ];
            // Fused, the start given and read on the device.
            let at = dev.upload(&[len as i32]).unwrap();
            let at = at.as_view();
            for on_device in [false, true] {
                let mut dq = dev.alloc_zeros::<bf16>(n * qr).unwrap();
                let (mut dk, mut dv) = (dev.upload(&kc_b).unwrap(), dev.upload(&vc_b).unwrap());
                let len_at = on_device.then_some(DeviceLen { at: &at, capacity: cap });
                let s = if on_device {
                    AttnShape { start: cap, ..shape }
                } else {
                    shape
                };
                let mut sv = scratch.as_view_mut();
                dev.gemv_rope_kv_append(
                    &dx.as_view(),
                    &dw.as_view(),
                    Some(&db.as_view()),
                    split.then_some(&mut sv),
                    &dp.as_view(),
                    &mut dq.as_view_mut(),
                    &mut dk.as_view_mut(),
                    &mut dv.as_view_mut(),
                    s,
                    k,
                    eps,
                    theta,
                    section,
                    len_at,
                )
                .unwrap();
                let got = [
                    down_bf16(&dev, &dq, n * qr),
                    down_bf16(&dev, &dk, cap * kvr),
                    down_bf16(&dev, &dv, cap * kvr),
                ];
                for (part, (g, w_)) in ["q", "k cache", "v cache"].iter().zip(got.iter().zip(&want)) {
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(g), bits(w_), "{what} (start on the device: {on_device}): {part}");
                }
                assert_eq!(dev.split_counters_set().unwrap(), 0, "{what}: counters left set");
            }
            // The twin: within the rounding of the qkv entries (which may round the other
            // way from the twin's f32 sums) and of the rotation.
            let mut tq = vec![0.0; n * qr];
            let (mut tk, mut tv) = (k_cache.clone(), v_cache.clone());
            r::gemv_rope_kv_append(
                &x,
                &w,
                Some(&bias),
                k,
                eps,
                &pos,
                section,
                &mut tq,
                &mut tk,
                &mut tv,
                len,
                (hq, hkv, hd),
                theta,
            );
            let mut qkv_ref = vec![0.0; n * width];
            r::gemv_bf16(
                &x,
                &w,
                Some(&bias),
                &mut qkv_ref,
                k,
                GemvFuse {
                    rms_eps: eps,
                    add_to_y: false,
                },
            );
            let half = hd / 2;
            let pair_mag = |t: usize, col: usize| {
                let (h0, i) = (col - col % hd, col % half);
                qkv_ref[t * width + h0 + i].abs() + qkv_ref[t * width + h0 + i + half].abs()
            };
            let tol = 2.0f32.powi(-7);
            for t in 0..n {
                for c in 0..qr {
                    let (g, w_) = (want[0][t * qr + c], tq[t * qr + c]);
                    assert!(
                        (g - w_).abs() <= tol * (pair_mag(t, c) + w_.abs()) + 1e-6,
                        "{what}: twin q[{t}, {c}] {g} vs {w_}"
                    );
                }
                for c in 0..kvr {
                    let i = (len + t) * kvr + c;
                    let (g, w_) = (want[1][i], tk[i]);
                    assert!(
                        (g - w_).abs() <= tol * (pair_mag(t, qr + c) + w_.abs()) + 1e-6,
                        "{what}: twin k[{t}, {c}] {g} vs {w_}"
                    );
                    let (g, w_) = (want[2][i], tv[i]);
                    assert!(
                        (g - w_).abs() <= tol * w_.abs() + 1e-6,
                        "{what}: twin v[{t}, {c}] {g} vs {w_}"
                    );
                }
            }
        }
    }
    assert!(split_seen, "the cases exercise split-K");
    // Refused: a head dim not a multiple of 4, more rows than a GEMV takes.
    let dx = dev.alloc_zeros::<bf16>(9 * 8).unwrap();
    let dw = dev.alloc_zeros::<bf16>(4 * 6 * 8).unwrap();
    let dp = dev.alloc_zeros::<i32>(9).unwrap();
    let mut dq = dev.alloc_zeros::<bf16>(9 * 24).unwrap();
    let (mut dk, mut dv) = (
        dev.alloc_zeros::<bf16>(9 * 24).unwrap(),
        dev.alloc_zeros::<bf16>(9 * 24).unwrap(),
    );
    let mut e = |n: usize, hd: usize| {
        let s = AttnShape {
            n,
            start: 0,
            q_heads: 2,
            kv_heads: 1,
            head_dim: hd,
        };
        dev.gemv_rope_kv_append(
            &dx.slice(..n * 8),
            &dw.slice(..4 * hd * 8),
            None,
            None,
            &dp.slice(..n),
            &mut dq.slice_mut(..n * 2 * hd),
            &mut dk.slice_mut(..n * hd),
            &mut dv.slice_mut(..n * hd),
            s,
            8,
            None,
            1e4,
            None,
            None,
        )
        .unwrap_err()
        .to_string()
    };
    let msg = e(1, 6);
    assert!(msg.contains("head_dim 6 is not a multiple of 4"), "{msg}");
    let msg = e(9, 4);
    assert!(msg.contains("9 rows"), "{msg}");
}

#[test]
fn gemv_swiglu_all_row_counts() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(32);
    // (inter, k): tiny, odd inter (a warp's second output past the end), the drafter's
    // MLP, and short ones that split K (gemv_splits > 1 with the scratch).
    let shapes = [(1, 8), (37, 64), (4864, 896), (12, 2048), (5, 18944)];
    let mut scratch = dev.alloc_zeros::<f32>(64 * 8 * 2 * 4864).unwrap();
    let mut split_seen = false;
    for &(inter, k) in &shapes {
        let (wb, w) = rand_bf16(&mut rng, 2 * inter * k, 1.0);
        let dw = dev.upload(&wb).unwrap();
        for rows in 1..=8 {
            if inter * k > 1 << 20 && !matches!(rows, 1 | 6 | 8) {
                continue; // keep the CPU reference's time modest on the big shapes
            }
            // Even row counts take x as the residual stream, RMS-normalised on the way in.
            let rms = (rows % 2 == 0).then_some(1e-6);
            // Scaled so that the gate spans silu's curve, not only its linear tail (the
            // RMS scale maps rows to unit rms; w's columns then set the spread).
            let (xb, x) = match rms {
                None => rand_bf16(&mut rng, rows * k, 4.0 / (k as f32).sqrt()),
                Some(_) => rand_bf16(&mut rng, rows * k, 3.0),
            };
            let w_used: Vec<f32> = match rms {
                None => w.clone(),
                Some(_) => round(&w.iter().map(|v| v * 4.0 / (k as f32).sqrt()).collect::<Vec<_>>()),
            };
            let dw_used = rms.map(|_| dev.upload(&to_bf16(&w_used)).unwrap());
            let dx = dev.upload(&xb).unwrap();
            let mut want = vec![0.0; rows * inter];
            r::gemv_swiglu(&x, &w_used, &mut want, k, rms);
            // The bf16 computation: the projection rounded before the gate, as the unfused
            // gemv_bf16 + swiglu (and a bf16 framework) round it.
            let mut gate_up = vec![0.0; rows * 2 * inter];
            let fuse = GemvFuse {
                rms_eps: rms,
                add_to_y: false,
            };
            r::gemv_bf16(&x, &w_used, None, &mut gate_up, k, fuse);
            let mut want_lo = vec![0.0; rows * inter];
            r::swiglu(&round(&gate_up), &mut want_lo, inter);
            let splits = dev.gemv_splits(rows, 2 * inter, k, scratch.len());
            split_seen |= splits > 1;
            for split in [false, true] {
                let what = format!(
                    "gemv_swiglu rows={rows} inter={inter} k={k} rms={rms:?} splits={}",
                    [1, splits][split as usize]
                );
                let mut dy = dev.alloc_zeros::<bf16>(rows * inter).unwrap();
                let mut sv = scratch.as_view_mut();
                dev.gemv_swiglu(
                    &dx.as_view(),
                    &dw_used.as_ref().unwrap_or(&dw).as_view(),
                    &mut dy.as_view_mut(),
                    split.then_some(&mut sv),
                    rows,
                    inter,
                    k,
                    rms,
                )
                .unwrap();
                check_bf16(&what, &down_bf16(&dev, &dy, rows * inter), &want, &round(&want_lo));
            }
        }
    }
    assert!(split_seen, "the sweep exercises split-K");
    let dx = dev.alloc_zeros::<bf16>(32).unwrap();
    let mut dy = dev.alloc_zeros::<bf16>(4).unwrap();
    let mut swiglu = |k, w_len: usize, rms| {
        dev.gemv_swiglu(
            &dx.slice(..k),
            &dx.slice(..w_len),
            &mut dy.as_view_mut(),
            None,
            1,
            2,
            k,
            rms,
        )
        .unwrap_err()
        .to_string()
    };
    let e = swiglu(4, 16, None);
    assert!(e.contains("multiple of 8"), "{e}");
    let e = swiglu(8, 16, None);
    assert!(e.contains("w holds 16 elements, needs 32"), "{e}");
    let e = swiglu(8, 32, Some(f32::INFINITY));
    assert!(e.contains("eps inf"), "{e}");
}

#[test]
fn gemm_cublas_and_linear_cublaslt() {
    let dev = dev_or_skip!();
    if let Err(e) = dev.cublas_status() {
        panic!("a CUDA device but no cuBLAS: {e}");
    }
    let mut rng = Rng::new(9);
    // (17, 100, 96), (5, 3420, 1280), (7, 1280, 3420): n or k off the 8-element grid,
    // where `linear` takes cuBLAS and a separate bias add.
    let shapes = [
        (1, 64, 64),
        (17, 100, 96),
        (300, 512, 256),
        (64, 1280, 1176),
        (5, 3420, 1280),
        (7, 1280, 3420),
    ];
    for &(m, n, k) in &shapes {
        let c = LinearCase::new(&dev, &mut rng, m, n, k);
        let mut dy = dev.alloc_zeros::<bf16>(m * n).unwrap();
        dev.gemm_bf16(&c.dx.as_view(), &c.dw.as_view(), &mut dy.as_view_mut(), m, n, k)
            .unwrap();
        let mut want = vec![0.0; m * n];
        r::linear(&c.x, &c.w, None, &mut want, k);
        check_bf16(
            &format!("gemm_bf16 {m}x{n}x{k}"),
            &down_bf16(&dev, &dy, m * n),
            &want,
            &round(&want),
        );
        c.linear_checked(&dev, &format!("linear {m}x{n}x{k}"));
        // f32 out (a tree's logits): within the k·ε·Σ|x||w| bound of the f32 result.
        let mut dy = dev.alloc_zeros::<f32>(m * n).unwrap();
        dev.gemm_bf16_f32(&c.dx.as_view(), &c.dw.as_view(), &mut dy.as_view_mut(), m, n, k)
            .unwrap();
        let got = dev.download(&dy.as_view()).unwrap();
        for (i, (g, w_)) in got.iter().zip(&want).enumerate() {
            let (row, col) = (i / n, i % n);
            let s: f32 = (c.x[row * k..][..k].iter())
                .zip(&c.w[col * k..][..k])
                .map(|(a, b)| (a * b).abs())
                .sum();
            let bound = (k as f32 + 2.0) * f32::EPSILON * s;
            assert!(
                (g - w_).abs() <= bound,
                "gemm_bf16_f32 {m}x{n}x{k} [{i}]: {g} vs {w_} (bound {bound:e})"
            );
        }
    }
    let mut y = dev.alloc_zeros::<f32>(4).unwrap();
    let x = dev.alloc_zeros::<bf16>(8).unwrap();
    let e = dev
        .gemm_bf16_f32(&x.as_view(), &x.as_view(), &mut y.as_view_mut(), 2, 3, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gemm_bf16_f32") && e.contains('y'), "{e}");
}

/// A `linear` problem: inputs on the host and the device, the f32 result and the bf16
/// computation's (cuBLASLt's epilogue may add the bias after rounding the product to
/// bf16: one more rounding than the f32 result).
struct LinearCase {
    x: Vec<f32>,
    w: Vec<f32>,
    dx: cudarc::driver::CudaSlice<bf16>,
    dw: cudarc::driver::CudaSlice<bf16>,
    db: cudarc::driver::CudaSlice<bf16>,
    want: Vec<f32>,
    lo: Vec<f32>,
    shape: (usize, usize, usize),
}

impl LinearCase {
    fn new(dev: &CudaDevice, rng: &mut Rng, m: usize, n: usize, k: usize) -> Self {
        let (xb, x) = rand_bf16(rng, m * k, 1.0);
        let (wb, w) = rand_bf16(rng, n * k, 1.0);
        let (bb, bias) = rand_bf16(rng, n, 1.0);
        let mut want = vec![0.0; m * n];
        r::linear(&x, &w, Some(&bias), &mut want, k);
        let mut lo = vec![0.0; m * n];
        r::linear(&x, &w, None, &mut lo, k);
        let lo = round(&lo).iter().zip(bias.iter().cycle()).map(|(a, b)| a + b).collect();
        LinearCase {
            dx: dev.upload(&xb).unwrap(),
            dw: dev.upload(&wb).unwrap(),
            db: dev.upload(&bb).unwrap(),
            x,
            w,
            want,
            lo,
            shape: (m, n, k),
        }
    }

    /// Runs `linear` with the bias and checks its result.
    fn linear_checked(&self, dev: &CudaDevice, what: &str) {
        let (m, n, k) = self.shape;
        let mut dy = dev.alloc_zeros::<bf16>(m * n).unwrap();
        let (x, w, b) = (self.dx.as_view(), self.dw.as_view(), self.db.as_view());
        dev.linear(&x, &w, Some(&b), &mut dy.as_view_mut(), m, n, k)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        check_bf16(what, &down_bf16(dev, &dy, m * n), &self.want, &round(&self.lo));
    }
}

/// Where cuBLASLt's heuristic finds no algorithm for a shape, `linear` takes cuBLAS and a
/// separate bias add (one kernel launch, where the fused epilogue launches none of
/// ours), with the same result. The emulator switches the heuristic off for the whole
/// process: the other tests' `linear` calls meanwhile take the fallback too, which
/// gives them the same results.
#[test]
fn linear_without_a_cublaslt_algorithm_takes_cublas() {
    let dev = dev_or_skip!();
    if !massv_cuda_emu::loaded() {
        println!("skipped: cuBLASLt's heuristic is switched off in the CUDA emulator only (MASSV_CUDA_EMU=1)");
        return;
    }
    let c = LinearCase::new(&dev, &mut Rng::new(10), 9, 64, 128);
    for available in [false, true] {
        massv_cuda_emu::set_lt_algorithms(available).unwrap();
        massv_cuda_emu::reset_stats().unwrap();
        let what = format!("linear with cuBLASLt algorithms {available}");
        let ran = std::panic::catch_unwind(|| c.linear_checked(&dev, &what));
        let launches = massv_cuda_emu::stats().unwrap().launches;
        massv_cuda_emu::set_lt_algorithms(true).unwrap();
        if let Err(p) = ran {
            std::panic::resume_unwind(p);
        }
        assert_eq!(
            launches, !available as u64,
            "{what}: the bias_add launches only in the fallback"
        );
    }
}

// -------------------------------------------------------------------------------------
// Attention

/// The "bf16 computation" of attention for the tolerance, as a bf16 framework computes it
/// (flash-attention's reference with upcast=False): scores rounded to bf16, softmax
/// probabilities rounded to bf16 before the PV product (f32 accumulation), output rounded.
/// `visible(t, j)`: query t sees key j.
#[allow(clippy::too_many_arguments)]
fn attention_lo(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    keys: usize,
    visible: impl Fn(usize, usize) -> bool,
) -> Vec<f32> {
    let (group, scale) = (hq / hkv, 1.0 / (d as f32).sqrt());
    let mut out = vec![0.0; n * hq * d];
    for t in 0..n {
        let js: Vec<usize> = (0..keys).filter(|&j| visible(t, j)).collect();
        for h in 0..hq {
            let kh = h / group;
            let qv = &q[(t * hq + h) * d..][..d];
            let s: Vec<f32> = js
                .iter()
                .map(|&j| {
                    let dot = qv
                        .iter()
                        .zip(&k[(j * hkv + kh) * d..][..d])
                        .map(|(a, b)| a * b)
                        .sum::<f32>();
                    bf16::from_f32(dot * scale).to_f32()
                })
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            let o = &mut out[(t * hq + h) * d..][..d];
            for (&j, &p) in js.iter().zip(&e) {
                let p = bf16::from_f32(p / sum).to_f32();
                for (oi, &vi) in o.iter_mut().zip(&v[(j * hkv + kh) * d..][..d]) {
                    *oi += p * vi;
                }
            }
        }
    }
    round(&out)
}

struct Qkv {
    q: (Vec<bf16>, Vec<f32>),
    k: (Vec<bf16>, Vec<f32>),
    v: (Vec<bf16>, Vec<f32>),
}

fn qkv(rng: &mut Rng, n: usize, keys: usize, hq: usize, hkv: usize, d: usize) -> Qkv {
    Qkv {
        q: rand_bf16(rng, n * hq * d, 1.0),
        k: rand_bf16(rng, keys * hkv * d, 1.0),
        v: rand_bf16(rng, keys * hkv * d, 1.0),
    }
}

const GQA: [(usize, usize); 4] = [(4, 4), (8, 4), (8, 2), (14, 2)];

#[test]
fn attention_prefill_causal_gqa_and_window() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(10);
    let mut scratch = dev.attn_scratch(300 * 14, 64, 128).unwrap();
    for &(hq, hkv) in &GQA {
        for &d in &ATTN_HEAD_DIMS {
            for &(n, start, window) in &[
                (1, 0, None),
                (7, 0, None),
                (65, 37, None),
                (300, 0, None),
                (70, 20, Some(33)),
            ] {
                if d != 128 && n == 300 {
                    continue;
                }
                let keys = start + n;
                let t = qkv(&mut rng, n, keys, hq, hkv, d);
                let (dq, dk, dv) = (
                    dev.upload(&t.q.0).unwrap(),
                    dev.upload(&t.k.0).unwrap(),
                    dev.upload(&t.v.0).unwrap(),
                );
                let shape = AttnShape {
                    n,
                    start,
                    q_heads: hq,
                    kv_heads: hkv,
                    head_dim: d,
                };
                let mut want = vec![0.0; n * hq * d];
                r::attention_prefill(&t.q.1, &t.k.1, &t.v.1, &mut want, start, hq, hkv, d, window);
                let lo = attention_lo(&t.q.1, &t.k.1, &t.v.1, n, hq, hkv, d, keys, |tq, j| {
                    j <= start + tq && window.is_none_or(|w| j + w > start + tq)
                });
                for split in [false, true] {
                    let mut dout = dev.alloc_zeros::<bf16>(n * hq * d).unwrap();
                    dev.attention_prefill(
                        &dq.as_view(),
                        &dk.as_view(),
                        &dv.as_view(),
                        &mut dout.as_view_mut(),
                        shape,
                        window,
                        split.then_some(&mut scratch),
                    )
                    .unwrap();
                    let what = format!(
                        "attention_prefill hq={hq} hkv={hkv} d={d} n={n} start={start} window={window:?} split={split}"
                    );
                    check_bf16(&what, &down_bf16(&dev, &dout, n * hq * d), &want, &lo);
                }
            }
        }
    }
}

/// Decode attention split over the keys, against its twin: with the length given at
/// launch, and read on the device (a CUDA graph's launch: one configuration, split for a
/// capacity of 4096, serves every length; the keys past the length are NaN, so a split
/// that reads past it fails the comparison).
#[test]
fn attention_decode_split_k() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(11);
    let mut scratch = dev.attn_scratch(28, 256, 128).unwrap();
    let cap = 4096;
    for &(hq, hkv, d) in &[
        (28, 4, 128),
        (14, 2, 64),
        (8, 8, 80),
        (8, 2, 128),
        (4, 2, 64),
        (4, 2, 32),
        (4, 2, 16),
    ] {
        for &len in &[1, 2, 63, 64, 65, 1000, cap] {
            let t = qkv(&mut rng, 1, len, hq, hkv, d);
            let mut want = vec![0.0; hq * d];
            r::attention_decode(&t.q.1, &t.k.1, &t.v.1, &mut want, hq, hkv, d);
            let lo = attention_lo(&t.q.1, &t.k.1, &t.v.1, 1, hq, hkv, d, len, |_, _| true);
            let dq = dev.upload(&t.q.0).unwrap();
            for on_device in [false, true] {
                let keys = if on_device { cap } else { len };
                let pad = |x: &[bf16]| -> Vec<bf16> {
                    let mut full = x.to_vec();
                    full.resize(keys * hkv * d, bf16::NAN);
                    full
                };
                let (dk, dv) = (dev.upload(&pad(&t.k.0)).unwrap(), dev.upload(&pad(&t.v.0)).unwrap());
                let at = dev.upload(&[len as i32 - 1]).unwrap();
                let mut dout = dev.alloc_zeros::<bf16>(hq * d).unwrap();
                let (q, k, v, mut out) = (dq.as_view(), dk.as_view(), dv.as_view(), dout.as_view_mut());
                if on_device {
                    let len_at = DeviceLen {
                        at: &at.as_view(),
                        capacity: cap,
                    };
                    dev.attention_decode_at(&q, &k, &v, &mut out, len_at, hq, hkv, d, &mut scratch)
                } else {
                    dev.attention_decode(&q, &k, &v, &mut out, len, hq, hkv, d, &mut scratch)
                }
                .unwrap();
                let what = format!("attention_decode hq={hq} hkv={hkv} d={d} len={len} on_device={on_device}");
                check_bf16(&what, &down_bf16(&dev, &dout, hq * d), &want, &lo);
            }
        }
    }
}

/// `launch` (writing `y`) gives the same bits every time, `repeats` times directly and
/// `repeats` times replayed from a graph of it, with y poisoned (NaN) before each, and
/// leaves no split-K counter set.
fn same_every_launch(
    dev: &CudaDevice,
    what: &str,
    repeats: usize,
    y: &mut cudarc::driver::CudaSlice<bf16>,
    mut launch: impl FnMut(&mut cudarc::driver::CudaViewMut<'_, bf16>) -> massv::Result<()>,
) {
    use cudarc::driver::CudaSlice;
    let poison = vec![bf16::NAN; y.len()];
    let run = |y: &mut CudaSlice<bf16>, f: &mut dyn FnMut(&mut CudaSlice<bf16>)| -> Vec<u16> {
        dev.upload_into(&poison, &mut y.as_view_mut()).unwrap();
        f(y);
        dev.download(&y.as_view())
            .unwrap()
            .iter()
            .map(|b| b.to_bits())
            .collect()
    };
    let first = run(y, &mut |y| launch(&mut y.as_view_mut()).unwrap());
    assert!(
        first.iter().all(|&b| bf16::from_bits(b).is_finite()),
        "{what}: the first launch wrote every output"
    );
    for i in 1..repeats {
        let again = run(y, &mut |y| launch(&mut y.as_view_mut()).unwrap());
        assert!(again == first, "{what}: launch {i} differs from the first");
    }
    assert_eq!(dev.split_counters_set().unwrap(), 0, "{what}: counters left set");
    let graph = dev.capture(|| launch(&mut y.as_view_mut())).unwrap();
    for i in 0..repeats {
        let again = run(y, &mut |_| dev.launch_graph(&graph).unwrap());
        assert!(again == first, "{what}: replay {i} differs from the first launch");
    }
    assert_eq!(
        dev.split_counters_set().unwrap(),
        0,
        "{what}: counters left set by the replays"
    );
    // Back to back with no copy between, where under programmatic dependent launch each
    // launch may start while the one before still merges: the last one's bits are the
    // first's (every launch writes the same y).
    let was = dev.pdl();
    for pdl in [false, true] {
        if dev.set_pdl(pdl) != pdl {
            println!("{what}: programmatic dependent launch is not on this device");
            continue;
        }
        let again = run(y, &mut |y| {
            for _ in 0..repeats {
                launch(&mut y.as_view_mut()).unwrap();
            }
        });
        assert!(
            again == first,
            "{what}: {repeats} launches back to back (programmatic: {pdl}) end with other bits than the first"
        );
        assert_eq!(
            dev.split_counters_set().unwrap(),
            0,
            "{what}: counters left set by launches back to back (programmatic: {pdl})"
        );
    }
    dev.set_pdl(was);
}

/// The split-K merges (a GEMV's or decode attention's last split to arrive sums what the
/// others left in the scratch, then resets its counter) give the same bits at every
/// launch, direct or replayed from a graph, and leave every counter at zero. The emulator
/// runs a grid's blocks one at a time; a GPU runs them at once, so a merge that reads a
/// partial before it is visible, or a counter left set, shows here. On a GPU: the real
/// shapes that split (the 7B target's o and down projections, the drafter's down
/// projection; decode attention after 4000 keys), 200 launches each way, and 200 back to
/// back with programmatic dependent launch off and on; on the emulator short matrices that
/// split at its 4 multiprocessors, twice.
#[test]
fn split_k_merges_the_same_every_launch() {
    let dev = dev_or_skip!();
    let emu = massv_cuda_emu::loaded();
    let repeats = if emu { 2 } else { 200 };
    let mut rng = Rng::new(21);
    let mut scratch = dev.alloc_zeros::<f32>(64 * 8 * 4608).unwrap();
    // The emulator's 4 multiprocessors split only short matrices.
    let gemvs: &[(usize, usize, usize)] = if emu {
        &[(1, 100, 4096), (6, 100, 4096)]
    } else {
        &[
            (1, 896, 4864),
            (6, 896, 4864),
            (1, 3584, 3584),
            (6, 3584, 3584),
            (1, 3584, 18944),
            (6, 3584, 18944),
        ]
    };
    let mut split = 0;
    for &(rows, n, k) in gemvs {
        let splits = dev.gemv_splits(rows, n, k, scratch.len());
        let what = format!("gemv_bf16 rows={rows} n={n} k={k} splits={splits}");
        if splits == 1 {
            println!("{what}: not split on this device");
            continue;
        }
        split += 1;
        let (dw, dx) = (
            dev.upload(&rand_bf16(&mut rng, n * k, 1.0).0).unwrap(),
            dev.upload(&rand_bf16(&mut rng, rows * k, 1.0).0).unwrap(),
        );
        let mut y = dev.alloc_zeros::<bf16>(rows * n).unwrap();
        same_every_launch(&dev, &what, repeats, &mut y, |y| {
            let (x, w, mut sv) = (dx.as_view(), dw.as_view(), scratch.as_view_mut());
            dev.gemv_bf16(&x, &w, None, y, Some(&mut sv), rows, n, k, GemvFuse::rms(1e-6))
        });
    }
    assert!(split > 0, "no GEMV shape split K on this device");
    let (hq, hkv, d, len) = if emu { (14, 2, 64, 1000) } else { (28, 4, 128, 4000) };
    let t = qkv(&mut rng, 1, len, hq, hkv, d);
    let (dq, dk, dv) = (
        dev.upload(&t.q.0).unwrap(),
        dev.upload(&t.k.0).unwrap(),
        dev.upload(&t.v.0).unwrap(),
    );
    let mut attn_scratch = dev.attn_scratch(hq, 256, d).unwrap();
    let mut y = dev.alloc_zeros::<bf16>(hq * d).unwrap();
    let what = format!("attention_decode hq={hq} hkv={hkv} d={d} len={len}");
    same_every_launch(&dev, &what, repeats, &mut y, |y| {
        let (q, k, v) = (dq.as_view(), dk.as_view(), dv.as_view());
        dev.attention_decode(&q, &k, &v, y, len, hq, hkv, d, &mut attn_scratch)
    });
}

/// Causal attention of a few queries with their start read on the device (a CUDA graph's
/// pass fed several tokens): one launch configuration, split for the capacity, at every
/// start; the keys past the block are NaN, so reading past it fails the comparison.
#[test]
fn attention_prefill_at_every_start() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(12);
    let mut scratch = dev.attn_scratch(8 * 28, 256, 128).unwrap();
    let cap = 2048;
    for &(hq, hkv, d) in &[(28, 4, 128), (14, 2, 64), (8, 8, 80), (4, 2, 16)] {
        for &(n, start) in &[(2, 0), (2, 1), (2, 62), (3, 64), (8, 1000), (2, cap - 2)] {
            let keys = start + n;
            let t = qkv(&mut rng, n, keys, hq, hkv, d);
            let mut want = vec![0.0; n * hq * d];
            r::attention_prefill(&t.q.1, &t.k.1, &t.v.1, &mut want, start, hq, hkv, d, None);
            let lo = attention_lo(&t.q.1, &t.k.1, &t.v.1, n, hq, hkv, d, keys, |tq, j| j <= start + tq);
            let pad = |x: &[bf16]| -> Vec<bf16> {
                let mut full = x.to_vec();
                full.resize(cap * hkv * d, bf16::NAN);
                full
            };
            let (dq, dk, dv) = (
                dev.upload(&t.q.0).unwrap(),
                dev.upload(&pad(&t.k.0)).unwrap(),
                dev.upload(&pad(&t.v.0)).unwrap(),
            );
            let at = dev.upload(&[start as i32]).unwrap();
            let len = DeviceLen {
                at: &at.as_view(),
                capacity: cap,
            };
            let mut dout = dev.alloc_zeros::<bf16>(n * hq * d).unwrap();
            let (q, k, v, mut out) = (dq.as_view(), dk.as_view(), dv.as_view(), dout.as_view_mut());
            dev.attention_prefill_at(&q, &k, &v, &mut out, len, n, hq, hkv, d, &mut scratch)
                .unwrap();
            let what = format!("attention_prefill_at hq={hq} hkv={hkv} d={d} n={n} start={start}");
            check_bf16(&what, &down_bf16(&dev, &dout, n * hq * d), &want, &lo);
        }
    }
    let at = dev.upload(&[0i32]).unwrap();
    let (q, kv) = (
        dev.alloc_zeros::<bf16>(3 * 4 * 16).unwrap(),
        dev.alloc_zeros::<bf16>(2 * 2 * 16).unwrap(),
    );
    let mut out = dev.alloc_zeros::<bf16>(3 * 4 * 16).unwrap();
    let len = DeviceLen {
        at: &at.as_view(),
        capacity: 2,
    };
    let e = dev
        .attention_prefill_at(
            &q.as_view(),
            &kv.as_view(),
            &kv.as_view(),
            &mut out.as_view_mut(),
            len,
            3,
            4,
            2,
            16,
            &mut scratch,
        )
        .unwrap_err();
    assert!(e.to_string().contains("3 queries exceed a cache of 2"), "{e}");
}

/// A random tree over n nodes (node 0 the root, parents before children) as an ancestor
/// mask (self included); `chain` gives the causal mask.
fn tree_mask(rng: &mut Rng, n: usize, chain: bool) -> Vec<u8> {
    let mut parent = vec![0usize; n];
    for (i, p) in parent.iter_mut().enumerate().skip(1) {
        *p = if chain {
            i - 1
        } else {
            (rng.uniform() * i as f64) as usize
        };
    }
    let mut mask = vec![0u8; n * n];
    for t in 0..n {
        let mut a = t;
        loop {
            mask[t * n + a] = 1;
            if a == 0 {
                break;
            }
            a = parent[a];
        }
    }
    mask
}

#[test]
fn twin_attention_verify_chain_is_causal_and_tree_is_per_branch() {
    // No device needed: the verify twin with a chain mask is the causal twin; with a tree,
    // each query equals a causal pass over its own ancestor path.
    let mut rng = Rng::new(21);
    let (hq, hkv, d, start, n) = (4, 2, 16, 11, 6);
    let t = qkv(&mut rng, n, start + n, hq, hkv, d);
    let (q, k, v) = (&t.q.1, &t.k.1, &t.v.1);
    let mut got = vec![0.0; n * hq * d];
    r::attention_verify(
        q,
        k,
        v,
        &mut got,
        &tree_mask(&mut rng, n, true),
        start,
        start,
        hq,
        hkv,
        d,
    );
    let mut want = vec![0.0; n * hq * d];
    r::attention(q, k, v, &mut want, start, hq, hkv, d, None);
    assert!(max_err(&got, &want) < 1e-5);
    let mask = tree_mask(&mut rng, n, false);
    r::attention_verify(q, k, v, &mut got, &mask, start, start, hq, hkv, d);
    let row = hkv * d;
    for tq in 0..n {
        let path: Vec<usize> = (0..n).filter(|&j| mask[tq * n + j] != 0).collect();
        let (mut kp, mut vp) = (k[..start * row].to_vec(), v[..start * row].to_vec());
        for &j in &path {
            kp.extend_from_slice(&k[(start + j) * row..][..row]);
            vp.extend_from_slice(&v[(start + j) * row..][..row]);
        }
        let mut o = vec![0.0; hq * d];
        r::attention_decode(&q[tq * hq * d..][..hq * d], &kp, &vp, &mut o, hq, hkv, d);
        assert!(
            max_err(&o, &got[tq * hq * d..][..hq * d]) < 1e-5,
            "query {tq} path {path:?}"
        );
    }
}

/// A mask over `span` keys for the last n of them as queries (the drafter's case: the
/// first span − n are earlier tree nodes already cached): a random tree's ancestor rows
/// or, with `ancestors` false, random bits. [n, span].
fn drafter_mask(rng: &mut Rng, span: usize, n: usize, ancestors: bool) -> Vec<u8> {
    if ancestors {
        let full = tree_mask(rng, span, false);
        full[(span - n) * span..].to_vec()
    } else {
        (0..n * span).map(|_| (rng.uniform() < 0.5) as u8).collect()
    }
}

#[test]
fn twin_attention_verify_mask_start_below_start_sees_exactly_its_keys() {
    // No device needed: with mask_start < start the mask covers earlier cached keys too;
    // each query equals plain attention over exactly the keys it sees (every key before
    // mask_start, then its mask's), and a query that sees none gives zeros.
    let mut rng = Rng::new(23);
    let (hq, hkv, d) = (4, 2, 16);
    let row = hkv * d;
    for &(mask_start, start, n) in &[(0, 5, 4), (3, 9, 6), (7, 8, 1), (10, 17, 5), (0, 0, 3), (20, 40, 32)] {
        let span = start + n - mask_start;
        let t = qkv(&mut rng, n, start + n, hq, hkv, d);
        let (q, k, v) = (&t.q.1, &t.k.1, &t.v.1);
        for ancestors in [true, false] {
            let mask = drafter_mask(&mut rng, span, n, ancestors);
            let mut got = vec![f32::NAN; n * hq * d];
            r::attention_verify(q, k, v, &mut got, &mask, mask_start, start, hq, hkv, d);
            for tq in 0..n {
                let keys: Vec<usize> = (0..mask_start)
                    .chain((0..span).filter(|&j| mask[tq * span + j] != 0).map(|j| mask_start + j))
                    .collect();
                let o_got = &got[tq * hq * d..][..hq * d];
                if keys.is_empty() {
                    assert!(o_got.iter().all(|&x| x == 0.0), "query {tq} sees no key: zeros");
                    continue;
                }
                let (mut kp, mut vp) = (Vec::new(), Vec::new());
                for &j in &keys {
                    kp.extend_from_slice(&k[j * row..][..row]);
                    vp.extend_from_slice(&v[j * row..][..row]);
                }
                let mut o = vec![0.0; hq * d];
                r::attention_decode(&q[tq * hq * d..][..hq * d], &kp, &vp, &mut o, hq, hkv, d);
                assert!(
                    max_err(&o, o_got) < 1e-5,
                    "mask_start={mask_start} start={start} n={n} query {tq} keys {keys:?}"
                );
            }
        }
    }
}

#[test]
fn attention_verify_chain_and_tree() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(12);
    let mut scratch = dev.attn_scratch(32 * 28, 256, 128).unwrap();
    for &(hq, hkv, d) in &[
        (28, 4, 128),
        (14, 2, 64),
        (8, 4, 80),
        (4, 4, 128),
        (4, 2, 32),
        (4, 2, 16),
    ] {
        for n in 2..=9 {
            for &start in &[0usize, 100, 2000] {
                for chain in [true, false] {
                    if !chain && start == 2000 && n % 3 != 0 {
                        continue;
                    }
                    let keys = start + n;
                    let t = qkv(&mut rng, n, keys, hq, hkv, d);
                    let mask = tree_mask(&mut rng, n, chain);
                    let (dq, dk, dv) = (
                        dev.upload(&t.q.0).unwrap(),
                        dev.upload(&t.k.0).unwrap(),
                        dev.upload(&t.v.0).unwrap(),
                    );
                    let dm = dev.upload(&mask).unwrap();
                    let mut dout = dev.alloc_zeros::<bf16>(n * hq * d).unwrap();
                    let shape = AttnShape {
                        n,
                        start,
                        q_heads: hq,
                        kv_heads: hkv,
                        head_dim: d,
                    };
                    dev.attention_verify(
                        &dq.as_view(),
                        &dk.as_view(),
                        &dv.as_view(),
                        &mut dout.as_view_mut(),
                        &dm.as_view(),
                        start,
                        shape,
                        &mut scratch,
                    )
                    .unwrap();
                    let mut want = vec![0.0; n * hq * d];
                    r::attention_verify(&t.q.1, &t.k.1, &t.v.1, &mut want, &mask, start, start, hq, hkv, d);
                    if chain {
                        // A chain's mask is causal: the same as a prefill of the block.
                        let mut causal = vec![0.0; n * hq * d];
                        r::attention(&t.q.1, &t.k.1, &t.v.1, &mut causal, start, hq, hkv, d, None);
                        assert!(max_err(&causal, &want) < 1e-5, "verify twin vs causal twin");
                    }
                    let lo = attention_lo(&t.q.1, &t.k.1, &t.v.1, n, hq, hkv, d, keys, |tq, j| {
                        j < start || mask[tq * n + j - start] != 0
                    });
                    let what = format!("attention_verify hq={hq} hkv={hkv} d={d} n={n} start={start} chain={chain}");
                    check_bf16(&what, &down_bf16(&dev, &dout, n * hq * d), &want, &lo);
                }
            }
        }
        // The drafter's case, mask_start < start: the mask also covers earlier tree nodes
        // already cached (ancestor rows of a random tree, or random bits that keep every
        // key before mask_start); and a 32-node target tree.
        for &(mask_start, start, n, ancestors) in &[
            (90, 100, 6, true),
            (0, 40, 9, true),
            (1990, 2000, 4, true),
            (60, 64, 8, false),
            (1, 3, 5, false),
            (2016, 2048, 32, true),
            (500, 500, 32, true),
        ] {
            let keys = start + n;
            let span = keys - mask_start;
            let t = qkv(&mut rng, n, keys, hq, hkv, d);
            let mask = drafter_mask(&mut rng, span, n, ancestors);
            let (dq, dk, dv) = (
                dev.upload(&t.q.0).unwrap(),
                dev.upload(&t.k.0).unwrap(),
                dev.upload(&t.v.0).unwrap(),
            );
            let dm = dev.upload(&mask).unwrap();
            let mut dout = dev.alloc_zeros::<bf16>(n * hq * d).unwrap();
            let shape = AttnShape {
                n,
                start,
                q_heads: hq,
                kv_heads: hkv,
                head_dim: d,
            };
            dev.attention_verify(
                &dq.as_view(),
                &dk.as_view(),
                &dv.as_view(),
                &mut dout.as_view_mut(),
                &dm.as_view(),
                mask_start,
                shape,
                &mut scratch,
            )
            .unwrap();
            let mut want = vec![0.0; n * hq * d];
            r::attention_verify(&t.q.1, &t.k.1, &t.v.1, &mut want, &mask, mask_start, start, hq, hkv, d);
            let lo = attention_lo(&t.q.1, &t.k.1, &t.v.1, n, hq, hkv, d, keys, |tq, j| {
                j < mask_start || mask[tq * span + j - mask_start] != 0
            });
            let what = format!(
                "attention_verify hq={hq} hkv={hkv} d={d} n={n} start={start} mask_start={mask_start} ancestors={ancestors}"
            );
            check_bf16(&what, &down_bf16(&dev, &dout, n * hq * d), &want, &lo);
        }
    }
}

#[test]
fn attention_varlen_vision_head_dim_80() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(13);
    // Window attention (segments of 64), odd segments, one full-attention segment.
    for (heads, d, segs) in [
        (16, 80, vec![64, 64, 64, 64]),
        (16, 80, vec![1, 17, 100, 3]),
        (4, 80, vec![256]),
        (2, 64, vec![5, 70]),
        (2, 128, vec![33]),
        (2, 16, vec![4, 16, 9]),
        (2, 32, vec![64, 20]),
    ] {
        let total: usize = segs.iter().sum();
        let mut cu = vec![0usize];
        for s in &segs {
            cu.push(cu.last().unwrap() + s);
        }
        let t = qkv(&mut rng, total, total, heads, heads, d);
        let (dq, dk, dv) = (
            dev.upload(&t.q.0).unwrap(),
            dev.upload(&t.k.0).unwrap(),
            dev.upload(&t.v.0).unwrap(),
        );
        let cu_i: Vec<i32> = cu.iter().map(|&c| c as i32).collect();
        let dcu = dev.upload(&cu_i).unwrap();
        let mut dout = dev.alloc_zeros::<bf16>(total * heads * d).unwrap();
        let max_seqlen = *segs.iter().max().unwrap();
        dev.attention_varlen(
            &dq.as_view(),
            &dk.as_view(),
            &dv.as_view(),
            &mut dout.as_view_mut(),
            &dcu.as_view(),
            segs.len(),
            max_seqlen,
            total,
            heads,
            d,
        )
        .unwrap();
        let mut want = vec![0.0; total * heads * d];
        r::attention_varlen(&t.q.1, &t.k.1, &t.v.1, &mut want, &cu, heads, d);
        let seg_of = |i: usize| cu.iter().rposition(|&c| c <= i).unwrap();
        let lo = attention_lo(&t.q.1, &t.k.1, &t.v.1, total, heads, heads, d, total, |a, b| {
            seg_of(a) == seg_of(b)
        });
        let what = format!("attention_varlen heads={heads} d={d} segments={segs:?}");
        check_bf16(&what, &down_bf16(&dev, &dout, total * heads * d), &want, &lo);
    }
}

// -------------------------------------------------------------------------------------
// Sampling and verification

fn softmax(logits: &[f32]) -> Vec<f32> {
    massv::sampling::probabilities(
        logits,
        &SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
    )
}

#[test]
fn argmax_first_index_on_ties() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(14);
    for &(rows, n) in &[(1, 1), (9, 31), (6, 152_064), (2, 1025)] {
        let mut x = rand_vec(&mut rng, rows * n, 10.0);
        for row in x.chunks_mut(n) {
            // Ties at the max: the first one must win.
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0;
            let a = (rng.uniform() * n as f64) as usize;
            let b = (rng.uniform() * n as f64) as usize;
            row[a] = m;
            row[b] = m;
        }
        let dx = dev.upload(&x).unwrap();
        let mut dout = dev.alloc_zeros::<i32>(rows).unwrap();
        dev.argmax(&dx.as_view(), &mut dout.as_view_mut(), rows, n).unwrap();
        let want: Vec<i32> = x.chunks(n).map(|row| r::argmax(row) as i32).collect();
        assert_eq!(dev.download(&dout.as_view()).unwrap(), want, "argmax {rows}x{n}");
    }
}

/// argmax reads a row in three parts: the floats before its first 16-byte boundary, then
/// float4s, then the floats after the last whole one. The rows of an [rows, n] matrix
/// with n odd start at every alignment. In turn every position of such rows holds the
/// maximum, with a tie after it (the first must win) and NaNs (skipped) among the rest,
/// a NaN first included.
#[test]
fn argmax_finds_the_max_at_every_position_and_alignment() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(41);
    for n in [1usize, 2, 3, 5, 7, 8, 37, 4101] {
        // 4 rows a position for the short rows (each position at each alignment); some
        // positions of the long one: its ends and both sides of 16-byte boundaries.
        let positions: Vec<usize> = if n < 64 {
            (0..4 * n).map(|r| r % n).collect()
        } else {
            vec![0, 1, 2, 3, 4, 5, 15, 16, 17, 1000, 4095, 4096, 4097, 4098, 4099, 4100]
        };
        let rows = positions.len();
        let mut x = rand_vec(&mut rng, rows * n, 10.0);
        for (row, &p) in x.chunks_mut(n).zip(&positions) {
            for (i, v) in row.iter_mut().enumerate() {
                if i != p && (i == 0 || rng.uniform() < 0.1) {
                    *v = f32::NAN;
                }
            }
            row[p] = 11.0;
            if p + 1 < n {
                let tie = p + 1 + (rng.uniform() * (n - p - 1) as f64) as usize;
                row[tie.min(n - 1)] = 11.0;
            }
        }
        let dx = dev.upload(&x).unwrap();
        let mut dout = dev.alloc_zeros::<i32>(rows).unwrap();
        dev.argmax(&dx.as_view(), &mut dout.as_view_mut(), rows, n).unwrap();
        let want: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let cpu: Vec<i32> = x.chunks(n).map(|row| r::argmax(row) as i32).collect();
        assert_eq!(cpu, want, "the CPU twin, n = {n}");
        assert_eq!(dev.download(&dout.as_view()).unwrap(), want, "argmax, n = {n}");
    }
    // Rows of NaNs alone give 0, as the twin does.
    let x = vec![f32::NAN; 3 * 9];
    let dx = dev.upload(&x).unwrap();
    let mut dout = dev.upload(&[-7i32; 3]).unwrap();
    dev.argmax(&dx.as_view(), &mut dout.as_view_mut(), 3, 9).unwrap();
    assert_eq!(dev.download(&dout.as_view()).unwrap(), vec![0; 3]);
}

/// `top_k` against its twin (`spec::tree::top_tokens` on the plain softmax): the same
/// ids in the same order, probabilities within `probabilities`' tolerance; ties ranked by
/// lower id; rows whose non-zero probabilities are fewer than k padded with -1 / 0.
/// `top_k` over logits (`of_probs` false) or `top_k_probs` over distributions: the ids
/// and probabilities of `x`'s [rows, n] rows, [rows, k] each.
fn device_top_k(dev: &CudaDevice, x: &[f32], rows: usize, n: usize, k: usize, of_probs: bool) -> (Vec<i32>, Vec<f32>) {
    let dx = dev.upload(x).unwrap();
    let mut ids = dev.alloc_zeros::<i32>(rows * k).unwrap();
    let mut probs = dev.alloc_zeros::<f32>(rows * k).unwrap();
    let (mut iv, mut pv) = (ids.as_view_mut(), probs.as_view_mut());
    if of_probs {
        dev.top_k_probs(&dx.as_view(), &mut iv, &mut pv, rows, n, k).unwrap();
    } else {
        dev.top_k(&dx.as_view(), &mut iv, &mut pv, rows, n, k).unwrap();
    }
    (
        dev.download(&ids.as_view()).unwrap(),
        dev.download(&probs.as_view()).unwrap(),
    )
}

/// Device probabilities against the twin's: the same support, values within 2e-5.
fn assert_same_probabilities(got: &[f32], want: &[f32], what: &str) {
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(*a == 0.0, *b == 0.0, "{what}: support differs at {i} ({a} vs {b})");
        assert!((a - b).abs() <= 2e-5 * b + 1e-7, "{what}: [{i}] {a} vs {b}");
    }
}

/// The bit patterns of f32s (bit-for-bit comparisons that print as numbers).
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// (id, probability) pairs of a kernel's padded output, up to its first id of -1.
fn pairs(ids: &[i32], probs: &[f32]) -> Vec<(u32, f32)> {
    ids.iter()
        .zip(probs)
        .map_while(|(&t, &p)| u32::try_from(t).ok().map(|t| (t, p)))
        .collect()
}

#[test]
fn top_k_is_the_cpu_tree_ranking() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(16);
    for &(rows, n) in &[(1, 10), (5, 1000), (3, 151_936)] {
        let mut x = rand_vec(&mut rng, rows * n, 8.0);
        // Row 0: three-way tie at the top. Row 1 (if any): all but 3 entries so far below
        // that their probabilities are 0 in f32.
        let m = x[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0;
        for i in [n / 2, 0, n - 1] {
            x[i] = m;
        }
        if rows > 1 {
            for (i, v) in x[n..2 * n].iter_mut().enumerate() {
                *v = if i % (n / 3) == 1 { 5.0 } else { -1000.0 };
            }
        }
        for k in [1, 4, 8, MAX_TOP_K] {
            let (ids, probs) = device_top_k(&dev, &x, rows, n, k, false);
            for row in 0..rows {
                let what = format!("top_k {rows}x{n} k={k} row={row}");
                let want = r::top_k(&x[row * n..(row + 1) * n], k);
                let (gi, gp) = (&ids[row * k..(row + 1) * k], &probs[row * k..(row + 1) * k]);
                let got_ids: Vec<u32> = gi.iter().map_while(|&i| u32::try_from(i).ok()).collect();
                let want_ids: Vec<u32> = want.iter().map(|&(t, _)| t).collect();
                assert_eq!(got_ids, want_ids, "{what}: ids");
                assert!(gi[want.len()..].iter().all(|&i| i == -1), "{what}: padding ids {gi:?}");
                assert!(
                    gp[want.len()..].iter().all(|&p| p == 0.0),
                    "{what}: padding probabilities"
                );
                for (j, (&(_, b), &a)) in want.iter().zip(gp).enumerate() {
                    assert!((a - b).abs() <= 2e-5 * b + 1e-7, "{what}: [{j}] {a} vs {b}");
                }
            }
            if n == 10 {
                assert_eq!(&ids[..k.min(3)], &[0, 5, 9][..k.min(3)], "ties by lower id");
            }
        }
    }
    let dx = dev.upload(&[0.0f32; 8]).unwrap();
    let mut ids = dev.alloc_zeros::<i32>(MAX_TOP_K + 1).unwrap();
    let mut probs = dev.alloc_zeros::<f32>(MAX_TOP_K + 1).unwrap();
    for k in [0, MAX_TOP_K + 1] {
        let e = dev
            .top_k(&dx.as_view(), &mut ids.as_view_mut(), &mut probs.as_view_mut(), 1, 8, k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("top_k") && e.contains(&format!("k = {k}")), "{e}");
    }
}

#[test]
fn probabilities_temperature_top_k_top_p() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(15);
    let params = [
        SamplingParams::default(),
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 20,
            top_p: 1.0,
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
        },
        SamplingParams {
            temperature: 1.3,
            top_k: 50,
            top_p: 0.8,
        },
        SamplingParams {
            temperature: 0.5,
            top_k: 1,
            top_p: 1.0,
        },
    ];
    for &(rows, n) in &[(1, 10), (3, 1000), (2, 151_936)] {
        let logits = rand_vec(&mut rng, rows * n, 8.0);
        let dl = dev.upload(&logits).unwrap();
        let mut dp = dev.alloc_zeros::<f32>(rows * n).unwrap();
        for p in &params {
            dev.probabilities(&dl.as_view(), &mut dp.as_view_mut(), rows, n, p)
                .unwrap();
            let got = dev.download(&dp.as_view()).unwrap();
            for (row, (g, l)) in got.chunks(n).zip(logits.chunks(n)).enumerate() {
                let want = r::probabilities(l, p);
                let what = format!("probabilities {p:?} n={n} row={row}");
                assert_same_probabilities(g, &want, &what);
            }
        }
    }
}

/// A vocabulary row shaped like a language model's: a few strong candidates over a broad
/// tail. The cut falls among the candidates, whose first radix digit's bucket is small,
/// so the kernel counts the last two digits over the bucket's entries in shared memory
/// (random logits over the whole row give buckets too large for it; the test above).
#[test]
fn probabilities_cut_a_peaked_vocabulary_row() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(17);
    let n = 151_936;
    let mut logits = rand_vec(&mut rng, n, 2.0);
    for j in 0..40 {
        logits[(j * 3803) % n] = 9.0 + 0.1 * j as f32;
    }
    let dl = dev.upload(&logits).unwrap();
    let mut dp = dev.alloc_zeros::<f32>(n).unwrap();
    for (temperature, top_k, top_p) in [(1.0, 0, 0.5f32), (1.0, 5, 1.0), (0.7, 50, 0.8), (1.0, 30, 0.95)] {
        let p = SamplingParams {
            temperature,
            top_k,
            top_p,
        };
        dev.probabilities(&dl.as_view(), &mut dp.as_view_mut(), 1, n, &p)
            .unwrap();
        let got = dev.download(&dp.as_view()).unwrap();
        let want = r::probabilities(&logits, &p);
        let kept = want.iter().filter(|&&w| w > 0.0).count();
        assert!(
            (2..=50).contains(&kept),
            "{p:?}: the cut is among the candidates ({kept} kept)"
        );
        assert_same_probabilities(&got, &want, &format!("{p:?}"));
    }
}

/// probabilities' keep pass ranks the entries equal to the cut by id, tile after tile
/// (several tiles loaded at once). Logits on 7 levels make runs of tied probabilities
/// thousands of entries long, so the cut falls inside a run that spans many tiles; the
/// kept ones must be exactly its lowest ids, as the CPU keeps them.
#[test]
fn probabilities_keep_the_lowest_ids_of_a_tie_across_tiles() {
    let dev = dev_or_skip!();
    for &(n, top_k, top_p) in &[
        (151_936usize, 5000, 1.0f32),
        (151_936, 0, 0.5),
        (10_007, 700, 1.0),
        (5000, 3, 1.0),
    ] {
        let logits: Vec<f32> = (0..n).map(|i| ((i * 5) % 7) as f32).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k,
            top_p,
        };
        let dl = dev.upload(&logits).unwrap();
        let mut dp = dev.alloc_zeros::<f32>(n).unwrap();
        dev.probabilities(&dl.as_view(), &mut dp.as_view_mut(), 1, n, &p)
            .unwrap();
        let got = dev.download(&dp.as_view()).unwrap();
        let want = r::probabilities(&logits, &p);
        let kept = want.iter().filter(|&&w| w > 0.0).count();
        let top = logits.iter().filter(|&&l| l == 6.0).count();
        assert!(
            kept > 1 && kept < top,
            "{p:?} n={n}: the cut is inside the top run ({kept} of {top} kept)"
        );
        assert_same_probabilities(&got, &want, &format!("{p:?} n={n}"));
    }
}

/// ... and where the cut keeps a whole run of tied entries (top_k = the run's end, or
/// top_p reached only with its last entry) it keeps every entry not below the cut,
/// without ranking the run; one entry above or below the run's end ranks it again.
#[test]
fn probabilities_keep_whole_tie_runs() {
    let dev = dev_or_skip!();
    for &n in &[5000usize, 151_936] {
        let logits: Vec<f32> = (0..n).map(|i| ((i * 5) % 7) as f32).collect();
        let run = |level: f32| logits.iter().filter(|&&l| l == level).count();
        let (top, second) = (run(6.0), run(5.0));
        let dl = dev.upload(&logits).unwrap();
        let mut dp = dev.alloc_zeros::<f32>(n).unwrap();
        for (top_k, kept) in [
            (top, top),
            (top + second, top + second),
            (top + 1, top + 1),
            (top - 1, top - 1),
        ] {
            let p = SamplingParams {
                temperature: 1.0,
                top_k,
                top_p: 1.0,
            };
            dev.probabilities(&dl.as_view(), &mut dp.as_view_mut(), 1, n, &p)
                .unwrap();
            let got = dev.download(&dp.as_view()).unwrap();
            let want = r::probabilities(&logits, &p);
            assert_eq!(want.iter().filter(|&&w| w > 0.0).count(), kept, "{p:?} n={n}: the twin");
            assert_same_probabilities(&got, &want, &format!("{p:?} n={n}"));
        }
    }
}

/// Logit rows for the split probabilities tests: random ones, then (when there are more
/// rows) one whose entries are all equal, one with -inf everywhere but three entries, and
/// one with -inf at every third.
fn split_rows(rng: &mut Rng, rows: usize, n: usize) -> Vec<f32> {
    let mut x = rand_vec(rng, rows * n, 8.0);
    let shapes: [&dyn Fn(usize, f32) -> f32; 3] = [
        &|_, _| 2.5,
        &|i, v| if i % (n / 3).max(1) == 1 { v } else { f32::NEG_INFINITY },
        &|i, v| if i % 3 == 0 { f32::NEG_INFINITY } else { v },
    ];
    for (row, shape) in (1..rows).zip(shapes) {
        for (i, v) in x[row * n..(row + 1) * n].iter_mut().enumerate() {
            *v = shape(i, *v);
        }
    }
    x
}

/// At T > 0 `probabilities` splits each row over many blocks: its softmax
/// (probabilities_max, _exp, _normalize) and its top-k / top-p cut
/// (probabilities_cut_digit ×4, or probabilities_cut_top_k where top-k is 1 to 64 and
/// below n; probabilities_cut_keep, then _normalize): the rows are the one-block
/// kernel's bit for bit (the same sum orders, the same cut, ties in runs of equal rows
/// and rows with fewer positive entries than top-k included), within rounding of the
/// twin's, for rows past a launch's 64
/// (rows 64.. take a second set of launches) and past the longest sampled row; the
/// split-K counters are all zero after, and the cut's histograms too (the next call's
/// cut would count them).
#[test]
fn probabilities_split_rows_are_the_one_block_rows() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(41);
    for &(rows, n) in &[
        (1usize, 10usize),
        (4, 1000),
        (2, 4097),
        (1, 151_936),
        (70, 300),
        (1, 300_000),
    ] {
        let logits = split_rows(&mut rng, rows, n);
        let dl = dev.upload(&logits).unwrap();
        let mut dp = dev.alloc_zeros::<f32>(rows * n).unwrap();
        for (temperature, top_k, top_p) in [
            (1.0f32, 0, 1.0f32),
            (0.7, 0, 1.0),
            (1.3, 0, 1.0),
            (1.0, 20, 1.0),
            (0.8, 0, 0.9),
            (1.2, 50, 0.8),
            // The top-k select's bounds (64 and 1 take it, 65 the radix select).
            (1.0, 64, 0.95),
            (0.9, 1, 1.0),
            (1.1, 65, 0.99),
            (0.5, 64, 1.0),
            // All but one kept at T = 0.2: the cut falls deep in the tail, at
            // probabilities whose fixed-point masses can round to 0.
            (0.2, n - 1, 1.0),
        ] {
            let p = SamplingParams {
                temperature,
                top_k,
                top_p,
            };
            let stale = vec![f32::NAN; rows * n];
            let mut run = |split: bool| {
                dev.set_split_probabilities(split);
                dev.upload_into(&stale, &mut dp.as_view_mut()).unwrap();
                dev.probabilities(&dl.as_view(), &mut dp.as_view_mut(), rows, n, &p)
                    .unwrap();
                dev.download(&dp.as_view()).unwrap()
            };
            let (split, one) = (run(true), run(false));
            let what = format!("{p:?} {rows}x{n}");
            assert!(bits(&split) == bits(&one), "{what}: split rows vs one block's");
            for (row, (g, l)) in split.chunks(n).zip(logits.chunks(n)).enumerate() {
                assert_same_probabilities(g, &r::probabilities(l, &p), &format!("{what} row {row}"));
            }
        }
    }
    assert_eq!(dev.split_counters_set().unwrap(), 0, "split-K counters left set");
}

/// `probabilities_sample` (a drafter's draw at T > 0): the split kernels' last launch
/// draws from the row it finished as `sample` does, top-k / top-p cut or not, so the
/// distributions and draws are those of the one-block path (`probabilities` then
/// `sample`), and the draws the twin's from those rows; uniforms at both ends (and 1, which
/// draws the last positive entry), rows mostly -inf and rows past 64 included. Bad sizes
/// are errors.
#[test]
fn probabilities_sample_is_probabilities_then_sample() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(42);
    let params = [
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        SamplingParams {
            temperature: 0.6,
            top_k: 0,
            top_p: 1.0,
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 20,
            top_p: 0.9,
        },
    ];
    for &(rows, n) in &[(1usize, 10usize), (4, 1025), (1, 151_936), (66, 200)] {
        let logits = split_rows(&mut rng, rows, n);
        let mut u: Vec<f64> = (0..rows).map(|_| rng.uniform()).collect();
        u[0] = 1.0 - f64::EPSILON;
        if rows > 2 {
            // 1 (past the uniforms' range) walks past every tile: the last positive entry.
            (u[1], u[2]) = (0.0, 1.0);
        }
        let (dl, du) = (dev.upload(&logits).unwrap(), dev.upload(&u).unwrap());
        let mut dq = dev.alloc_zeros::<f32>(rows * n).unwrap();
        let mut ids = dev.alloc_zeros::<i32>(rows).unwrap();
        for p in &params {
            let what = format!("{p:?} {rows}x{n}");
            let (stale_q, stale_ids) = (vec![f32::NAN; rows * n], vec![-7i32; rows]);
            let mut run = |split: bool| {
                dev.set_split_probabilities(split);
                dev.upload_into(&stale_q, &mut dq.as_view_mut()).unwrap();
                dev.upload_into(&stale_ids, &mut ids.as_view_mut()).unwrap();
                dev.probabilities_sample(
                    &dl.as_view(),
                    &mut dq.as_view_mut(),
                    &du.as_view(),
                    &mut ids.as_view_mut(),
                    rows,
                    n,
                    p,
                )
                .unwrap();
                (
                    dev.download(&dq.as_view()).unwrap(),
                    dev.download(&ids.as_view()).unwrap(),
                )
            };
            let ((q, got), (q_one, got_one)) = (run(true), run(false));
            assert!(bits(&q) == bits(&q_one), "{what}: distributions, split vs one block");
            assert_eq!(got, got_one, "{what}: draws, split vs one block");
            for (row, (qr, l)) in q.chunks(n).zip(logits.chunks(n)).enumerate() {
                assert_eq!(
                    got[row],
                    r::sample(qr, u[row]) as i32,
                    "{what} row {row}: the twin's draw"
                );
                let (want_q, want) = r::probabilities_sample(l, p, u[row]);
                assert_same_probabilities(qr, &want_q, &format!("{what} row {row}"));
                assert_eq!(got[row], want as i32, "{what} row {row}: the CPU's draw");
            }
        }
    }
    assert_eq!(dev.split_counters_set().unwrap(), 0, "split-K counters left set");
    let (dl, du) = (dev.upload(&[0.0f32; 8]).unwrap(), dev.upload(&[0.5f64; 2]).unwrap());
    let (mut dq, mut ids) = (dev.alloc_zeros::<f32>(8).unwrap(), dev.alloc_zeros::<i32>(2).unwrap());
    // Too few uniforms, too few ids, rows longer than a draw takes: errors naming them.
    for (nu, ni, rows, n, named) in [
        (1, 2, 2, 4, "uniforms"),
        (2, 1, 2, 4, "ids"),
        (2, 2, 0, 300_000, "300000"),
    ] {
        let e = dev
            .probabilities_sample(
                &dl.as_view(),
                &mut dq.as_view_mut(),
                &du.slice(..nu),
                &mut ids.slice_mut(..ni),
                rows,
                n,
                &params[0],
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("probabilities_sample") && e.contains(named), "{e}");
    }
}

/// Draws from several threads at once on one device (a target's and a drafter's, say):
/// the split kernels' scratch is the device's, so each call must hold it for its three
/// launches; every thread gets what it gets alone. A race shows only when another
/// thread's launch slips in between two of a call's, so a pass is evidence, not proof.
#[test]
fn probabilities_sample_from_threads_at_once() {
    let dev = dev_or_skip!();
    let (n, calls) = (3000, 24);
    let mut rng = Rng::new(43);
    let rows: Vec<Vec<f32>> = (0..4).map(|_| rand_vec(&mut rng, n, 8.0)).collect();
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let draws = |logits: &[f32], seed: u64| -> Vec<(Vec<u32>, i32)> {
        let mut rng = Rng::new(seed);
        let dl = dev.upload(logits).unwrap();
        let (mut dq, mut ids) = (dev.alloc_zeros::<f32>(n).unwrap(), dev.alloc_zeros::<i32>(1).unwrap());
        (0..calls)
            .map(|_| {
                let du = dev.upload(&[rng.uniform()]).unwrap();
                dev.probabilities_sample(
                    &dl.as_view(),
                    &mut dq.as_view_mut(),
                    &du.as_view(),
                    &mut ids.as_view_mut(),
                    1,
                    n,
                    &params,
                )
                .unwrap();
                (
                    bits(&dev.download(&dq.as_view()).unwrap()),
                    dev.download(&ids.as_view()).unwrap()[0],
                )
            })
            .collect()
    };
    let alone: Vec<_> = rows.iter().zip(0..).map(|(l, seed)| draws(l, seed)).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let threads: Vec<_> = rows
            .iter()
            .zip(0..)
            .map(|(l, seed)| s.spawn(move || draws(l, seed)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(
            a == t,
            "thread {i}: its distributions and draws differ from its own alone"
        );
    }
}

#[test]
fn sample_is_exact() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(16);
    for &n in &[1usize, 5, 32, 33, 1025, 152_064] {
        let rows = 8;
        let mut w = rand_vec(&mut rng, rows * n, 1.0);
        for (i, x) in w.iter_mut().enumerate() {
            *x = if i % 3 == 0 { 0.0 } else { x.abs() };
        }
        let mut u: Vec<f64> = (0..rows).map(|_| rng.uniform()).collect();
        u[0] = 0.0;
        u[1] = 1.0 - f64::EPSILON;
        let (dw, du) = (dev.upload(&w).unwrap(), dev.upload(&u).unwrap());
        let mut dout = dev.alloc_zeros::<i32>(rows).unwrap();
        dev.sample(&dw.as_view(), &du.as_view(), &mut dout.as_view_mut(), rows, n)
            .unwrap();
        let want: Vec<i32> = w.chunks(n).zip(&u).map(|(row, &u)| r::sample(row, u) as i32).collect();
        assert_eq!(dev.download(&dout.as_view()).unwrap(), want, "sample n={n}");
    }
}

#[test]
fn twin_sample_is_the_cpu_sampler() {
    // No device needed. Up to one chunk the blocked order is Rng::sample's sequential one
    // exactly; beyond, they agree unless a uniform lands within f64 rounding of a boundary.
    let mut rng = Rng::new(20);
    for &n in &[1usize, 2, 5, 31, 32, 33, 100, 1025, 5000] {
        for _ in 0..200 {
            let w: Vec<f32> = (0..n)
                .map(|i| if i % 4 == 1 { 0.0 } else { rng.uniform() as f32 })
                .collect();
            let u = rng.uniform();
            assert_eq!(r::sample(&w, u), massv::sampling::draw(&w, u), "n={n} u={u}");
        }
    }
    assert_eq!(r::sample(&[0.0, 0.0], 0.3), 0, "no positive weight: 0 (as Rng::sample)");
}

/// Rows of processed distributions for the tree-drawing tests: `rows` rows of `n`
/// entries, a third of them zero, normalised; row 1 (if any) with only 3 or 4 positive
/// entries (fewer than some nodes ask of it), row 2 (if any) with a three-way tie at the
/// top.
fn distribution_rows(rng: &mut Rng, rows: usize, n: usize) -> Vec<f32> {
    let mut q = Vec::with_capacity(rows * n);
    for row in 0..rows {
        let mut w: Vec<f32> = (0..n)
            .map(|i| match row {
                1 if n > 3 => (i % (n / 3) == 1) as u8 as f32 * (1.0 + i as f32),
                _ if i % 3 == 0 => 0.0,
                _ => rng.uniform() as f32,
            })
            .collect();
        if row == 2 && n > 7 {
            for i in [1, 4, 7] {
                w[i] = 2.0;
            }
        }
        let s: f64 = w.iter().map(|&v| v as f64).sum();
        q.extend(w.iter().map(|&v| (v as f64 / s) as f32));
    }
    q
}

#[test]
fn twin_sample_without_replacement_is_the_cpu_tree_drafters() {
    // No device needed. The CPU drafter draws each node's children with
    // spec::tree::draw_without_replacement from one RNG stream; the twin, given that
    // stream's uniforms, draws the same children (exactly up to one chunk, where the
    // blocked order is the sequential one; beyond, unless a uniform lands within rounding
    // of a boundary) and reports the uniforms the CPU consumed.
    use massv::spec::tree::draw_without_replacement;
    let mut rng = Rng::new(31);
    let (mut same, mut total) = (0, 0);
    for &n in &[3usize, 7, 32, 33, 1000, 5000] {
        for trial in 0..40 {
            let rows = 4;
            let q = distribution_rows(&mut rng, rows, n);
            let counts: Vec<usize> = (0..rows).map(|j| (trial + j) % 5).collect();
            let sum: usize = counts.iter().sum();
            let mut cpu_rng = Rng::new(1000 + trial as u64);
            let uniforms = cpu_rng.peek_uniforms(sum);
            let want: Vec<Vec<u32>> = counts
                .iter()
                .enumerate()
                .map(|(j, &k)| draw_without_replacement(&q[j * n..][..n], k, &mut cpu_rng))
                .collect();
            let (got, used) = r::sample_without_replacement(&q, n, 0, &counts, &uniforms);
            let got_ids: Vec<Vec<u32>> = got.iter().map(|c| c.iter().map(|&(t, _)| t).collect()).collect();
            for (j, c) in got.iter().enumerate() {
                assert!(
                    c.len() <= counts[j],
                    "n={n}: node {j} drew {} of {}",
                    c.len(),
                    counts[j]
                );
                for &(t, p) in c {
                    assert_eq!(p, q[j * n + t as usize], "n={n}: a draw's probability is its row's");
                }
                let distinct: std::collections::BTreeSet<u32> = c.iter().map(|&(t, _)| t).collect();
                assert_eq!(distinct.len(), c.len(), "n={n}: without replacement");
            }
            total += 1;
            if got_ids == want {
                same += 1;
                let mut probe = Rng::new(1000 + trial as u64);
                probe.skip_uniforms(used);
                assert_eq!(probe.state(), cpu_rng.state(), "n={n}: uniforms used");
            } else {
                assert!(
                    n > 32,
                    "n={n}: up to one chunk the twin is the CPU exactly: {got_ids:?} vs {want:?}"
                );
            }
        }
    }
    println!("{same} of {total} trials equal the CPU drafter");
    assert!(
        same * 100 >= total * 95,
        "{same} of {total} trials equal the CPU drafter"
    );
    // A row with 3 positive entries gives 3 children of the 4 asked, and uses 3 uniforms.
    let q = distribution_rows(&mut Rng::new(2), 2, 30);
    let (got, used) = r::sample_without_replacement(&q, 30, 1, &[4], &[0.1, 0.5, 0.9, 0.3]);
    assert_eq!((got[0].len(), used), (3, 3));
}

/// The device's children of a tree depth against the twin: the same draws, their
/// probabilities and the uniforms used, bit for bit. Each case twice: with one work row
/// (one block draws the nodes in turn) and with enough for the nodes to draw at once
/// (draw_counts says how many uniforms each takes). Rows 1 and 5 fall short of what
/// some nodes ask (they stop early); row 3 is scaled to sum to 3, which makes every
/// depth that holds it draw in turn even with the rows to draw at once.
#[test]
fn sample_without_replacement_is_exact() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(32);
    for &n in &[7usize, 33, 1025, 151_936] {
        let rows = 6;
        let mut q = distribution_rows(&mut rng, rows, n);
        for (i, v) in q[5 * n..6 * n].iter_mut().enumerate() {
            *v = if i == 0 || i == n / 2 {
                0.25
            } else if i == n - 1 {
                0.5
            } else {
                0.0
            };
        }
        q[3 * n..4 * n].iter_mut().for_each(|v| *v *= 3.0);
        // ... and holds the least subnormal, which its first renormalisation (a division
        // by 2 or more) rounds to 0: node 0 of (3, [6, 2]) makes fewer draws than its
        // row's positive entries at n = 7, and node 1's uniforms start earlier.
        q[3 * n] = f32::from_bits(1);
        let dq = dev.upload(&q).unwrap();
        let cases = [
            (0, vec![1, 4, 3, 2]),
            (1, vec![6, 0, 2, 3]),
            (4, vec![5]),
            (4, vec![2, 5]),
            (0, vec![2, 1, 0]),
            (3, vec![6, 2]),
        ];
        for (row0, counts) in cases {
            let m = counts.len();
            let total: usize = counts.iter().sum();
            let uniforms: Vec<f64> = (0..total).map(|_| rng.uniform()).collect();
            let (want, want_used) = r::sample_without_replacement(&q, n, row0, &counts, &uniforms);
            let dc = dev
                .upload(&counts.iter().map(|&c| c as i32).collect::<Vec<_>>())
                .unwrap();
            let du = dev.upload(&uniforms).unwrap();
            for work_rows in [1, (total / 2).max(1)] {
                let mut work = dev.alloc_zeros::<f32>(work_rows * n).unwrap();
                let mut draws = dev.alloc_zeros::<i32>(m).unwrap();
                let mut out = dev.alloc_zeros::<i32>(total + 1).unwrap();
                let mut out_q = dev.alloc_zeros::<f32>(total).unwrap();
                dev.sample_without_replacement(
                    &dq.as_view(),
                    &dc.as_view(),
                    &du.as_view(),
                    &mut draws.as_view_mut(),
                    &mut work.as_view_mut(),
                    &mut out.as_view_mut(),
                    &mut out_q.as_view_mut(),
                    row0,
                    m,
                    total,
                    n,
                )
                .unwrap();
                let (ids, probs) = (
                    dev.download(&out.as_view()).unwrap(),
                    dev.download(&out_q.as_view()).unwrap(),
                );
                let what =
                    format!("sample_without_replacement n={n} rows {row0}.. counts {counts:?}, {work_rows} work rows");
                assert_eq!(ids[total], want_used as i32, "{what}: uniforms used");
                let mut at = 0;
                for (j, &k) in counts.iter().enumerate() {
                    let w = &want[j];
                    let got = pairs(&ids[at..at + k], &probs[at..at + k]);
                    assert_eq!(&got, w, "{what}: node {j}");
                    assert!(
                        ids[at + w.len()..at + k].iter().all(|&t| t == -1),
                        "{what}: node {j} padding"
                    );
                    at += k;
                }
                // The running rows left in work: bit for bit the twin's renormalisations
                // (drawing at once, node j's in the row after the earlier nodes that
                // draw two or more; in turn, the last renormalised node's in row 0).
                let at_once = m > 1
                    && work_rows >= (total / 2).max(1)
                    && r::draw_counts(&q, n, row0, &counts).iter().all(|&d| d >= 0);
                let work = dev.download(&work.as_view()).unwrap();
                let mut slot = 0;
                let mut in_row0 = None;
                for (j, &k) in counts.iter().enumerate() {
                    let drawn = &want[j];
                    let renorms = if drawn.len() < k {
                        drawn.len()
                    } else {
                        drawn.len().saturating_sub(1)
                    };
                    let mut left = q[(row0 + j) * n..][..n].to_vec();
                    for &(x, _) in &drawn[..renorms] {
                        left[x as usize] = 0.0;
                        let s = r::blocked_sum(&left);
                        left.iter_mut()
                            .for_each(|v| *v = if s > 0.0 { (*v as f64 / s) as f32 } else { 0.0 });
                    }
                    if at_once && k >= 2 {
                        let got = &work[slot * n..(slot + 1) * n];
                        assert_eq!(bits(got), bits(&left), "{what}: node {j}'s running row");
                        slot += 1;
                    } else if renorms > 0 {
                        in_row0 = Some(left);
                    }
                }
                if let (false, Some(left)) = (at_once, in_row0) {
                    assert_eq!(bits(&work[..n]), bits(&left), "{what}: the last running row");
                }
            }
        }
    }
    // Bad sizes are errors before any launch.
    let dq = dev.upload(&[0.5f32, 0.5]).unwrap();
    let dc = dev.upload(&[3i32]).unwrap();
    let du = dev.upload(&[0.1f64; 3]).unwrap();
    let mut work = dev.alloc_zeros::<f32>(2).unwrap();
    let mut draws = dev.alloc_zeros::<i32>(1).unwrap();
    let mut out = dev.alloc_zeros::<i32>(3).unwrap();
    let mut out_q = dev.alloc_zeros::<f32>(3).unwrap();
    let e = dev
        .sample_without_replacement(
            &dq.as_view(),
            &dc.as_view(),
            &du.as_view(),
            &mut draws.as_view_mut(),
            &mut work.as_view_mut(),
            &mut out.as_view_mut(),
            &mut out_q.as_view_mut(),
            0,
            1,
            3,
            2,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample_without_replacement") && e.contains("out"), "{e}");
}

/// `draw_counts` against its twin: a node's draws are known from its row where the row
/// is a distribution (sparse rows included), and unknown (-1) where it sums to 1.5 or
/// more or holds a negative, infinite or NaN entry. Where known, the twin's serial draws
/// make exactly that many.
#[test]
fn draw_counts_is_the_twins() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(35);
    for &n in &[7usize, 1000, 151_936] {
        let rows = 8;
        let mut q = distribution_rows(&mut rng, rows, n);
        q[3 * n..4 * n].iter_mut().for_each(|v| *v *= 1.6);
        q[4 * n + n / 2] = -0.0; // not odd: -0 is no weight
        q[5 * n + n - 1] = -1e-30;
        q[6 * n] = f32::INFINITY;
        q[7 * n + 1] = f32::NAN;
        let counts = [1usize, 6, 3, 2, 2, 4, 2, 7];
        let want = r::draw_counts(&q, n, 0, &counts);
        assert_eq!(&want[3..], &[-1, 2, -1, -1, -1][..], "n={n}: the twin's unknown rows");
        assert!(want[..3].iter().all(|&d| d >= 0), "n={n}: {want:?}");
        let dq = dev.upload(&q).unwrap();
        let dc = dev
            .upload(&counts.iter().map(|&c| c as i32).collect::<Vec<_>>())
            .unwrap();
        let mut draws = dev.alloc_zeros::<i32>(rows).unwrap();
        dev.draw_counts(&dq.as_view(), &dc.as_view(), &mut draws.as_view_mut(), 0, rows, n)
            .unwrap();
        assert_eq!(dev.download(&draws.as_view()).unwrap(), want, "n={n}");
        for (j, &d) in want.iter().enumerate().filter(|&(_, &d)| d >= 0) {
            let uniforms: Vec<f64> = (0..counts[j]).map(|_| rng.uniform()).collect();
            let (_, used) = r::sample_without_replacement(&q, n, j, &counts[j..=j], &uniforms);
            assert_eq!(used, d as usize, "n={n} row {j}: the serial draws");
        }
    }
}

/// The kernels keep each thread's few best entries and reread a thread's elements when
/// its list runs dry: here a row's best entries all lie in one thread's stride (ids
/// t, t + 1024, ...), some tied, with rivals from other threads between them, so that
/// thread's list runs dry many times within k picks. (Split over blocks, a thread's
/// stride is 4096: those ids are four threads', each of whose lists runs dry too.) Both
/// kernels, one block a row and split, against the host.
#[test]
fn top_k_ranks_many_winners_of_one_thread() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(41);
    let (rows, n, k) = (2, 70_000, MAX_TOP_K);
    let mut x = rand_vec(&mut rng, rows * n, 1.0);
    for row in 0..rows {
        let t = 7 + 300 * row;
        for (m, i) in (t..n).step_by(1024).enumerate() {
            // Levels 4.0, 3.9, ...: pairs share a level (a tie inside the thread), and
            // every fifth level also goes to a rival one id below (a tie across threads).
            let level = 4.0 - 0.1 * (m / 2) as f32;
            x[row * n + i] = level;
            if m % 5 == 0 {
                x[row * n + i - 1] = level;
            }
        }
    }
    let q: Vec<f32> = x
        .chunks(n)
        .flat_map(|r| {
            let mut q = r.to_vec();
            let m = q.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            q.iter_mut().for_each(|v| *v = (*v - m).exp());
            let s: f32 = q.iter().sum();
            q.iter_mut().for_each(|v| *v /= s);
            q
        })
        .collect();
    for split in [false, true] {
        dev.set_split_probabilities(split);
        let (ids, probs) = device_top_k(&dev, &x, rows, n, k, false);
        let (qids, qprobs) = device_top_k(&dev, &q, rows, n, k, true);
        for row in 0..rows {
            let t = 7 + 300 * row;
            let span = row * k..(row + 1) * k;
            let what = format!("split {split} row {row}");
            let want = r::top_k(&x[row * n..(row + 1) * n], k);
            let got = pairs(&ids[span.clone()], &probs[span.clone()]);
            let same_thread = got.iter().filter(|&&(i, _)| i as usize % 1024 == t % 1024).count();
            assert!(
                same_thread > 40,
                "{what}: the test puts {same_thread} picks in one thread"
            );
            let got_ids: Vec<u32> = got.iter().map(|&(i, _)| i).collect();
            let want_ids: Vec<u32> = want.iter().map(|&(i, _)| i).collect();
            assert_eq!(got_ids, want_ids, "top_k {what}: ids");
            for (j, (&(_, a), &(_, b))) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 2e-5 * b + 1e-7, "top_k {what}: [{j}] {a} vs {b}");
            }
            let want = r::top_k_probs(&q[row * n..(row + 1) * n], k);
            let got = pairs(&qids[span.clone()], &qprobs[span]);
            assert_eq!(got, want, "top_k_probs {what}: exactly the host ranking");
        }
    }
    dev.set_split_probabilities(true);
}

/// Split over blocks (the default), `top_k` and `top_k_probs` rank a row's entries
/// block by block (each block's k best) and the last block ranks those candidates: the
/// ids and probabilities are the one-block kernels' bit for bit, for random rows, rows
/// of ties, rows mostly -inf or zero, rows past a launch's 64, and rows whose best
/// entries lie in every other block only, so that the merge's threads hold many of the
/// k best each (candidate b * k + j is thread (b * k + j) % 128's). The split-K
/// counters are all zero after.
#[test]
fn top_k_split_rows_are_the_one_block_rows() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(43);
    for &(rows, n) in &[(1usize, 10usize), (4, 1000), (2, 4097), (3, 151_936), (70, 300)] {
        let mut x = split_rows(&mut rng, rows, n);
        if rows > 3 {
            // Row 3: block b owns entries with (i % 4096) / 128 == b; the even blocks' win.
            for (i, v) in x[3 * n..4 * n].iter_mut().enumerate() {
                if (i % 4096 / 128) % 2 == 0 {
                    *v += 20.0;
                }
            }
        }
        let q = distribution_rows(&mut rng, rows, n);
        for k in [1, 3, 20, MAX_TOP_K] {
            for (rows_x, of_probs) in [(&x, false), (&q, true)] {
                let run = |split: bool| {
                    dev.set_split_probabilities(split);
                    device_top_k(&dev, rows_x, rows, n, k, of_probs)
                };
                let ((si, sp), (oi, op)) = (run(true), run(false));
                let what = format!("{rows}x{n} k={k} of_probs={of_probs}");
                assert_eq!(si, oi, "{what}: split ids vs one block's");
                assert!(bits(&sp) == bits(&op), "{what}: split probabilities vs one block's");
                for row in 0..rows {
                    let l = &rows_x[row * n..(row + 1) * n];
                    let want = if of_probs { r::top_k_probs(l, k) } else { r::top_k(l, k) };
                    let got = pairs(&si[row * k..(row + 1) * k], &sp[row * k..(row + 1) * k]);
                    let ids = |v: &[(u32, f32)]| v.iter().map(|&(i, _)| i).collect::<Vec<_>>();
                    assert_eq!(ids(&got), ids(&want), "{what} row {row}: the host's ids");
                }
            }
        }
    }
    dev.set_split_probabilities(true);
    assert_eq!(dev.split_counters_set().unwrap(), 0, "split-K counters left set");
}

#[test]
fn top_k_probs_is_the_cpu_tree_ranking() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(33);
    for &(rows, n) in &[(3, 10), (4, 1000), (3, 151_936)] {
        let q = distribution_rows(&mut rng, rows, n);
        for k in [1, 4, MAX_TOP_K] {
            let (ids, probs) = device_top_k(&dev, &q, rows, n, k, true);
            for row in 0..rows {
                let want = r::top_k_probs(&q[row * n..(row + 1) * n], k);
                let got = pairs(&ids[row * k..(row + 1) * k], &probs[row * k..(row + 1) * k]);
                assert_eq!(
                    got, want,
                    "top_k_probs {rows}x{n} k={k} row={row}: exactly the host ranking"
                );
                assert!(ids[row * k + want.len()..(row + 1) * k].iter().all(|&i| i == -1));
            }
        }
    }
}

#[test]
fn verify_greedy_exact() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(17);
    for gamma in 0..=8 {
        for _ in 0..20 {
            let target: Vec<u32> = (0..=gamma).map(|_| (rng.uniform() * 4.0) as u32).collect();
            let drafts: Vec<u32> = (0..gamma)
                .map(|i| {
                    if rng.uniform() < 0.8 {
                        target[i]
                    } else {
                        (rng.uniform() * 4.0) as u32
                    }
                })
                .collect();
            let di: Vec<i32> = drafts.iter().map(|&x| x as i32).collect();
            let ti: Vec<i32> = target.iter().map(|&x| x as i32).collect();
            let (dd, dt) = (dev.upload(&di).unwrap(), dev.upload(&ti).unwrap());
            let mut dout = dev.alloc_zeros::<i32>(2).unwrap();
            dev.verify_greedy(&dd.as_view(), &dt.as_view(), &mut dout.as_view_mut(), gamma)
                .unwrap();
            let got = dev.download(&dout.as_view()).unwrap();
            let want = r::verify_greedy(&drafts, &target);
            assert_eq!(
                (got[0] as usize, got[1] as u32),
                (want.accepted, want.next),
                "verify_greedy {drafts:?} {target:?}"
            );
        }
    }
}

/// One verification problem: drafts sampled from q, the target's p, the host RNG's next
/// γ + 1 uniforms, and the verdict of the CPU engine's `spec::verify::verify_sampled`
/// drawing from that same RNG.
struct VerifyCase {
    gamma: usize,
    np: usize,
    nq: usize,
    drafts: Vec<u32>,
    q: Vec<f32>,
    p: Vec<f32>,
    uniforms: Vec<f64>,
    cpu: Verdict,
    what: String,
}

/// (np, nq, trials): tiny vocabularies (where the blocked order is the CPU's), a shorter
/// drafter vocabulary, and the real 7B target / 0.5B drafter sizes.
const VERIFY_SIZES: [(usize, usize, usize); 4] = [(20, 18, 200), (32, 32, 100), (1000, 990, 40), (152_064, 151_936, 6)];

fn verify_cases(seed: u64) -> Vec<VerifyCase> {
    let mut rng = Rng::new(seed);
    let mut cases = Vec::new();
    for &(np, nq, trials) in &VERIFY_SIZES {
        for trial in 0..trials {
            let gamma = 1 + trial % 8;
            let temp = [0.5f32, 1.0, 2.0][trial % 3];
            let sp = SamplingParams {
                temperature: temp,
                top_k: if trial % 4 == 3 { 10 } else { 0 },
                top_p: 1.0,
            };
            // Target and drafter logits share structure so drafts are often accepted.
            let base = rand_vec(&mut rng, np, 4.0);
            let (mut p, mut q, mut drafts) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..=gamma {
                let noise = rand_vec(&mut rng, np, 1.0);
                let lp: Vec<f32> = base.iter().zip(&noise).map(|(a, b)| a + b).collect();
                p.extend(massv::sampling::probabilities(&lp, &sp));
                if i < gamma {
                    let noise = rand_vec(&mut rng, nq, 1.0);
                    let lq: Vec<f32> = base[..nq].iter().zip(&noise).map(|(a, b)| a + 0.7 * b).collect();
                    let qi = massv::sampling::probabilities(&lq, &sp);
                    drafts.push(rng.sample(&qi) as u32);
                    q.extend(qi);
                }
            }
            // The host RNG's next γ + 1 draws, and the CPU engine's verdict from that state.
            let mut cpu_rng = rng.clone();
            let uniforms: Vec<f64> = (0..=gamma).map(|_| rng.uniform()).collect();
            let cpu = massv::spec::verify::verify_sampled(
                &drafts,
                &rows_of(&q, nq),
                &rows_of(&p, np),
                &mut cpu_rng,
                massv::spec::verify::residual,
            );
            cases.push(VerifyCase {
                gamma,
                np,
                nq,
                drafts,
                q,
                p,
                uniforms,
                cpu,
                what: format!("verify_sampled np={np} nq={nq} γ={gamma} T={temp} trial={trial}"),
            });
        }
    }
    cases
}

#[test]
fn twin_verify_sampled_is_the_cpu_engines() {
    // No device needed: the twin (blocked sums) against spec::verify (sequential sums).
    // Exact by construction up to 32 entries; beyond, a mismatch needs a uniform within
    // f64 rounding of a cumulative boundary.
    let mut outcomes = [0usize; 2];
    for c in verify_cases(18) {
        let twin = r::verify_sampled(&c.drafts, &c.q, &c.p, &c.uniforms, c.nq, c.np);
        assert_eq!(twin, c.cpu, "{}: twin vs spec::verify", c.what);
        outcomes[(twin.accepted == c.gamma) as usize] += 1;
    }
    assert!(
        outcomes[0] > 20 && outcomes[1] > 20,
        "cases exercise both paths: {outcomes:?}"
    );
}

/// The device's verdict on a case, the vocabulary split over blocks or on one block.
fn device_verify_sampled(dev: &CudaDevice, c: &VerifyCase, split: bool) -> Verdict {
    let di: Vec<i32> = c.drafts.iter().map(|&x| x as i32).collect();
    let (dd, dq, dp, du) = (
        dev.upload(&di).unwrap(),
        dev.upload(&c.q).unwrap(),
        dev.upload(&c.p).unwrap(),
        dev.upload(&c.uniforms).unwrap(),
    );
    let mut dout = dev.upload(&[-7i32, -7]).unwrap();
    dev.set_split_probabilities(split);
    dev.verify_sampled(
        &dd.as_view(),
        &dq.as_view(),
        &dp.as_view(),
        &du.as_view(),
        &mut dout.as_view_mut(),
        c.gamma,
        c.nq,
        c.np,
    )
    .unwrap();
    dev.set_split_probabilities(true);
    let got = dev.download(&dout.as_view()).unwrap();
    Verdict {
        accepted: got[0] as usize,
        next: got[1] as u32,
    }
}

/// Both the split kernels (verify_sampled_tiles, verify_sampled_draw: the default) and
/// the one-block kernel give the twin's verdict and the CPU engine's.
#[test]
fn verify_sampled_exact() {
    let dev = dev_or_skip!();
    for c in verify_cases(18) {
        let twin = r::verify_sampled(&c.drafts, &c.q, &c.p, &c.uniforms, c.nq, c.np);
        for split in [true, false] {
            let got = device_verify_sampled(&dev, &c, split);
            assert_eq!(got, twin, "{} split {split}: device vs twin", c.what);
            assert_eq!(got, c.cpu, "{} split {split}: device vs spec::verify", c.what);
        }
    }
    assert_eq!(dev.split_counters_set().unwrap(), 0, "split-K counters left set");
}

/// The verdict's corners, split and on one block, against the twin: a rejection whose
/// residual is all zero (q = 2p, not a distribution, and p 0 past q's vocabulary: the
/// token comes from p itself),
/// more drafts than a warp tests at once (γ = 40, the first 35 certain), none (γ = 0:
/// the bonus alone), and drafts outside the vocabularies (probability 0).
#[test]
fn verify_sampled_corners_split_and_one_block() {
    let dev = dev_or_skip!();
    let mut rng = Rng::new(23);
    let (np, nq) = (5000, 4900);
    let row = |rng: &mut Rng, n: usize| {
        let w: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
        let s: f32 = w.iter().sum();
        w.into_iter().map(|v| v / s).collect::<Vec<f32>>()
    };
    let mut cases = Vec::new();
    for (what, gamma) in [("residual 0", 4), ("γ 40", 40), ("γ 0", 0), ("outside", 6)] {
        let mut p = Vec::new();
        let mut q = Vec::new();
        for i in 0..=gamma {
            let mut pi = row(&mut rng, np);
            if what == "residual 0" {
                // Nothing of p past q's vocabulary, where q = 0 would leave a residual.
                pi = row(&mut rng, nq);
                pi.resize(np, 0.0);
            }
            if i < gamma {
                let qi: Vec<f32> = match what {
                    "residual 0" => pi[..nq].iter().map(|v| 2.0 * v).collect(),
                    "γ 40" if i < 35 => pi[..nq].to_vec(),
                    _ => row(&mut rng, nq),
                };
                q.extend(qi);
            }
            p.extend(pi);
        }
        let drafts: Vec<u32> = (0..gamma)
            .map(|i| match what {
                // Past both vocabularies, past q's only, and ordinary ids.
                "outside" if i % 3 == 0 => np as u32 + 5,
                "outside" if i % 3 == 1 => nq as u32 + 50,
                _ => (rng.uniform() * nq as f64) as u32,
            })
            .collect();
        for trial in 0..6 {
            let uniforms: Vec<f64> = (0..=gamma).map(|_| rng.uniform()).collect();
            let cpu = r::verify_sampled(&drafts, &q, &p, &uniforms, nq, np);
            cases.push(VerifyCase {
                gamma,
                np,
                nq,
                drafts: drafts.clone(),
                q: q.clone(),
                p: p.clone(),
                uniforms,
                cpu,
                what: format!("{what} trial {trial}"),
            });
        }
    }
    let mut rejected = [0usize; 4];
    for (i, c) in cases.iter().enumerate() {
        for split in [true, false] {
            let got = device_verify_sampled(&dev, c, split);
            assert_eq!(got, c.cpu, "{} split {split}", c.what);
        }
        rejected[i / 6] += (c.cpu.accepted < c.gamma) as usize;
    }
    // The corners are reached: rejections with a zero residual, past the first warp's
    // tests (γ 40: every verdict at 35 or later), and outside the vocabularies.
    assert!(rejected[0] > 0 && rejected[3] > 0, "{rejected:?}");
    assert!(
        cases[6..12].iter().all(|c| c.cpu.accepted >= 35),
        "γ 40: a rejection before 35"
    );
    assert_eq!(dev.split_counters_set().unwrap(), 0, "split-K counters left set");
}

#[test]
fn uniforms_consumed_matches_the_cpu_rng() {
    // No device needed: the host side of verify_sampled's contract.
    let mut rng = Rng::new(19);
    for trial in 0..200 {
        let gamma = 1 + trial % 8;
        let np = 12;
        let sp = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let p: Vec<Vec<f32>> = (0..=gamma).map(|_| softmax(&rand_vec(&mut rng, np, 3.0))).collect();
        let q: Vec<Vec<f32>> = (0..gamma)
            .map(|_| massv::sampling::probabilities(&rand_vec(&mut rng, np, 3.0), &sp))
            .collect();
        let drafts: Vec<u32> = q.iter().map(|qi| rng.sample(qi) as u32).collect();
        let start = rng.clone();
        let mut cpu_rng = rng.clone();
        let v = massv::spec::verify::verify_sampled(&drafts, &q, &p, &mut cpu_rng, massv::spec::verify::residual);
        let mut probe = start.clone();
        let used = (1..=gamma + 1)
            .find(|_| {
                probe.next_u64();
                probe.clone().next_u64() == cpu_rng.clone().next_u64()
            })
            .unwrap();
        assert_eq!(r::uniforms_consumed(v, gamma), used, "γ={gamma} {v:?}");
        rng = cpu_rng;
    }
}

// -------------------------------------------------------------------------------------
// Token-tree verification

/// One tree-verification problem: a drafted tree (children drawn from q without
/// replacement for a sampled tree, the top tokens for a fixed one, some replaced by
/// arbitrary tokens), the target's rows p, the flat drafter rows, the host RNG's next n
/// uniforms, and the CPU engine's verdicts (`spec::tree::verify_tree_*`) with the number
/// of uniforms its RNG consumed.
struct TreeCase {
    tree: TokenTree,
    np: usize,
    nq: usize,
    /// [n, np]
    p: Vec<f32>,
    /// [n]: the row of `q` each node's children were drawn from (-1: none).
    q_row: Vec<i32>,
    /// [rows, nq]
    q: Vec<f32>,
    argmax: Vec<u32>,
    uniforms: Vec<f64>,
    cpu: TreeVerdict,
    cpu_used: usize,
    cpu_greedy: TreeVerdict,
    what: String,
}

impl TreeCase {
    fn tokens_i32(&self) -> Vec<i32> {
        self.tree.tokens.iter().map(|&t| t as i32).collect()
    }

    fn parents_i32(&self) -> Vec<i32> {
        self.tree.parents.iter().map(|&p| p as i32).collect()
    }
}

/// Tree shapes over n nodes (node 0 the root, parents first): a chain, a star (every
/// node a child of the root), random parents (siblings interleaved with cousins), and
/// complete binary / ternary trees in breadth-first order.
const TREE_SHAPES: [&str; 5] = ["chain", "star", "random", "binary", "ternary"];

fn tree_parents(rng: &mut Rng, shape: &str, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| match (i, shape) {
            (0, _) => 0,
            (_, "chain") => i - 1,
            (_, "star") => 0,
            (_, "random") => (rng.uniform() * i as f64) as usize,
            (_, "binary") => (i - 1) / 2,
            _ => (i - 1) / 3,
        })
        .collect()
}

/// The flat drafter rows of a tree: (q_row [n], q [rows, nq]).
fn flat_q(tree: &TokenTree, nq: usize) -> (Vec<i32>, Vec<f32>) {
    let (mut q_row, mut q) = (Vec::new(), Vec::new());
    for row in &tree.q {
        match row {
            Some(QRow::Host(r)) => {
                assert_eq!(r.len(), nq);
                q_row.push((q.len() / nq) as i32);
                q.extend_from_slice(r);
            }
            Some(QRow::Device(_)) => panic!("flat_q takes host rows"),
            None => q_row.push(-1),
        }
    }
    (q_row, q)
}

/// (np, nq, trials) of the CPU-side checks: vocabularies of 7..5000 (up to 32 the
/// blocked order is the CPU's exactly), drafter vocabularies shorter and longer.
const TREE_SIZES: [(usize, usize, usize); 7] = [
    (7, 7, 120),
    (20, 18, 120),
    (32, 32, 80),
    (30, 34, 60),
    (100, 97, 40),
    (1000, 1000, 25),
    (5000, 4990, 10),
];

fn tree_cases(seed: u64, sizes: &[(usize, usize, usize)], max_nodes: usize) -> Vec<TreeCase> {
    let mut rng = Rng::new(seed);
    let mut cases = Vec::new();
    for &(np, nq, trials) in sizes {
        for trial in 0..trials {
            let shape = TREE_SHAPES[trial % TREE_SHAPES.len()];
            let n = [1usize, 2, 3, 6, 9, 17, 33, 64][(trial / 2 + trial / 7) % 8].min(max_nodes);
            let proposal = if trial % 2 == 0 {
                Proposal::Sampled
            } else {
                Proposal::Fixed
            };
            let sp = SamplingParams {
                temperature: [1.0f32, 0.5, 0.0, 2.0, 1.0][trial % 5],
                top_k: if trial % 3 == 2 { 5 } else { 0 },
                top_p: if trial % 4 == 3 { 0.9 } else { 1.0 },
            };
            // Per node: shared logits, then target and drafter rows near them (rounded to
            // whole numbers in some trials: tied probabilities).
            let ties = trial % 6 == 1;
            let (mut p_rows, mut q_rows) = (Vec::new(), Vec::new());
            for _ in 0..n {
                let base = rand_vec(&mut rng, np.max(nq), 4.0);
                let near = |rng: &mut Rng, len: usize| -> Vec<f32> {
                    let l: Vec<f32> = base[..len]
                        .iter()
                        .zip(rand_vec(rng, len, 0.7))
                        .map(|(a, b)| if ties { (a + b).round() } else { a + b })
                        .collect();
                    massv::sampling::probabilities(&l, &sp)
                };
                p_rows.push(near(&mut rng, np));
                q_rows.push(near(&mut rng, nq));
            }
            let parents = tree_parents(&mut rng, shape, n);
            let mut tokens = vec![(rng.uniform() * np as f64) as u32; n];
            let mut has_q = vec![false; n];
            for node in 0..n {
                let kids: Vec<usize> = (node + 1..n).filter(|&c| parents[c] == node).collect();
                if kids.is_empty() {
                    continue;
                }
                let mut picked = match proposal {
                    Proposal::Sampled => {
                        massv::spec::tree::draw_without_replacement(&q_rows[node], kids.len(), &mut rng)
                    }
                    Proposal::Fixed => massv::spec::tree::top_tokens(&q_rows[node], kids.len()),
                };
                // q runs out, or an arbitrary token (a repeat, q = 0, p = 0, past nq).
                for (i, &c) in kids.iter().enumerate() {
                    let arbitrary = i >= picked.len() || rng.uniform() < 0.1;
                    let t = (rng.uniform() * np.max(nq) as f64) as u32;
                    if i >= picked.len() {
                        picked.push(t);
                    } else if arbitrary {
                        picked[i] = t;
                    }
                    tokens[c] = picked[i];
                }
                // A sampled tree's node may lack its row (the verifier falls back to
                // point masses there).
                has_q[node] = proposal == Proposal::Sampled && rng.uniform() < 0.9;
            }
            let mut tree = TokenTree::root(tokens[0], proposal);
            for c in 1..n {
                tree.push(parents[c], tokens[c]);
            }
            for node in 0..n {
                if has_q[node] {
                    tree.q[node] = Some(QRow::Host(q_rows[node].clone()));
                }
            }
            tree.validate().unwrap();
            let (q_row, q) = flat_q(&tree, nq);
            let argmax: Vec<u32> = p_rows.iter().map(|row| r::argmax(row) as u32).collect();
            // The host RNG's next n draws, and the CPU engine's verdict from that state.
            let mut record = rng.clone();
            let uniforms: Vec<f64> = (0..n).map(|_| record.uniform()).collect();
            let mut cpu_rng = rng.clone();
            let cpu = verify_tree_sampled(&tree, &p_rows, &mut cpu_rng, massv::spec::verify::residual).unwrap();
            let mut probe = rng.clone();
            let cpu_used = (1..=n)
                .find(|_| {
                    probe.uniform();
                    probe.state() == cpu_rng.state()
                })
                .expect("the CPU consumed between 1 and n uniforms");
            rng = cpu_rng;
            cases.push(TreeCase {
                cpu_greedy: verify_tree_greedy(&tree, &argmax),
                tree,
                np,
                nq,
                p: p_rows.concat(),
                q_row,
                q,
                argmax,
                uniforms,
                cpu,
                cpu_used,
                what: format!("tree np={np} nq={nq} n={n} {shape} {proposal:?} {sp:?} ties={ties} trial={trial}"),
            });
        }
    }
    cases
}

#[test]
fn twin_verify_tree_is_the_cpu_engines() {
    // No device needed: the twins (flat arrays, blocked sums) against spec::tree, fed the
    // uniforms the engine's RNG draws. Exact by construction up to 32 entries; beyond, a
    // mismatch needs a uniform within rounding of a threshold or a cumulative boundary.
    // Outcomes: (empty path, path ≥ 2, ended at a leaf, ended rejecting every child).
    let mut seen = [0usize; 4];
    for c in tree_cases(22, &TREE_SIZES, usize::MAX) {
        let t = &c.tree;
        let twin = r::verify_tree_sampled(
            &t.tokens,
            &t.parents,
            t.proposal,
            &c.q_row,
            &c.q,
            &c.p,
            &c.uniforms,
            c.nq,
            c.np,
        );
        assert_eq!(twin, c.cpu, "{}: twin vs spec::tree", c.what);
        assert_eq!(
            r::tree_uniforms_consumed(&t.parents, &twin),
            c.cpu_used,
            "{}: uniforms consumed, {twin:?}",
            c.what
        );
        let greedy = r::verify_tree_greedy(&t.tokens, &t.parents, &c.argmax);
        assert_eq!(greedy, c.cpu_greedy, "{}: greedy twin vs spec::tree", c.what);
        let end = twin.path.last().copied().unwrap_or(0);
        seen[0] += twin.path.is_empty() as usize;
        seen[1] += (twin.path.len() >= 2) as usize;
        seen[2 + t.children(end).next().is_some() as usize] += 1;
    }
    assert!(seen.iter().all(|&k| k >= 20), "cases exercise every outcome: {seen:?}");
}

#[test]
fn twin_verify_tree_edges() {
    // No device needed. Root alone: one uniform, the draw from p[0].
    let p = [0.0f32, 0.25, 0.0, 0.75];
    let v = r::verify_tree_sampled(&[2], &[0], Proposal::Sampled, &[-1], &[], &p, &[0.5], 4, 4);
    assert_eq!(v, TreeVerdict { path: vec![], next: 3 });
    assert_eq!(r::tree_uniforms_consumed(&[0], &v), 1);
    // Fixed children: a point mass, so a child with p(x) = 0 is always rejected and a
    // repeat of a rejected sibling then has p(x) = 0 too; the draw avoids both.
    let (tokens, parents) = ([9u32, 1, 1, 3], [0usize, 0, 0, 0]);
    let p = [0.5f32, 0.3, 0.0, 0.2].repeat(4);
    let v = r::verify_tree_sampled(
        &tokens,
        &parents,
        Proposal::Fixed,
        &[-1; 4],
        &[],
        &p,
        &[0.4, 0.0, 0.99, 0.0],
        0,
        4,
    );
    assert_eq!(
        v,
        TreeVerdict { path: vec![], next: 0 },
        "0.4 ≥ 0.3, p(1) = 0 after, 0.99 ≥ 0.2"
    );
    assert_eq!(r::tree_uniforms_consumed(&parents, &v), 4);
    // A sampled child with q(x) = 0 and p(x) > 0 is accepted; descending to it.
    let q = [0.5f32, 0.0, 0.5, 0.0];
    let v = r::verify_tree_sampled(
        &[0, 1, 2],
        &[0, 0, 1],
        Proposal::Sampled,
        &[0, -1, -1],
        &q,
        &p[..12],
        &[0.999, 0.999, 0.1],
        4,
        4,
    );
    assert_eq!(v, TreeVerdict { path: vec![1], next: 0 });
    assert_eq!(r::tree_uniforms_consumed(&[0, 0, 1], &v), 3);
    // Greedy: the first of two equal children wins, a leaf gives the argmax there.
    let v = r::verify_tree_greedy(&[0, 5, 5, 6], &[0, 0, 0, 2], &[5, 7, 6, 8]);
    assert_eq!(v, TreeVerdict { path: vec![1], next: 7 });
}

#[test]
fn verify_tree_greedy_exact() {
    let dev = dev_or_skip!();
    for c in tree_cases(24, &TREE_SIZES[..3], usize::MAX) {
        let n = c.tree.len();
        let am: Vec<i32> = c.argmax.iter().map(|&a| a as i32).collect();
        let (dt, dp, da) = (
            dev.upload(&c.tokens_i32()).unwrap(),
            dev.upload(&c.parents_i32()).unwrap(),
            dev.upload(&am).unwrap(),
        );
        let mut dout = dev.alloc_zeros::<i32>(n + 1).unwrap();
        dev.verify_tree_greedy(&dt.as_view(), &dp.as_view(), &da.as_view(), &mut dout.as_view_mut(), n)
            .unwrap();
        let got = tree_verdict(&dev.download(&dout.as_view()).unwrap());
        assert_eq!(got, c.cpu_greedy, "{}: device vs spec::tree (greedy)", c.what);
        let mut short = dev.alloc_zeros::<i32>(n).unwrap();
        assert!(dev
            .verify_tree_greedy(&dt.as_view(), &dp.as_view(), &da.as_view(), &mut short.as_view_mut(), n)
            .is_err());
    }
}

/// (m, next, path[0..m]) from the device's out buffer.
fn tree_verdict(out: &[i32]) -> TreeVerdict {
    let m = out[0] as usize;
    TreeVerdict {
        path: out[2..2 + m].iter().map(|&x| x as usize).collect(),
        next: out[1] as u32,
    }
}

#[test]
fn verify_tree_sampled_exact() {
    let dev = dev_or_skip!();
    let mut cases = tree_cases(25, &TREE_SIZES, usize::MAX);
    // The real 7B target / 0.5B drafter vocabularies, trees up to 33 nodes.
    cases.extend(tree_cases(26, &[(152_064, 151_936, 10)], 33));
    for c in cases {
        let t = &c.tree;
        let n = t.len();
        let (dt, dpar, dqr, dq, dp, du) = (
            dev.upload(&c.tokens_i32()).unwrap(),
            dev.upload(&c.parents_i32()).unwrap(),
            dev.upload(&c.q_row).unwrap(),
            dev.upload(&c.q).unwrap(),
            dev.upload(&c.p).unwrap(),
            dev.upload(&c.uniforms).unwrap(),
        );
        let mut work = dev.alloc_zeros::<f32>(c.np + c.nq).unwrap();
        let mut dout = dev.alloc_zeros::<i32>(n + 1).unwrap();
        let q_rows = c.q.len() / c.nq;
        dev.verify_tree_sampled(
            &dt.as_view(),
            &dpar.as_view(),
            t.proposal,
            &dqr.as_view(),
            &dq.as_view(),
            &dp.as_view(),
            &du.as_view(),
            &mut work.as_view_mut(),
            &mut dout.as_view_mut(),
            n,
            q_rows,
            c.nq,
            c.np,
        )
        .unwrap();
        let got = tree_verdict(&dev.download(&dout.as_view()).unwrap());
        let twin = r::verify_tree_sampled(
            &t.tokens,
            &t.parents,
            t.proposal,
            &c.q_row,
            &c.q,
            &c.p,
            &c.uniforms,
            c.nq,
            c.np,
        );
        assert_eq!(got, twin, "{}: device vs twin", c.what);
        assert_eq!(got, c.cpu, "{}: device vs spec::tree", c.what);
    }
    // Lengths are checked: errors, never a launch past a buffer.
    let one = dev.upload(&[0i32]).unwrap();
    let p = dev.upload(&[1.0f32; 8]).unwrap();
    let u = dev.upload(&[0.5f64; 2]).unwrap();
    let mut work = dev.alloc_zeros::<f32>(8).unwrap();
    let mut out = dev.alloc_zeros::<i32>(3).unwrap();
    let mut call = |n: usize, nq: usize, np: usize, proposal: Proposal| {
        dev.verify_tree_sampled(
            &one.as_view(),
            &one.as_view(),
            proposal,
            &one.as_view(),
            &p.as_view(),
            &p.as_view(),
            &u.as_view(),
            &mut work.as_view_mut(),
            &mut out.as_view_mut(),
            n,
            1,
            nq,
            np,
        )
    };
    call(1, 4, 4, Proposal::Sampled).unwrap();
    for (n, nq, np, proposal) in [
        (0, 4, 4, Proposal::Fixed),       // no root
        (2, 4, 4, Proposal::Fixed),       // tokens, parents, p, out too short
        (1, 5, 4, Proposal::Sampled),     // work (np + nq) too short
        (1, 9, 4, Proposal::Sampled),     // q too short for a row of nq
        (1, 4, 9, Proposal::Fixed),       // p too short
        (1, 0, 300_000, Proposal::Fixed), // past SAMPLE_MAX_N
    ] {
        assert!(call(n, nq, np, proposal).is_err(), "n={n} nq={nq} np={np}");
    }
}

// -------------------------------------------------------------------------------------
// Benchmarks (ignored; run by bench/gpu.sh on a lent GPU)

/// One decoder's GEMV matrices per layer: (name, n, k, bias).
fn layer_mats(hidden: usize, q_dim: usize, kv_dim: usize, inter: usize) -> [(&'static str, usize, usize, bool); 4] {
    [
        ("qkv", q_dim + 2 * kv_dim, hidden, true),
        ("o", hidden, q_dim, false),
        ("gate_up", 2 * inter, hidden, false),
        ("down", hidden, inter, false),
    ]
}

struct Bench {
    dev: CudaDevice,
    bw: f64, // bytes/s, measured device-to-device copy (read + write)
    results: Vec<serde_json::Value>,
}

impl Bench {
    /// Records a timing against its memory floor (`bytes` / measured bandwidth).
    fn row(&mut self, name: &str, ms: f64, bytes: f64) {
        let floor = bytes / self.bw * 1e3;
        println!("{name:<52} {ms:>10.4} {floor:>10.4} {:>7.2}", ms / floor);
        self.results.push(serde_json::json!({
            "name": name, "ms": ms, "floor_ms": floor, "ratio": ms / floor, "bytes": bytes,
        }));
    }

    fn row_flops(&mut self, name: &str, ms: f64, flops: f64) {
        let tflops = flops / (ms * 1e-3) / 1e12;
        println!("{name:<52} {ms:>10.4} {:>10} {:>7} {tflops:.1} TFLOP/s", "-", "-");
        self.results
            .push(serde_json::json!({"name": name, "ms": ms, "tflops": tflops}));
    }

    /// Average ms of `f` over `iters` runs after 2 warm-up runs.
    fn time(&self, iters: usize, mut f: impl FnMut() -> massv::Result<()>) -> f64 {
        for _ in 0..2 {
            f().unwrap();
        }
        let ms = self
            .dev
            .time_ms(|| {
                for _ in 0..iters {
                    f()?;
                }
                Ok(())
            })
            .unwrap();
        ms as f64 / iters as f64
    }

    #[allow(clippy::too_many_arguments)]
    fn gemv_swiglu(
        &self,
        x: &cudarc::driver::CudaSlice<bf16>,
        w: &cudarc::driver::CudaSlice<bf16>,
        y: &mut cudarc::driver::CudaSlice<bf16>,
        scratch: &mut cudarc::driver::CudaSlice<f32>,
        rows: usize,
        inter: usize,
        k: usize,
        rms_eps: Option<f32>,
    ) -> massv::Result<()> {
        let mut sv = scratch.as_view_mut();
        self.dev.gemv_swiglu(
            &x.as_view(),
            &w.as_view(),
            &mut y.as_view_mut(),
            Some(&mut sv),
            rows,
            inter,
            k,
            rms_eps,
        )
    }

    /// The GEMV time of one decode (rows = 1) or verify (rows = γ + 1) step of a model:
    /// every layer's matrices once (all layers allocated, so nothing is served from L2),
    /// then the head; per matrix kind and in total, against weight bytes / bandwidth.
    #[allow(clippy::too_many_arguments)]
    fn model_step(
        &mut self,
        model: &str,
        layers: usize,
        hidden: usize,
        head_dim: usize,
        q_dim: usize,
        kv_dim: usize,
        inter: usize,
        vocab: usize,
        rows_list: &[usize],
    ) {
        let mats = layer_mats(hidden, q_dim, kv_dim, inter);
        let dev = &self.dev;
        let weights: Vec<Vec<cudarc::driver::CudaSlice<bf16>>> = (0..layers)
            .map(|_| {
                mats.iter()
                    .map(|&(_, n, k, _)| dev.alloc_zeros::<bf16>(n * k).unwrap())
                    .collect()
            })
            .collect();
        let bias = dev.alloc_zeros::<bf16>(q_dim + 2 * kv_dim).unwrap();
        let head = dev.alloc_zeros::<bf16>(vocab * hidden).unwrap();
        let x = dev.alloc_zeros::<bf16>(8 * inter.max(hidden)).unwrap();
        let mut y = dev
            .alloc_zeros::<bf16>(8 * (2 * inter).max(q_dim + 2 * kv_dim))
            .unwrap();
        let mut logits = dev.alloc_zeros::<f32>(8 * vocab).unwrap();
        let mut scratch = dev.alloc_zeros::<f32>(64 * 8 * (2 * inter)).unwrap();
        let head_bytes = (vocab * hidden * 2) as f64;
        for &rows in rows_list {
            let tag = format!("{model} gemv rows={rows}");
            let mut total_bytes = head_bytes;
            for (i, &(name, n, k, has_bias)) in mats.iter().enumerate() {
                let bytes = (layers * n * k * 2) as f64;
                total_bytes += bytes;
                let ms = self.time(3, || {
                    for w in &weights {
                        let bv = bias.as_view();
                        self.dev.gemv_bf16(
                            &x.as_view(),
                            &w[i].as_view(),
                            has_bias.then_some(&bv),
                            &mut y.as_view_mut(),
                            Some(&mut scratch.as_view_mut()),
                            rows,
                            n,
                            k,
                            GemvFuse::NONE,
                        )?;
                    }
                    Ok(())
                });
                self.row(&format!("{tag} {name} ×{layers}"), ms, bytes);
            }
            // The runtime's MLP: gate_up with SwiGLU as its epilogue.
            let ms = self.time(3, || {
                for w in &weights {
                    self.gemv_swiglu(&x, &w[2], &mut y, &mut scratch, rows, inter, hidden, None)?;
                }
                Ok(())
            });
            self.row(
                &format!("{tag} gate_up+swiglu (gemv_swiglu) ×{layers}"),
                ms,
                (layers * 2 * inter * hidden * 2) as f64,
            );
            let ms = self.time(5, || {
                self.dev.gemv_bf16_f32(
                    &x.as_view(),
                    &head.as_view(),
                    None,
                    &mut logits.as_view_mut(),
                    Some(&mut scratch.as_view_mut()),
                    rows,
                    vocab,
                    hidden,
                    GemvFuse::NONE,
                )
            });
            self.row(&format!("{tag} head {vocab}x{hidden}"), ms, head_bytes);
            // Greedy decoding's head: the GEMV, then the argmax kernel over its logits; or
            // the argmax as the GEMV's epilogue.
            let mut ids = self.dev.alloc_zeros::<i32>(rows).unwrap();
            let ms = self.time(5, || {
                self.dev.gemv_bf16_f32(
                    &x.as_view(),
                    &head.as_view(),
                    None,
                    &mut logits.as_view_mut(),
                    Some(&mut scratch.as_view_mut()),
                    rows,
                    vocab,
                    hidden,
                    GemvFuse::NONE,
                )?;
                self.dev
                    .argmax(&logits.slice(..rows * vocab), &mut ids.as_view_mut(), rows, vocab)
            });
            self.row(&format!("{tag} head {vocab}x{hidden}, then argmax"), ms, head_bytes);
            let ms = self.time(5, || {
                self.dev.gemv_bf16_argmax(
                    &x.as_view(),
                    &head.as_view(),
                    None,
                    &mut logits.as_view_mut(),
                    &mut ids.as_view_mut(),
                    Some(&mut scratch.as_view_mut()),
                    rows,
                    vocab,
                    hidden,
                    GemvFuse::NONE,
                )
            });
            self.row(
                &format!("{tag} head {vocab}x{hidden} with its argmax (gemv_bf16_argmax)"),
                ms,
                head_bytes,
            );
            // A layer's QKV projection and RoPE + cache write: two launches, or one (the
            // runtime's: gemv_rope_kv_append), after 300 cached tokens.
            let shape = AttnShape {
                n: rows,
                start: 300,
                q_heads: q_dim / head_dim,
                kv_heads: kv_dim / head_dim,
                head_dim,
            };
            let positions = self.dev.upload(&(300..300 + rows as i32).collect::<Vec<_>>()).unwrap();
            let mut q = self.dev.alloc_zeros::<bf16>(rows * q_dim).unwrap();
            let mut kc = self.dev.alloc_zeros::<bf16>(310 * kv_dim).unwrap();
            let mut vc = self.dev.alloc_zeros::<bf16>(310 * kv_dim).unwrap();
            let qkv_width = q_dim + 2 * kv_dim;
            let (eps, theta) = (1e-6, 1e6);
            let ms = self.time(3, || {
                for w in &weights {
                    self.dev.gemv_bf16(
                        &x.as_view(),
                        &w[0].as_view(),
                        Some(&bias.as_view()),
                        &mut y.as_view_mut(),
                        Some(&mut scratch.as_view_mut()),
                        rows,
                        qkv_width,
                        hidden,
                        GemvFuse::rms(eps),
                    )?;
                    self.dev.rope_kv_append(
                        &y.slice(..rows * qkv_width),
                        &positions.as_view(),
                        &mut q.as_view_mut(),
                        &mut kc.as_view_mut(),
                        &mut vc.as_view_mut(),
                        shape,
                        theta,
                        None,
                        None,
                    )?;
                }
                Ok(())
            });
            let qkv_bytes = (layers * qkv_width * hidden * 2) as f64;
            self.row(&format!("{tag} qkv, then rope_kv_append ×{layers}"), ms, qkv_bytes);
            let ms = self.time(3, || {
                for w in &weights {
                    self.dev.gemv_rope_kv_append(
                        &x.as_view(),
                        &w[0].as_view(),
                        Some(&bias.as_view()),
                        Some(&mut scratch.as_view_mut()),
                        &positions.as_view(),
                        &mut q.as_view_mut(),
                        &mut kc.as_view_mut(),
                        &mut vc.as_view_mut(),
                        shape,
                        hidden,
                        Some(eps),
                        theta,
                        None,
                        None,
                    )?;
                }
                Ok(())
            });
            self.row(
                &format!("{tag} qkv with rope_kv_append (gemv_rope_kv_append) ×{layers}"),
                ms,
                qkv_bytes,
            );
            // The runtime's fusions: QKV and gate_up scale their input rows (the folded
            // RMSNorms), o and down add into the residual stream.
            let eps = 1e-6;
            let ms = self.time(3, || {
                for w in &weights {
                    for (i, &(name, n, k, has_bias)) in mats.iter().enumerate() {
                        if name == "gate_up" {
                            self.gemv_swiglu(&x, &w[i], &mut y, &mut scratch, rows, inter, hidden, Some(eps))?;
                            continue;
                        }
                        let fuse = if name == "qkv" {
                            GemvFuse::rms(eps)
                        } else {
                            GemvFuse::ADD
                        };
                        let bv = bias.as_view();
                        self.dev.gemv_bf16(
                            &x.as_view(),
                            &w[i].as_view(),
                            has_bias.then_some(&bv),
                            &mut y.as_view_mut(),
                            Some(&mut scratch.as_view_mut()),
                            rows,
                            n,
                            k,
                            fuse,
                        )?;
                    }
                }
                self.dev.gemv_bf16_f32(
                    &x.as_view(),
                    &head.as_view(),
                    None,
                    &mut logits.as_view_mut(),
                    Some(&mut scratch.as_view_mut()),
                    rows,
                    vocab,
                    hidden,
                    GemvFuse::NONE,
                )
            });
            self.row(&format!("{tag} STEP (all layers + head)"), ms, total_bytes);
        }
    }

    /// attention_decode, attention_verify of a chain (γ + 1 = 6) and of a 32-node tree
    /// (random ancestor mask; the target wants it within 1.15 × the chain's) of one layer
    /// at several lengths, against the KV bytes read.
    fn attention(&mut self, model: &str, hq: usize, hkv: usize, d: usize) {
        let dev = &self.dev;
        let max_len = 4096 + 8;
        let tree_n = 32;
        let k = dev.alloc_zeros::<bf16>(max_len * hkv * d).unwrap();
        let v = dev.alloc_zeros::<bf16>(max_len * hkv * d).unwrap();
        let q = dev.alloc_zeros::<bf16>(tree_n * hq * d).unwrap();
        let mut out = dev.alloc_zeros::<bf16>(tree_n * hq * d).unwrap();
        let mut scratch = dev.attn_scratch(tree_n * hq, 256, d).unwrap();
        let n = 6;
        let mask = dev.upload(&tree_mask(&mut Rng::new(5), n, true)).unwrap();
        let tree = dev.upload(&tree_mask(&mut Rng::new(6), tree_n, false)).unwrap();
        for &len in &[512usize, 1024, 2048, 4096] {
            let bytes = (len * hkv * d * 2 * 2) as f64;
            let ms = self.time(50, || {
                self.dev.attention_decode(
                    &q.as_view(),
                    &k.as_view(),
                    &v.as_view(),
                    &mut out.as_view_mut(),
                    len,
                    hq,
                    hkv,
                    d,
                    &mut scratch,
                )
            });
            self.row(&format!("{model} attention_decode len={len} (1 layer)"), ms, bytes);
            let shape = AttnShape {
                n,
                start: len - n,
                q_heads: hq,
                kv_heads: hkv,
                head_dim: d,
            };
            let ms = self.time(50, || {
                self.dev.attention_verify(
                    &q.as_view(),
                    &k.as_view(),
                    &v.as_view(),
                    &mut out.as_view_mut(),
                    &mask.as_view(),
                    len - n,
                    shape,
                    &mut scratch,
                )
            });
            self.row(
                &format!("{model} attention_verify γ+1=6 len={len} (1 layer)"),
                ms,
                bytes,
            );
            let shape = AttnShape {
                n: tree_n,
                start: len - tree_n,
                ..shape
            };
            let tree_ms = self.time(50, || {
                self.dev.attention_verify(
                    &q.as_view(),
                    &k.as_view(),
                    &v.as_view(),
                    &mut out.as_view_mut(),
                    &tree.as_view(),
                    len - tree_n,
                    shape,
                    &mut scratch,
                )
            });
            self.row(
                &format!("{model} attention_verify tree n=32 len={len} (1 layer)"),
                tree_ms,
                bytes,
            );
            let ratio = tree_ms / ms;
            println!("{:<52} {ratio:>10.3} (target ≤ 1.15)", "  tree n=32 / chain γ+1=6");
            self.results.push(serde_json::json!({
                "name": format!("{model} attention_verify tree n=32 / chain γ+1=6 len={len}"),
                "tree_ms": tree_ms, "chain_ms": ms, "tree_over_chain": ratio, "target_max": 1.15,
            }));
        }
    }
}

#[test]
#[ignore = "benchmark: run by bench/gpu.sh on a lent GPU"]
fn bench_kernels() {
    let dev = dev_or_skip!();
    let info = dev.info().clone();
    println!(
        "device: {} (sm_{}{}, {} SMs, {:.1} GiB)",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.multiprocessors,
        info.total_memory as f64 / (1u64 << 30) as f64
    );
    // Device-to-device copy of 1 GiB: read + write bytes / time.
    let bytes = 1usize << 30;
    let a = dev.alloc_zeros::<u8>(bytes).unwrap();
    let mut b_ = dev.alloc_zeros::<u8>(bytes).unwrap();
    let mut bench = Bench {
        dev,
        bw: 1.0,
        results: Vec::new(),
    };
    let ms = bench.time(10, || bench.dev.copy(&a.as_view(), &mut b_.as_view_mut()));
    bench.bw = 2.0 * bytes as f64 / (ms * 1e-3);
    drop((a, b_));
    println!("device-to-device copy bandwidth: {:.0} GB/s", bench.bw / 1e9);
    println!("{:<52} {:>10} {:>10} {:>7}", "kernel", "ms", "floor ms", "ratio");

    // Qwen2.5-VL-7B target: decode (1 row) and verify (γ + 1 = 6 rows); 0.5B drafter.
    bench.model_step("7B", 28, 3584, 128, 28 * 128, 4 * 128, 18944, 152_064, &[1, 6]);
    bench.model_step("0.5B", 24, 896, 64, 14 * 64, 2 * 64, 4864, 151_936, &[1]);
    bench.attention("7B", 28, 4, 128);
    bench.attention("0.5B", 14, 2, 64);

    // Sampling and verification at the real vocabulary.
    let dev = &bench.dev;
    let vocab = 152_064;
    let logits = dev.upload(&rand_vec(&mut Rng::new(1), 6 * vocab, 8.0)).unwrap();
    let mut probs = dev.alloc_zeros::<f32>(6 * vocab).unwrap();
    let mut ids = dev.alloc_zeros::<i32>(8).unwrap();
    let uniforms = dev.upload(&[0.5f64; 8]).unwrap();
    let drafts = dev.upload(&[1i32, 2, 3, 4, 5]).unwrap();
    let row_bytes = (vocab * 4) as f64;
    let ms = bench.time(50, || {
        bench.dev.argmax(&logits.as_view(), &mut ids.as_view_mut(), 1, vocab)
    });
    bench.row("argmax 1x152064", ms, row_bytes);
    let t1 = SamplingParams {
        temperature: 1.0,
        ..Default::default()
    };
    let tp = SamplingParams {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.9,
    };
    // Qwen2.5-0.5B-Instruct's generation_config.json: a drafter's draw as it ships.
    let drafter = SamplingParams {
        temperature: 0.7,
        top_k: 20,
        top_p: 0.8,
    };
    // Top-p alone: the split cut's radix select (a top-k of at most 64 takes the top-k
    // select instead, as the two configs above do).
    let top_p_only = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.95,
    };
    // A drafter's draw at T = 1 (a row's softmax, then the draw), plain and cut by top-k /
    // top-p, and a verify block's 6 rows: each row on one block (one SM), or split over
    // many (the default; floor: the logits read and the probabilities written once).
    for (split, how) in [(false, "each row on one block"), (true, "rows split over blocks")] {
        bench.dev.set_split_probabilities(split);
        let ms = bench.time(5, || {
            bench
                .dev
                .probabilities(&logits.as_view(), &mut probs.as_view_mut(), 6, vocab, &tp)
        });
        bench.row(
            &format!("probabilities 6x152064 T=1 top-k 50 top-p 0.9, {how}"),
            ms,
            2.0 * 6.0 * row_bytes,
        );
        for (params, named) in [
            (&t1, "T=1"),
            (&drafter, "T=0.7 top-k 20 top-p 0.8"),
            (&top_p_only, "T=1 top-p 0.95"),
        ] {
            let ms = bench.time(50, || {
                bench.dev.probabilities_sample(
                    &logits.slice(..vocab),
                    &mut probs.slice_mut(..vocab),
                    &uniforms.slice(..1),
                    &mut ids.slice_mut(..1),
                    1,
                    vocab,
                    params,
                )
            });
            bench.row(
                &format!("probabilities_sample 1x152064 {named}, {how}"),
                ms,
                2.0 * row_bytes,
            );
        }
        let ms = bench.time(20, || {
            bench
                .dev
                .probabilities(&logits.as_view(), &mut probs.as_view_mut(), 6, vocab, &t1)
        });
        bench.row(&format!("probabilities 6x152064 T=1, {how}"), ms, 2.0 * 6.0 * row_bytes);
        // A T = 0 tree's first depth (the root's row) and a later one (4 frontier rows),
        // each row's 4 best children (floor: the rows read once; both read them 3 times,
        // one SM a row or 32 blocks).
        let (mut top_ids, mut top_probs) = (
            bench.dev.alloc_zeros::<i32>(16).unwrap(),
            bench.dev.alloc_zeros::<f32>(16).unwrap(),
        );
        for rows in [1, 4] {
            let ms = bench.time(50, || {
                bench.dev.top_k(
                    &logits.slice(..rows * vocab),
                    &mut top_ids.slice_mut(..rows * 4),
                    &mut top_probs.slice_mut(..rows * 4),
                    rows,
                    vocab,
                    4,
                )
            });
            bench.row(&format!("top_k {rows}x152064 k=4, {how}"), ms, rows as f64 * row_bytes);
        }
    }
    // A T > 0 tree depth: 4 frontier nodes (full softmax rows), 4 children each; the
    // nodes draw at once, a draw passing over its row twice (floor: the rows read once).
    let dev = &bench.dev;
    let counts = dev.upload(&[4i32; 4]).unwrap();
    let draw_u = dev.upload(&[0.25f64, 0.5, 0.75, 0.9].repeat(4)).unwrap();
    let (mut draws, mut work) = (
        dev.alloc_zeros::<i32>(4).unwrap(),
        dev.alloc_zeros::<f32>(8 * vocab).unwrap(),
    );
    let (mut out, mut out_q) = (dev.alloc_zeros::<i32>(17).unwrap(), dev.alloc_zeros::<f32>(16).unwrap());
    let ms = bench.time(10, || {
        bench.dev.sample_without_replacement(
            &probs.slice(..4 * vocab),
            &counts.as_view(),
            &draw_u.as_view(),
            &mut draws.as_view_mut(),
            &mut work.as_view_mut(),
            &mut out.as_view_mut(),
            &mut out_q.as_view_mut(),
            0,
            4,
            16,
            vocab,
        )
    });
    bench.row(
        "sample_without_replacement 4x152064, 4 draws a row",
        ms,
        4.0 * row_bytes,
    );
    // p: the top-k / top-p rows, where the drafts have p = 0: rejected at once; q: the
    // full softmax of the same logits, so the residual is p's kept entries less q's.
    // Floor: p and q read once.
    bench
        .dev
        .probabilities(&logits.as_view(), &mut probs.as_view_mut(), 6, vocab, &tp)
        .unwrap();
    let mut q_rows = bench.dev.alloc_zeros::<f32>(5 * vocab).unwrap();
    bench
        .dev
        .probabilities(&logits.slice(..5 * vocab), &mut q_rows.as_view_mut(), 5, vocab, &t1)
        .unwrap();
    for (split, how) in [(false, "on one block"), (true, "split over blocks")] {
        bench.dev.set_split_probabilities(split);
        let ms = bench.time(20, || {
            bench.dev.verify_sampled(
                &drafts.as_view(),
                &q_rows.as_view(),
                &probs.as_view(),
                &uniforms.as_view(),
                &mut ids.as_view_mut(),
                5,
                vocab,
                vocab,
            )
        });
        bench.row(&format!("verify_sampled γ=5 152064, {how}"), ms, 2.0 * row_bytes);
    }
    // A sampled tree's worst step: the root's 8 children all rejected (8 residuals and
    // 8 removals over the vocabulary), then the draw; floor: p and q read and written
    // once per rejection. p: the top-k/top-p rows (children where p = 0: always
    // rejected), q: full softmax rows.
    let dev = &bench.dev;
    let kids = 8;
    let mut tree_p = dev.alloc_zeros::<f32>((kids + 1) * vocab).unwrap();
    dev.copy(&probs.slice(..6 * vocab), &mut tree_p.slice_mut(..6 * vocab))
        .unwrap();
    let mut tree_q = dev.alloc_zeros::<f32>(vocab).unwrap();
    dev.probabilities(
        &logits.slice(vocab..2 * vocab),
        &mut tree_q.as_view_mut(),
        1,
        vocab,
        &t1,
    )
    .unwrap();
    let p0 = dev.download(&tree_p.slice(..vocab)).unwrap();
    let mut tokens = vec![0i32];
    tokens.extend((0..vocab as i32).filter(|&i| p0[i as usize] == 0.0).take(kids));
    let parents = vec![0i32; kids + 1];
    let mut q_row = vec![-1i32; kids + 1];
    q_row[0] = 0;
    let (dt, dpar, dqr) = (
        dev.upload(&tokens).unwrap(),
        dev.upload(&parents).unwrap(),
        dev.upload(&q_row).unwrap(),
    );
    let uniforms = dev.upload(&[0.5f64; 16]).unwrap();
    let mut work = dev.alloc_zeros::<f32>(2 * vocab).unwrap();
    let mut tree_out = dev.alloc_zeros::<i32>(kids + 2).unwrap();
    let ms = bench.time(10, || {
        bench.dev.verify_tree_sampled(
            &dt.as_view(),
            &dpar.as_view(),
            Proposal::Sampled,
            &dqr.as_view(),
            &tree_q.as_view(),
            &tree_p.as_view(),
            &uniforms.as_view(),
            &mut work.as_view_mut(),
            &mut tree_out.as_view_mut(),
            kids + 1,
            1,
            vocab,
            vocab,
        )
    });
    assert_eq!(
        bench.dev.download(&tree_out.slice(..1)).unwrap()[0],
        0,
        "every child rejected"
    );
    bench.row(
        "verify_tree_sampled 8 children rejected 152064",
        ms,
        (kids * 4) as f64 * row_bytes,
    );

    // Compute-bound prefill pieces (no floor: achieved TFLOP/s).
    let (s, hq, hkv, d) = (1024usize, 28usize, 4usize, 128usize);
    let dev = &bench.dev;
    let q = dev.alloc_zeros::<bf16>(s * hq * d).unwrap();
    let kv = dev.alloc_zeros::<bf16>(s * hkv * d).unwrap();
    let mut out = dev.alloc_zeros::<bf16>(s * hq * d).unwrap();
    let shape = AttnShape {
        n: s,
        start: 0,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
    };
    let ms = bench.time(10, || {
        bench.dev.attention_prefill(
            &q.as_view(),
            &kv.as_view(),
            &kv.as_view(),
            &mut out.as_view_mut(),
            shape,
            None,
            None,
        )
    });
    bench.row_flops(
        "attention_prefill 7B S=1024 (1 layer)",
        ms,
        (4 * s * s / 2 * hq * d) as f64,
    );
    if bench.dev.cublas_status().is_ok() {
        let (m, n, k) = (1024usize, 18944usize * 2, 3584usize);
        let dev = &bench.dev;
        let x = dev.alloc_zeros::<bf16>(m * k).unwrap();
        let w = dev.alloc_zeros::<bf16>(n * k).unwrap();
        let mut y = dev.alloc_zeros::<bf16>(m * n).unwrap();
        let ms = bench.time(10, || {
            bench
                .dev
                .gemm_bf16(&x.as_view(), &w.as_view(), &mut y.as_view_mut(), m, n, k)
        });
        bench.row_flops("gemm_bf16 (cuBLAS) 1024x37888x3584", ms, (2 * m * n * k) as f64);
    }

    if let Ok(path) = std::env::var("MASSV_BENCH_JSON") {
        // What ptxas gave each kernel for this device's architecture (none where the
        // device JIT-compiles the PTX instead), beside the timings.
        let arch = format!("sm_{}{}", info.compute_capability.0, info.compute_capability.1);
        let ptxas: Vec<_> = (massv::backend::kernels::RESOURCES.iter())
            .filter(|r| r.arch == arch)
            .map(|r| {
                serde_json::json!({
                    "kernel": r.kernel,
                    "registers": r.registers,
                    "spill_stores": r.spill_stores,
                    "spill_loads": r.spill_loads,
                    "shared_bytes": r.shared,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "device": info.name,
            "compute_capability": format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
            "multiprocessors": info.multiprocessors,
            "date": std::env::var("MASSV_BENCH_DATE").unwrap_or_default(),
            "commit": std::env::var("MASSV_COMMIT").unwrap_or_default(),
            "kernel_archs": massv::backend::kernels::ARCHS,
            "copy_bandwidth_gbs": bench.bw / 1e9,
            "results": bench.results,
            "ptxas_arch": arch,
            "ptxas": ptxas,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("wrote {path}");
    }
}

/// `CudaDevice::capture` records launches into a graph without running them, and
/// `launch_graph` replays them reading device memory as it is then, with the arguments
/// fixed at capture. What a graph cannot hold (a host copy, an allocation) fails the
/// capture, as does a capture inside one or one that launches nothing; launches run at
/// once again after each.
#[test]
fn device_graphs_replay_what_was_captured() {
    let dev = dev_or_skip!();
    let mut src = dev.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let mut dst = dev.alloc_zeros::<bf16>(4).unwrap();
    let graph = dev
        .capture(|| dev.f32_to_bf16(&src.slice(..3), &mut dst.as_view_mut(), 3))
        .unwrap();
    assert_eq!(down_bf16(&dev, &dst, 4), [0.0; 4], "nothing runs while capturing");
    dev.launch_graph(&graph).unwrap();
    assert_eq!(down_bf16(&dev, &dst, 4), [1.0, 2.0, 3.0, 0.0]);
    dev.upload_into(&[5.0f32, 6.0, 7.0, 8.0], &mut src.as_view_mut())
        .unwrap();
    dev.launch_graph(&graph).unwrap();
    assert_eq!(
        down_bf16(&dev, &dst, 4),
        [5.0, 6.0, 7.0, 0.0],
        "the replay reads the new input, over the 3 elements captured"
    );

    let message = |r: massv::Result<massv::backend::cuda::DeviceGraph>| match r {
        Ok(_) => panic!("the capture should fail"),
        Err(e) => e.to_string(),
    };
    let e = message(dev.capture(|| dev.upload(&[1i32]).map(|_| ())));
    assert!(e.contains("host-to-device") && e.contains("captured"), "{e}");
    let e = message(dev.capture(|| dev.alloc_zeros::<f32>(4).map(|_| ())));
    assert!(e.contains("allocation") && e.contains("captured"), "{e}");
    let e = message(dev.capture(|| dev.capture(|| Ok(())).map(|_| ())));
    assert!(e.contains("already capturing"), "{e}");
    let e = message(dev.capture(|| Ok(())));
    assert!(e.contains("nothing was launched"), "{e}");
    dev.f32_to_bf16(&src.slice(1..4), &mut dst.as_view_mut(), 3).unwrap();
    assert_eq!(
        down_bf16(&dev, &dst, 4),
        [6.0, 7.0, 8.0, 0.0],
        "launches run at once again"
    );
}
