//! Safetensors weights, memory-mapped: a single `model.safetensors` or the shards named by
//! `model.safetensors.index.json`. Headers are validated when opened (offsets inside the
//! file, header length inside the file, dtypes we support), so later accesses cannot fail
//! on a corrupt file; tensor data is borrowed from the mapping without copying.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range inside the file's mapping (header already skipped).
    start: usize,
    end: usize,
}

/// A zero-copy view of one tensor inside a mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values as f32 (the CPU backend's compute type), converting bf16/f16.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// The tensors of one model directory (or an explicit list of files).
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, Entry>,
}

impl Weights {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if !single.is_file() {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} or {INDEX_FILE}"),
                ),
            ));
        }
        Self::open_files(dir, &[single])
    }

    /// Opens the given safetensors files as one set; a name in two files is an error.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut w = Weights {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for p in paths {
            w.add_file(p)?;
        }
        Ok(w)
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        let root = crate::config::read_json_object(index)?;
        let Some(serde_json::Value::Object(map)) = root.get("weight_map") else {
            return Err(Error::config(index, "missing object `weight_map`"));
        };
        let mut shard_of: BTreeMap<String, String> = BTreeMap::new();
        for (name, v) in map {
            let shard = v
                .as_str()
                .ok_or_else(|| Error::config(index, format!("weight_map[{name:?}] is not a string")))?;
            if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                return Err(Error::config(
                    index,
                    format!("shard name {shard:?} must be a plain file name"),
                ));
            }
            shard_of.insert(name.clone(), shard.to_string());
        }
        let shards: BTreeSet<&String> = shard_of.values().collect();
        let paths: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        let w = Self::open_files(dir, &paths)?;
        // The index and the shard headers must agree, or a tensor could silently come from
        // the wrong file.
        for (name, shard) in &shard_of {
            match w.tensors.get(name) {
                None => {
                    return Err(Error::BadIndex {
                        path: index.to_path_buf(),
                        tensor: name.clone(),
                        reason: format!("{shard} does not contain it"),
                    })
                }
                Some(e) if w.files[e.file].0 != dir.join(shard) => {
                    return Err(Error::BadIndex {
                        path: index.to_path_buf(),
                        tensor: name.clone(),
                        reason: format!("it is stored in {}", w.files[e.file].0.display()),
                    })
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = w.tensors.keys().find(|n| !shard_of.contains_key(*n)) {
            return Err(Error::BadIndex {
                path: index.to_path_buf(),
                tensor: extra.clone(),
                reason: "is missing from weight_map (found in a shard)".into(),
            });
        }
        Ok(w)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; like every
        // mmap-based loader we assume the file is not truncated while mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(describe(e)))?;
        let base = 8 + header_len;
        let file_idx = self.files.len();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                StDtype::BF16 => DType::BF16,
                StDtype::F16 => DType::F16,
                StDtype::F32 => DType::F32,
                other => {
                    return Err(Error::UnsupportedDtype {
                        path: path.to_path_buf(),
                        tensor: name,
                        dtype: format!("{other:?}"),
                    })
                }
            };
            let (s, e) = info.data_offsets;
            let entry = Entry {
                file: file_idx,
                dtype,
                shape: info.shape.clone(),
                start: base + s,
                end: base + e,
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(bad(format!(
                    "tensor `{name}` also appears in another file of {}",
                    self.dir.display()
                )));
            }
        }
        self.files.push((path.to_path_buf(), mmap));
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let e = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            dir: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        Ok(TensorView {
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.files[e.file].1[e.start..e.end],
        })
    }

    /// The tensor as f32 after checking that its shape is `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                dir: self.dir.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                actual: t.shape.to_vec(),
            });
        }
        Ok(t.to_f32())
    }

    /// Checks that the file set holds exactly `expected` (name → shape): reports the first
    /// missing tensor, then any shape mismatch, then every unexpected tensor.
    pub fn check_inventory(&self, expected: &BTreeMap<String, Vec<usize>>) -> Result<()> {
        for (name, shape) in expected {
            let t = self.get(name)?;
            if t.shape != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    dir: self.dir.clone(),
                    tensor: name.clone(),
                    expected: shape.clone(),
                    actual: t.shape.to_vec(),
                });
            }
        }
        let extra: Vec<&str> = self.names().filter(|n| !expected.contains_key(*n)).collect();
        if !extra.is_empty() {
            return Err(Error::UnexpectedTensors {
                dir: self.dir.clone(),
                tensors: extra.join(", "),
            });
        }
        Ok(())
    }
}

fn describe(e: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file is shorter than the 8-byte header length".into(),
        E::InvalidHeaderLength => "header length points past the end of the file".into(),
        E::MetadataIncompleteBuffer => "file size does not match the tensor offsets (truncated or padded)".into(),
        E::InvalidOffset(name) => format!("tensor `{name}` has data offsets out of range"),
        other => other.to_string(),
    }
}

/// Writes f32 / i64 tensors to a safetensors file atomically (temp file + rename), so an
/// interrupted or failed write never leaves a half-written file at `path`.
pub fn write_safetensors(path: &Path, tensors: &[(&str, OwnedTensor)]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes): (StDtype, &[u8]) = match &t.data {
                TensorData::F32(v) => (StDtype::F32, bytemuck::cast_slice(v)),
                TensorData::I64(v) => (StDtype::I64, bytemuck::cast_slice(v)),
                TensorData::BF16(v) => (StDtype::BF16, bytemuck::cast_slice(v)),
            };
            safetensors::tensor::TensorView::new(dtype, t.shape.clone(), bytes)
                .map(|v| (name.to_string(), v))
                .map_err(|e| Error::InvalidArgument(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Replaces `path` with `bytes` via a sibling temp file, so readers never see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    BF16(Vec<bf16>),
}

pub struct OwnedTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl OwnedTensor {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Self {
        OwnedTensor {
            shape,
            data: TensorData::F32(v),
        }
    }
    pub fn i64(shape: Vec<usize>, v: Vec<i64>) -> Self {
        OwnedTensor {
            shape,
            data: TensorData::I64(v),
        }
    }
}
