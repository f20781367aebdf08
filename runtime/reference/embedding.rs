//! Twin of cuda/embedding.cu.

/// out[t] = table[ids[t]] ([n, dim] rows of a [vocab, dim] table); an id past the table
/// gives a zero row (the drafter embeds the target's padding ids that way).
pub fn embedding(ids: &[u32], table: &[f32], out: &mut [f32], dim: usize) {
    let vocab = table.len() / dim;
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(dim)) {
        match (id as usize) < vocab {
            true => o.copy_from_slice(&table[id as usize * dim..][..dim]),
            false => o.fill(0.0),
        }
    }
}

/// dst[positions[i]] = src[i] for each row i of src ([m, dim]): image embeddings into the
/// placeholder rows of a prompt. Positions past dst's rows are skipped.
pub fn scatter_rows(src: &[f32], positions: &[u32], dst: &mut [f32], dim: usize) {
    let rows = dst.len() / dim;
    for (s, &p) in src.chunks_exact(dim).zip(positions) {
        if (p as usize) < rows {
            dst[p as usize * dim..][..dim].copy_from_slice(s);
        }
    }
}
