//! Preallocated key/value cache of one model: `capacity` positions per layer, of which
//! the first `len` are committed. A forward pass writes its new tokens after `len`, then
//! commits them; speculative decoding rolls rejected tokens back with `rollback_to`.

use crate::error::{Error, Result};

/// The positions a cache can hold and the ones it has committed: the bookkeeping the
/// host cache here and the device cache (`model::cuda_qwen2::CudaKvCache`) share.
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    len: usize,
    capacity: usize,
}

impl Extent {
    pub fn new(capacity: usize) -> Self {
        Extent { len: 0, capacity }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Fails unless `n` more tokens fit.
    pub fn reserve(&self, n: usize) -> Result<()> {
        if self.len + n > self.capacity {
            return Err(Error::ContextOverflow {
                tokens: self.len,
                new: n,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Makes `n` more tokens committed.
    pub fn commit(&mut self, n: usize) -> Result<()> {
        self.reserve(n)?;
        self.len += n;
        Ok(())
    }

    /// Forgets every token at position `len` and after.
    pub fn rollback_to(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            return Err(Error::InvalidArgument(format!(
                "rollback_to({len}) past the cache length {}",
                self.len
            )));
        }
        self.len = len;
        Ok(())
    }

    /// Checks `compact(dst, keep)`: `keep` ascending cached positions with keep[i] ≥
    /// dst + i (so rows move down in order, as the kv_compact kernel copies them) and
    /// dst within the committed tokens; on success the cache holds dst + keep.len().
    pub fn compact(&mut self, dst: usize, keep: &[usize]) -> Result<()> {
        let ok = dst <= self.len
            && keep.iter().enumerate().all(|(i, &p)| p >= dst + i && p < self.len)
            && keep.windows(2).all(|w| w[0] < w[1]);
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "compact({dst}, {keep:?}) needs ascending cached positions from {dst} (length {})",
                self.len
            )));
        }
        self.len = dst + keep.len();
        Ok(())
    }
}

#[derive(Clone)]
pub struct KvCache {
    /// Per layer: [capacity, kv_heads, head_dim] keys and values.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    row: usize,
    extent: Extent,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let row = kv_heads * head_dim;
        KvCache {
            k: (0..layers).map(|_| vec![0.0; capacity * row]).collect(),
            v: (0..layers).map(|_| vec![0.0; capacity * row]).collect(),
            row,
            extent: Extent::new(capacity),
        }
    }

    pub fn len(&self) -> usize {
        self.extent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extent.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.extent.capacity()
    }

    /// Fails unless `n` more tokens fit.
    pub fn reserve(&self, n: usize) -> Result<()> {
        self.extent.reserve(n)
    }

    /// Writes the keys/values of the `k.len() / row` tokens after the committed ones in
    /// `layer` and returns that layer's cache up to and including them.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) -> (&[f32], &[f32]) {
        let start = self.len() * self.row;
        let (s, e) = (start, start + k.len());
        self.k[layer][s..e].copy_from_slice(k);
        self.v[layer][s..e].copy_from_slice(v);
        (&self.k[layer][..e], &self.v[layer][..e])
    }

    /// Makes the last written `n` tokens part of the cache (`write` already needed the
    /// room, so this cannot overflow).
    pub fn commit(&mut self, n: usize) {
        let committed = self.extent.commit(n);
        debug_assert!(committed.is_ok());
    }

    /// Forgets every token at position `len` and after.
    pub fn rollback_to(&mut self, len: usize) -> Result<()> {
        self.extent.rollback_to(len)
    }

    /// Keeps, after the first `dst` tokens, the tokens at positions `keep` (ascending, each
    /// at least `dst`) in that order and forgets the rest: the accepted path of a token tree
    /// becomes contiguous, at the positions its depths gave it.
    pub fn compact(&mut self, dst: usize, keep: &[usize]) -> Result<()> {
        self.extent.compact(dst, keep)?;
        let path: Vec<u32> = keep.iter().map(|&p| p as u32).collect();
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            crate::reference::kv_compact(cache, &path, dst, self.row);
        }
        Ok(())
    }

    /// Keys and values of the committed tokens of `layer` (for tests and diagnostics).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let e = self.len() * self.row;
        (&self.k[layer][..e], &self.v[layer][..e])
    }
}
