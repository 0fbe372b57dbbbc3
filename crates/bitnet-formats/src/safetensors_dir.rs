//! Hugging Face model directories: `config.json` plus `model.safetensors` or a sharded set
//! described by `model.safetensors.index.json`. Every shard is memory-mapped; tensors are byte
//! ranges into the maps (parsed with the `safetensors` crate).

use crate::bail;
use crate::error::{FormatError, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor of a safetensors shard.
#[derive(Debug, Clone)]
pub struct HfTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

impl HfTensor {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct HfDir {
    pub dir: PathBuf,
    /// `config.json`, parsed as Python's json module does (a repeated key: the last one wins).
    pub config: serde_json::Value,
    shards: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: BTreeMap<String, HfTensor>,
}

/// Does this directory look like a Hugging Face model directory?
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

fn map_file(path: &Path) -> Result<Mmap> {
    let ctx = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| FormatError::new(e.to_string()).context(&ctx))?;
    // SAFETY: read-only map; the file is assumed not to change while open (as in every
    // mmap-based loader).
    unsafe { Mmap::map(&f) }.map_err(|e| FormatError::new(e.to_string()).context(&ctx))
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FormatError::new(e.to_string()).context(path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| FormatError::new(format!("invalid JSON: {e}")).context(path.display()))
}

impl HfDir {
    pub fn open(dir: impl AsRef<Path>) -> Result<HfDir> {
        let dir = dir.as_ref().to_path_buf();
        let config = read_json(&dir.join("config.json"))?;
        if !config.is_object() {
            bail!("{}: config.json is not a JSON object", dir.display());
        }
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.is_file() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    FormatError::new(format!(
                        "{}: no \"weight_map\" object",
                        index_path.display()
                    ))
                })?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    FormatError::new(format!(
                        "{}: weight_map[{tensor:?}] is not a string",
                        index_path.display()
                    ))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    bail!(
                        "{}: shard name {file:?} is not a plain file name",
                        index_path.display()
                    );
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            names
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".to_string()]
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };

        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (si, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let map = map_file(&path)?;
            let st = SafeTensors::deserialize(&map).map_err(|e| {
                FormatError::new(format!("not a valid safetensors file: {e}"))
                    .context(path.display())
            })?;
            let base = map.as_ptr() as usize;
            for (tname, view) in st.iter() {
                let start = view.data().as_ptr() as usize - base;
                let t = HfTensor {
                    name: tname.to_string(),
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    shard: si,
                    start,
                    end: start + view.data().len(),
                };
                if tensors.insert(tname.to_string(), t).is_some() {
                    bail!(
                        "{}: tensor {tname:?} appears in more than one shard",
                        dir.display()
                    );
                }
            }
            shards.push((path, Arc::new(map)));
        }
        Ok(HfDir {
            dir,
            config,
            shards,
            tensors,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&HfTensor> {
        self.tensors.get(name)
    }

    pub fn tensors(&self) -> impl Iterator<Item = &HfTensor> {
        self.tensors.values()
    }

    pub fn tensor_data(&self, t: &HfTensor) -> &[u8] {
        &self.shards[t.shard].1[t.start..t.end]
    }

    /// The map holding a tensor and the byte range inside it, for zero-copy views.
    pub fn tensor_map(&self, t: &HfTensor) -> (Arc<Mmap>, std::ops::Range<usize>) {
        (self.shards[t.shard].1.clone(), t.start..t.end)
    }

    /// Shard file of a tensor, for error messages.
    pub fn tensor_file(&self, t: &HfTensor) -> &Path {
        &self.shards[t.shard].0
    }

    /// Read a tensor of any float dtype as f32 values (for norms and scales).
    pub fn read_f32(&self, t: &HfTensor) -> Result<Vec<f32>> {
        let b = self.tensor_data(t);
        let n = t.n_elements();
        Ok(match t.dtype {
            Dtype::F32 => (0..n).map(|i| crate::codecs::f32_at(b, i)).collect(),
            Dtype::F16 => (0..n).map(|i| crate::codecs::f16_at(b, i)).collect(),
            Dtype::BF16 => (0..n).map(|i| crate::codecs::bf16_at(b, i)).collect(),
            other => bail!(
                "{}: tensor {:?} has dtype {other:?}, expected a float type",
                self.dir.display(),
                t.name
            ),
        })
    }

    /// Config helpers: a field, with a clear error when it has the wrong type.
    pub fn config_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.config_err(key, "a non-negative integer", v)),
        }
    }

    pub fn config_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.config_err(key, "a number", v)),
        }
    }

    pub fn config_str(&self, key: &str) -> Result<Option<&str>> {
        match self.config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.config_err(key, "a string", v)),
        }
    }

    pub fn config_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.config_err(key, "true or false", v)),
        }
    }

    fn config_err(&self, key: &str, want: &str, v: &serde_json::Value) -> FormatError {
        FormatError::new(format!(
            "{}: config.json field {key:?} should be {want}, found {v}",
            self.dir.join("config.json").display()
        ))
    }

    /// Total size of the shards in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|(_, m)| m.len() as u64).sum()
    }

    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|(p, _)| p.as_path()).collect()
    }
}

/// Per-file counts of tensors by dtype, for `bitnet info`.
pub fn dtype_counts(dir: &HfDir) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for t in dir.tensors() {
        *m.entry(format!("{:?}", t.dtype)).or_insert(0) += 1;
    }
    m
}
