//! Launchers of cuda/rmsnorm.cu, swiglu.cu, rope.cu, projector.cu, embedding.cu,
//! kv_cache.cu and convert.cu.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

use super::{
    aligned16, bf16, elementwise_cfg, i32_arg, need, row_cfg, shape_err, threads_for, AttnShape, CudaDevice, DeviceLen,
};
use crate::error::Result;

impl CudaDevice {
    /// y = rmsnorm(x) · w per row; x, y: [rows, dim], w: [dim].
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm";
        need(OP, "x", x.len(), rows * dim)?;
        need(OP, "w", w.len(), dim)?;
        need(OP, "y", y.len(), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, wp, yp) = (self.rptr(x), self.rptr(w), self.wptr(y));
        self.launch(
            "rmsnorm",
            "rmsnorm",
            row_cfg(rows, dim),
            &[&xp, &wp, &yp, &i32_arg(OP, "dim", dim)?, &eps],
        )
    }

    /// residual += x, y = rmsnorm(residual) · w; x, residual, y: [rows, dim].
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual(
        &self,
        x: &CudaView<'_, bf16>,
        residual: &mut CudaViewMut<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_residual";
        need(OP, "x", x.len(), rows * dim)?;
        need(OP, "residual", residual.len(), rows * dim)?;
        need(OP, "w", w.len(), dim)?;
        need(OP, "y", y.len(), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, rp, wp, yp) = (self.rptr(x), self.wptr(residual), self.rptr(w), self.wptr(y));
        self.launch(
            "rmsnorm",
            OP,
            row_cfg(rows, dim),
            &[&xp, &rp, &wp, &yp, &i32_arg(OP, "dim", dim)?, &eps],
        )
    }

    /// out = silu(gate) · up; gate_up: [rows, 2 · inter] (gate first), out: [rows, inter].
    pub fn swiglu(
        &self,
        gate_up: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu";
        need(OP, "gate_up", gate_up.len(), rows * 2 * inter)?;
        need(OP, "out", out.len(), rows * inter)?;
        if rows * inter == 0 {
            return Ok(());
        }
        let (gp, op) = (self.rptr(gate_up), self.wptr(out));
        self.launch(
            "swiglu",
            "swiglu",
            elementwise_cfg(rows * inter),
            &[&gp, &op, &i32_arg(OP, "rows", rows)?, &i32_arg(OP, "inter", inter)?],
        )
    }

    /// RoPE in place; x: [tokens, heads, head_dim], positions: [tokens].
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        positions: &CudaView<'_, i32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope";
        rope_checks(OP, x.len(), tokens, heads, head_dim)?;
        need(OP, "positions", positions.len(), tokens)?;
        if tokens == 0 {
            return Ok(());
        }
        let (xp, pp) = (self.wptr(x), self.rptr(positions));
        self.launch(
            "rope",
            "rope",
            rope_cfg(tokens, heads, head_dim),
            &[&xp, &pp, &(heads as i32), &(head_dim as i32), &theta],
        )
    }

    /// M-RoPE in place; positions: [3, tokens] (temporal, height, width rows); `section`
    /// pairs per axis, summing to head_dim / 2.
    #[allow(clippy::too_many_arguments)]
    pub fn mrope(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        positions: &CudaView<'_, i32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
        section: [usize; 3],
    ) -> Result<()> {
        const OP: &str = "mrope";
        rope_checks(OP, x.len(), tokens, heads, head_dim)?;
        need(OP, "positions", positions.len(), 3 * tokens)?;
        if section.iter().sum::<usize>() != head_dim / 2 {
            return Err(shape_err(
                OP,
                format!("section {section:?} does not sum to head_dim / 2"),
            ));
        }
        if tokens == 0 {
            return Ok(());
        }
        let (xp, pp) = (self.wptr(x), self.rptr(positions));
        self.launch(
            "rope",
            "mrope",
            rope_cfg(tokens, heads, head_dim),
            &[
                &xp,
                &pp,
                &i32_arg(OP, "tokens", tokens)?,
                &(heads as i32),
                &(head_dim as i32),
                &theta,
                &(section[0] as i32),
                &(section[1] as i32),
            ],
        )
    }

    /// A decoder layer's RoPE and cache write in one launch, after its QKV projection:
    /// rope (`section` None) or M-RoPE of the queries into `q_out` ([n, q_heads ·
    /// head_dim]) and of the keys into cache positions `s.start`.., the values copied
    /// beside them (caches: [capacity, kv_heads · head_dim]). qkv: [n, (q_heads + 2 ·
    /// kv_heads) · head_dim], each token's q heads, k heads, v heads; positions: [n], or
    /// [3, n] under M-RoPE. With `len_at` the cache rows start at its value on the device
    /// when the kernel runs (`s.start` unused).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_append(
        &self,
        qkv: &CudaView<'_, bf16>,
        positions: &CudaView<'_, i32>,
        q_out: &mut CudaViewMut<'_, bf16>,
        k_cache: &mut CudaViewMut<'_, bf16>,
        v_cache: &mut CudaViewMut<'_, bf16>,
        s: AttnShape,
        theta: f32,
        section: Option<[usize; 3]>,
        len_at: Option<DeviceLen<'_>>,
    ) -> Result<()> {
        const OP: &str = "rope_kv_append";
        let (n, hd) = (s.n, s.head_dim);
        rope_checks(OP, qkv.len(), n, s.q_heads + 2 * s.kv_heads, hd)?;
        let a = self.rope_kv_dest(OP, positions, q_out, k_cache, v_cache, s, section, len_at)?;
        if n == 0 {
            return Ok(());
        }
        let xp = self.rptr(qkv);
        self.launch(
            "rope",
            OP,
            rope_cfg(n, s.q_heads + s.kv_heads, hd),
            &[
                &xp,
                &a.positions,
                &i32_arg(OP, "tokens", n)?,
                &(s.q_heads as i32),
                &(s.kv_heads as i32),
                &(hd as i32),
                &theta,
                &a.s0,
                &a.s1,
                &a.q_out,
                &a.k_cache,
                &a.v_cache,
                &a.len,
                &a.len_at,
            ],
        )
    }

    /// Where rope_kv_append (or the QKV GEMV with it fused) writes, checked: positions
    /// for `s.n` tokens ([n], or [3, n] under M-RoPE with a section summing to head_dim /
    /// 2), q_out [n, q_heads · head_dim], caches holding rows start + n (or, with
    /// `len_at`, their capacity).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_kv_dest(
        &self,
        op: &str,
        positions: &CudaView<'_, i32>,
        q_out: &mut CudaViewMut<'_, bf16>,
        k_cache: &mut CudaViewMut<'_, bf16>,
        v_cache: &mut CudaViewMut<'_, bf16>,
        s: AttnShape,
        section: Option<[usize; 3]>,
        len_at: Option<DeviceLen<'_>>,
    ) -> Result<RopeKvDest> {
        let (n, hd) = (s.n, s.head_dim);
        let row = s.kv_heads * hd;
        let axes = if section.is_some() { 3 } else { 1 };
        need(op, "positions", positions.len(), axes * n)?;
        need(op, "q_out", q_out.len(), n * s.q_heads * hd)?;
        // Rows written: start.. (start read on the device with len_at, below capacity).
        let end = match len_at {
            Some(l) => {
                need(op, "len", l.at.len(), 1)?;
                l.capacity
            }
            None => s.start + n,
        };
        need(op, "k_cache", k_cache.len(), end * row)?;
        need(op, "v_cache", v_cache.len(), end * row)?;
        let (s0, s1) = match section {
            Some(sec) if sec.iter().sum::<usize>() != hd / 2 => {
                return Err(shape_err(op, format!("section {sec:?} does not sum to head_dim / 2")));
            }
            Some(sec) => (sec[0], sec[1]),
            None => (hd / 2, 0),
        };
        Ok(RopeKvDest {
            positions: self.rptr(positions),
            s0: s0 as i32,
            s1: s1 as i32,
            q_out: self.wptr(q_out),
            k_cache: self.wptr(k_cache),
            v_cache: self.wptr(v_cache),
            len: i32_arg(op, "len", s.start)?,
            len_at: len_at.map_or(0, |l| self.rptr(l.at)),
        })
    }

    /// The vision tower's 2-D RoPE in place; rows, cols: [tokens] (the patch's grid row and
    /// column).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_vision(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        rows: &CudaView<'_, i32>,
        cols: &CudaView<'_, i32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope_vision";
        rope_checks(OP, x.len(), tokens, heads, head_dim)?;
        need(OP, "rows", rows.len(), tokens)?;
        need(OP, "cols", cols.len(), tokens)?;
        if head_dim % 4 != 0 {
            return Err(shape_err(OP, format!("head_dim {head_dim} is not a multiple of 4")));
        }
        if tokens == 0 {
            return Ok(());
        }
        let (xp, rp, cp) = (self.wptr(x), self.rptr(rows), self.rptr(cols));
        self.launch(
            "rope",
            OP,
            rope_cfg(tokens, heads, head_dim),
            &[&xp, &rp, &cp, &(heads as i32), &(head_dim as i32), &theta],
        )
    }

    /// Exact GELU in place over x's first n values.
    pub fn gelu(&self, x: &mut CudaViewMut<'_, bf16>, n: usize) -> Result<()> {
        need("gelu", "x", x.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let xp = self.wptr(x);
        self.launch("projector", "gelu", elementwise_cfg(n), &[&xp, &xp, &(n as i64)])
    }

    /// x = gelu(x + bias) in place; x: [rows, cols], bias: [cols].
    pub fn bias_gelu(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        bias: &CudaView<'_, bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.bias_op("bias_gelu", x, bias, rows, cols)
    }

    /// x += bias in place; x: [rows, cols], bias: [cols].
    pub fn bias_add(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        bias: &CudaView<'_, bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.bias_op("bias_add", x, bias, rows, cols)
    }

    fn bias_op(
        &self,
        op: &'static str,
        x: &mut CudaViewMut<'_, bf16>,
        bias: &CudaView<'_, bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        need(op, "x", x.len(), rows * cols)?;
        need(op, "bias", bias.len(), cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (xp, bp) = (self.wptr(x), self.rptr(bias));
        self.launch(
            "projector",
            op,
            elementwise_cfg(rows * cols),
            &[&xp, &bp, &i32_arg(op, "rows", rows)?, &i32_arg(op, "cols", cols)?],
        )
    }

    /// RMSNorm of each vision patch (x: [patches, dv]) into fc1's input rows
    /// (y: [patches / m2, m2 · dv]); patches must be a multiple of m2.
    #[allow(clippy::too_many_arguments)]
    pub fn projector_norm_gather(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        patches: usize,
        dv: usize,
        m2: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "projector_norm_gather";
        if m2 == 0 || patches % m2 != 0 {
            return Err(shape_err(OP, format!("{patches} patches are not groups of {m2}")));
        }
        need(OP, "x", x.len(), patches * dv)?;
        need(OP, "w", w.len(), dv)?;
        need(OP, "y", y.len(), patches * dv)?;
        if patches == 0 {
            return Ok(());
        }
        let (xp, wp, yp) = (self.rptr(x), self.rptr(w), self.wptr(y));
        self.launch(
            "projector",
            OP,
            row_cfg(patches, dv),
            &[&xp, &wp, &yp, &i32_arg(OP, "dv", dv)?, &eps],
        )
    }

    // ---------------------------------------------------------------------------------
    // Embeddings, KV cache, conversions (cuda/embedding.cu, kv_cache.cu, convert.cu)

    /// out[t] = table[ids[t]] (zero rows for ids outside the table); table: [vocab, dim].
    pub fn embedding(
        &self,
        ids: &CudaView<'_, i32>,
        table: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        n: usize,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "embedding";
        need(OP, "ids", ids.len(), n)?;
        need(OP, "out", out.len(), n * dim)?;
        if dim == 0 || table.len() % dim != 0 {
            return Err(shape_err(
                OP,
                format!("table of {} values is not rows of {dim}", table.len()),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let (ip, tp, op) = (self.rptr(ids), self.rptr(table), self.wptr(out));
        if dim % 8 == 0 {
            aligned16(OP, "table", tp)?;
            aligned16(OP, "out", op)?;
        }
        self.launch(
            "embedding",
            OP,
            row_cfg(n, dim / 8 + 1),
            &[&ip, &tp, &op, &i32_arg(OP, "vocab", table.len() / dim)?, &(dim as i32)],
        )
    }

    /// dst[positions[i]] = src[i] for the m rows of src; rows past dst_rows are skipped.
    pub fn scatter_rows(
        &self,
        src: &CudaView<'_, bf16>,
        positions: &CudaView<'_, i32>,
        dst: &mut CudaViewMut<'_, bf16>,
        m: usize,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "scatter_rows";
        need(OP, "src", src.len(), m * dim)?;
        need(OP, "positions", positions.len(), m)?;
        if dim == 0 {
            return Err(shape_err(OP, "dim is 0"));
        }
        if m == 0 {
            return Ok(());
        }
        let dst_rows = dst.len() / dim;
        let (sp, pp, dp) = (self.rptr(src), self.rptr(positions), self.wptr(dst));
        self.launch(
            "embedding",
            OP,
            row_cfg(m, dim),
            &[
                &sp,
                &pp,
                &dp,
                &i32_arg(OP, "dst rows", dst_rows)?,
                &i32_arg(OP, "dim", dim)?,
            ],
        )
    }

    /// Writes n new rows (k_new, v_new: [n, row]) at positions len.. of the caches
    /// ([capacity, row]).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        k_new: &CudaView<'_, bf16>,
        v_new: &CudaView<'_, bf16>,
        k_cache: &mut CudaViewMut<'_, bf16>,
        v_cache: &mut CudaViewMut<'_, bf16>,
        len: usize,
        n: usize,
        row: usize,
    ) -> Result<()> {
        const OP: &str = "kv_append";
        need(OP, "k_new", k_new.len(), n * row)?;
        need(OP, "v_new", v_new.len(), n * row)?;
        need(OP, "k_cache", k_cache.len(), (len + n) * row)?;
        need(OP, "v_cache", v_cache.len(), (len + n) * row)?;
        if n == 0 {
            return Ok(());
        }
        let (kn, vn, kc, vc) = (
            self.rptr(k_new),
            self.rptr(v_new),
            self.wptr(k_cache),
            self.wptr(v_cache),
        );
        if row % 8 == 0 {
            for (name, p) in [("k_new", kn), ("v_new", vn), ("k_cache", kc), ("v_cache", vc)] {
                aligned16(OP, name, p)?;
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 2, 1),
            block_dim: (threads_for(row.div_ceil(8)), 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "kv_cache",
            OP,
            cfg,
            &[&kn, &vn, &kc, &vc, &i32_arg(OP, "len", len)?, &i32_arg(OP, "row", row)?],
        )
    }

    /// cache[dst + i] = cache[path[i]] in each of `buffers` caches laid out
    /// `buffer_stride` elements apart (path ascending, path[i] >= dst + i).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_compact(
        &self,
        cache: &mut CudaViewMut<'_, bf16>,
        path: &CudaView<'_, i32>,
        m: usize,
        dst: usize,
        row: usize,
        buffers: usize,
        buffer_stride: usize,
    ) -> Result<()> {
        const OP: &str = "kv_compact";
        need(OP, "path", path.len(), m)?;
        if buffers == 0 || m == 0 {
            return Ok(());
        }
        need(
            OP,
            "cache",
            cache.len(),
            (buffers - 1) * buffer_stride + (dst + m) * row,
        )?;
        let (cp, pp) = (self.wptr(cache), self.rptr(path));
        let cfg = LaunchConfig {
            grid_dim: (buffers as u32, 1, 1),
            block_dim: (threads_for(row), 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "kv_cache",
            OP,
            cfg,
            &[
                &cp,
                &pp,
                &i32_arg(OP, "m", m)?,
                &i32_arg(OP, "dst", dst)?,
                &i32_arg(OP, "row", row)?,
                &(buffer_stride as i64),
            ],
        )
    }

    pub fn f32_to_bf16(&self, x: &CudaView<'_, f32>, y: &mut CudaViewMut<'_, bf16>, n: usize) -> Result<()> {
        need("f32_to_bf16", "x", x.len(), n)?;
        need("f32_to_bf16", "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, yp) = (self.rptr(x), self.wptr(y));
        self.launch("convert", "f32_to_bf16", elementwise_cfg(n), &[&xp, &yp, &(n as i64)])
    }

    pub fn bf16_to_f32(&self, x: &CudaView<'_, bf16>, y: &mut CudaViewMut<'_, f32>, n: usize) -> Result<()> {
        need("bf16_to_f32", "x", x.len(), n)?;
        need("bf16_to_f32", "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, yp) = (self.rptr(x), self.wptr(y));
        self.launch("convert", "bf16_to_f32", elementwise_cfg(n), &[&xp, &yp, &(n as i64)])
    }
}

/// rope_kv_append's destinations and positions as kernel arguments ([`CudaDevice::rope_kv_dest`]).
pub(super) struct RopeKvDest {
    pub positions: u64,
    pub s0: i32,
    pub s1: i32,
    pub q_out: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub len: i32,
    pub len_at: u64,
}

fn rope_checks(op: &str, len: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
    rope_head_dim(op, head_dim)?;
    need(op, "x", len, tokens * heads * head_dim)
}

/// The head dims the RoPE kernels take: even, at most 2 · MAX_PAIRS.
pub(super) fn rope_head_dim(op: &str, head_dim: usize) -> Result<()> {
    if head_dim % 2 != 0 || head_dim > 512 || head_dim == 0 {
        return Err(shape_err(op, format!("head_dim {head_dim} (even, at most 512)")));
    }
    Ok(())
}

fn rope_cfg(tokens: usize, heads: usize, head_dim: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (threads_for(heads * head_dim / 2).min(256), 1, 1),
        shared_mem_bytes: 0,
    }
}
