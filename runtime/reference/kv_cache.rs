//! Twins of cuda/kv_cache.cu. A cache buffer is [capacity, row] with row = kv_heads · head_dim.

/// Writes the rows of k_new / v_new ([n, row]) at positions len.. of the caches.
pub fn kv_append(k_new: &[f32], v_new: &[f32], k_cache: &mut [f32], v_cache: &mut [f32], len: usize, row: usize) {
    k_cache[len * row..][..k_new.len()].copy_from_slice(k_new);
    v_cache[len * row..][..v_new.len()].copy_from_slice(v_new);
}

/// cache[dst + i] = cache[path[i]] for i in order: gathers an accepted tree path to
/// contiguous positions (path ascending with path[i] >= dst + i).
pub fn kv_compact(cache: &mut [f32], path: &[u32], dst: usize, row: usize) {
    for (i, &from) in path.iter().enumerate() {
        let (from, to) = (from as usize, dst + i);
        if from != to {
            cache.copy_within(from * row..(from + 1) * row, to * row);
        }
    }
}
