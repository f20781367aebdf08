//! The KV cache on the device.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;

use crate::backend::cuda::CudaDevice;
use crate::error::Result;
use crate::kv_cache::Extent;

use super::err;

/// [`crate::kv_cache::KvCache`] on the device: `capacity` positions per layer, the first
/// `len` committed; rollback is a length change, tree compaction one kv_compact launch
/// for the keys of every layer and one for the values. `try_clone` copies it on the
/// device (no `Clone`: cudarc's would panic when the device is out of memory).
pub struct CudaKvCache {
    pub(super) dev: Arc<CudaDevice>,
    /// [layers, capacity, row] keys and values: one allocation each, so that one
    /// kv_compact launch moves a tensor's rows in every layer.
    pub(super) k: CudaSlice<bf16>,
    pub(super) v: CudaSlice<bf16>,
    path: CudaSlice<i32>, // [capacity]: the rows kv_compact gathers
    pub(super) layers: usize,
    pub(super) row: usize,
    extent: Extent,
}

impl Drop for CudaKvCache {
    fn drop(&mut self) {
        self.dev.current_for_drop();
    }
}

impl CudaKvCache {
    /// A copy on the device (speculation from a saved state); fails when memory runs out.
    pub fn try_clone(&self) -> Result<Self> {
        let dup = |src: &CudaSlice<bf16>| -> Result<CudaSlice<bf16>> {
            let mut dst = self.dev.alloc_zeros::<bf16>(src.len())?;
            self.dev.copy(&src.as_view(), &mut dst.as_view_mut())?;
            Ok(dst)
        };
        Ok(CudaKvCache {
            dev: Arc::clone(&self.dev),
            k: dup(&self.k)?,
            v: dup(&self.v)?,
            path: self.dev.alloc_zeros::<i32>(self.capacity().max(1))?,
            layers: self.layers,
            row: self.row,
            extent: self.extent,
        })
    }

    pub fn new(dev: Arc<CudaDevice>, layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        let row = kv_heads * head_dim;
        if i32::try_from(capacity).is_err() {
            return Err(err("kv cache", format!("capacity {capacity} exceeds i32")));
        }
        let total = layers
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(row))
            .ok_or_else(|| err("kv cache", format!("{layers} layers × {capacity} positions overflow")))?;
        Ok(CudaKvCache {
            k: dev.alloc_zeros(total)?,
            v: dev.alloc_zeros(total)?,
            path: dev.alloc_zeros(capacity)?,
            dev,
            layers,
            row,
            extent: Extent::new(capacity),
        })
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

    /// Makes the `n` rows written after the committed ones part of the cache.
    pub fn commit(&mut self, n: usize) -> Result<()> {
        self.extent.commit(n)
    }

    /// Forgets every token at position `len` and after.
    pub fn rollback_to(&mut self, len: usize) -> Result<()> {
        self.extent.rollback_to(len)
    }

    /// Keeps, after the first `dst` tokens, the tokens at positions `keep` (ascending, each
    /// at least `dst`) in that order: [`crate::kv_cache::KvCache::compact`].
    pub fn compact(&mut self, dst: usize, keep: &[usize]) -> Result<()> {
        let path = compact_path(self.len(), dst, keep)?;
        if !path.is_empty() {
            self.dev.upload_into(&path, &mut self.path.as_view_mut())?;
            let stride = self.capacity() * self.row;
            for cache in [&mut self.k, &mut self.v] {
                let p = self.path.slice(..path.len());
                let (m, row) = (path.len(), self.row);
                self.dev
                    .kv_compact(&mut cache.as_view_mut(), &p, m, dst, row, self.layers, stride)?;
            }
        }
        self.extent.compact(dst, keep)
    }

    /// Keys and values of the committed tokens of `layer`, as f32 (tests, diagnostics).
    pub fn layer_to_host(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if layer >= self.layers {
            return Err(err("kv cache", format!("layer {layer} of {}", self.layers)));
        }
        let (k, v) = self.layer(layer);
        let e = self.len() * self.row;
        let f = |x: Vec<bf16>| x.iter().map(|v| v.to_f32()).collect();
        Ok((
            f(self.dev.download(&k.slice(..e))?),
            f(self.dev.download(&v.slice(..e))?),
        ))
    }

    pub(super) fn layer(&self, l: usize) -> (CudaView<'_, bf16>, CudaView<'_, bf16>) {
        let at = l * self.capacity() * self.row..(l + 1) * self.capacity() * self.row;
        (self.k.slice(at.clone()), self.v.slice(at))
    }

    pub(super) fn layer_mut(&mut self, l: usize) -> (CudaViewMut<'_, bf16>, CudaViewMut<'_, bf16>) {
        let at = l * self.capacity() * self.row..(l + 1) * self.capacity() * self.row;
        (self.k.slice_mut(at.clone()), self.v.slice_mut(at))
    }
}

/// The source rows kv_compact gathers for `compact(dst, keep)` on a cache of `len`
/// tokens, after the same checks as every cache ([`Extent::compact`]).
pub fn compact_path(len: usize, dst: usize, keep: &[usize]) -> Result<Vec<i32>> {
    let mut extent = Extent::new(len);
    extent.commit(len)?;
    extent.compact(dst, keep)?;
    keep.iter()
        .map(|&p| i32::try_from(p).map_err(|_| err("kv_compact", format!("position {p} exceeds i32"))))
        .collect()
}
