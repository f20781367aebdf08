//! Named f32 tensors: the master weights being trained, their gradients and the
//! optimizer's moments all use this one container, keyed by the tensor names of the files
//! they are saved to.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use massv::weights::{write_safetensors, OwnedTensor, Weights};
use massv::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    data: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor; its length must match its shape and the name must be new.
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Result<()> {
        let name = name.into();
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::InvalidArgument(format!(
                "tensor `{name}`: {} values do not fill shape {shape:?}",
                data.len()
            )));
        }
        if self.index.contains_key(&name) {
            return Err(Error::InvalidArgument(format!("tensor `{name}` given twice")));
        }
        self.index.insert(name.clone(), self.names.len());
        self.names.push(name);
        self.shapes.push(shape);
        self.data.push(data);
        Ok(())
    }

    /// Reads `names` (name → expected shape) from `w`, storing them under `rename(name)`.
    pub fn read(w: &Weights, names: &BTreeMap<String, Vec<usize>>, rename: impl Fn(&str) -> String) -> Result<Self> {
        let mut p = Params::new();
        for (name, shape) in names {
            p.insert(rename(name), shape.clone(), w.f32(name, shape)?)?;
        }
        Ok(p)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|&i| self.shapes[i].as_slice())
    }

    /// The tensor `name`; an error naming it when absent.
    pub fn get(&self, name: &str) -> Result<&[f32]> {
        self.index
            .get(name)
            .map(|&i| self.data[i].as_slice())
            .ok_or_else(|| Error::InvalidArgument(format!("no parameter `{name}`")))
    }

    /// The tensor `name` for writing, or None when absent (e.g. a frozen tensor's gradient).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        self.index.get(name).map(|&i| self.data[i].as_mut_slice())
    }

    /// (name, shape, values) in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.data)
            .map(|((n, s), d)| (n.as_str(), s.as_slice(), d.as_slice()))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Vec<f32>)> {
        self.names.iter().map(String::as_str).zip(self.data.iter_mut())
    }

    /// Zero tensors with the names and shapes of those of `self` that `keep` selects.
    pub fn zeros_like(&self, keep: impl Fn(&str) -> bool) -> Params {
        let mut p = Params::new();
        for (n, s, d) in self.iter() {
            if keep(n) {
                p.index.insert(n.to_string(), p.names.len());
                p.names.push(n.to_string());
                p.shapes.push(s.to_vec());
                p.data.push(vec![0.0; d.len()]);
            }
        }
        p
    }

    pub fn fill_zero(&mut self) {
        for d in &mut self.data {
            d.fill(0.0);
        }
    }

    /// Every value multiplied by `s`.
    pub fn scale(&mut self, s: f32) {
        for d in &mut self.data {
            for x in d.iter_mut() {
                *x *= s;
            }
        }
    }

    /// self += other, tensor by tensor (same names required).
    pub fn add(&mut self, other: &Params) -> Result<()> {
        for (n, _, d) in other.iter() {
            let dst = self
                .get_mut(n)
                .ok_or_else(|| Error::InvalidArgument(format!("no parameter `{n}` to add into")))?;
            for (a, b) in dst.iter_mut().zip(d) {
                *a += b;
            }
        }
        Ok(())
    }

    /// √(Σ x²) over all tensors, accumulated in f64.
    pub fn global_norm(&self) -> f64 {
        self.data
            .iter()
            .flat_map(|d| d.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    }

    /// The tensors whose names `keep` selects, renamed by `rename`.
    pub fn select(&self, keep: impl Fn(&str) -> bool, rename: impl Fn(&str) -> String) -> Result<Params> {
        let mut p = Params::new();
        for (n, s, d) in self.iter() {
            if keep(n) {
                p.insert(rename(n), s.to_vec(), d.to_vec())?;
            }
        }
        Ok(p)
    }

    /// Moves every tensor of `other` in, replacing same-named ones (shapes must agree).
    pub fn update_from(&mut self, other: Params) -> Result<()> {
        for ((n, s), d) in other.names.into_iter().zip(other.shapes).zip(other.data) {
            match self.index.get(&n) {
                Some(&i) if self.shapes[i] == s => self.data[i] = d,
                Some(&i) => {
                    return Err(Error::InvalidArgument(format!(
                        "tensor `{n}` has shape {s:?}, expected {:?}",
                        self.shapes[i]
                    )))
                }
                None => self.insert(n, s, d)?,
            }
        }
        Ok(())
    }

    /// Writes every tensor (f32) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let owned: Vec<(&str, OwnedTensor)> = self
            .iter()
            .map(|(n, s, d)| (n, OwnedTensor::f32(s.to_vec(), d.to_vec())))
            .collect();
        write_safetensors(path, &owned)
    }

    /// Reads every tensor of one safetensors file.
    pub fn load(path: &Path) -> Result<Params> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let w = Weights::open_files(dir, &[path.to_path_buf()])?;
        let names: BTreeMap<String, Vec<usize>> = w
            .names()
            .map(|n| Ok((n.to_string(), w.get(n)?.shape.to_vec())))
            .collect::<Result<_>>()?;
        Params::read(&w, &names, str::to_string)
    }
}
