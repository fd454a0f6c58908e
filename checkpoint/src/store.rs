//! A checkpoint directory: its safetensors files memory-mapped, every tensor's header entry
//! indexed by name, data read in place. The index file `model.safetensors.index.json` names the
//! shards when present; otherwise every `*.safetensors` file of the directory is read.

use memmap2::Mmap;
use moe_runner_core::{MoeError, Result};
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (after the length word and the header).
    data_start: usize,
}

pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

/// One tensor of a checkpoint, its bytes still in the mapped file.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    pub file: &'a Path,
}

fn err(path: &Path, msg: impl Into<String>) -> MoeError {
    MoeError::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

impl Checkpoint {
    /// Maps every shard of `dir` and reads their headers; a missing, truncated or corrupt file
    /// is an error naming it.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| err(&index, e.to_string()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| err(&index, format!("not JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| err(&index, "no `weight_map` object"))?;
            let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| err(dir, e.to_string()))?;
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(err(dir, "no safetensors files"));
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| err(&path, e.to_string()))?;
            // SAFETY: the checkpoint files are read-only inputs; modifying them while mapped is
            // outside this API's contract (as for every mmap-based loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| err(&path, e.to_string()))?;
            let (n, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| err(&path, format!("not a valid safetensors file: {e}")))?;
            let i = shards.len();
            for (name, info) in meta.tensors() {
                if let Some((j, _)) = tensors.insert(name.clone(), (i, info.clone())) {
                    return Err(err(
                        &path,
                        format!("tensor `{name}` is also in {}", shards_path(&shards, j)),
                    ));
                }
            }
            shards.push(Shard {
                path,
                map,
                data_start: 8 + n,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, or an error naming it.
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let (name, (i, info)) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| err(&self.dir, format!("tensor `{name}` is missing")))?;
        let s = &self.shards[*i];
        let (a, b) = info.data_offsets;
        Ok(TensorRef {
            name,
            dtype: info.dtype,
            shape: &info.shape,
            // In bounds: `read_metadata` checked the offsets against the file's length.
            bytes: &s.map[s.data_start + a..s.data_start + b],
            file: &s.path,
        })
    }

    /// Bytes of every shard, for load-rate figures.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }
}

fn shards_path(shards: &[Shard], i: usize) -> String {
    shards[i].path.display().to_string()
}

impl TensorRef<'_> {
    /// Checks the shape and the dtype, naming the tensor and its file when they differ.
    pub fn expect(&self, shape: &[usize], dtypes: &[Dtype]) -> Result<()> {
        if self.shape != shape {
            return Err(err(
                self.file,
                format!(
                    "tensor `{}` has shape {:?}, expected {shape:?}",
                    self.name, self.shape
                ),
            ));
        }
        if !dtypes.contains(&self.dtype) {
            return Err(err(
                self.file,
                format!(
                    "tensor `{}` is {:?}, expected one of {dtypes:?}",
                    self.name, self.dtype
                ),
            ));
        }
        Ok(())
    }

    /// Values as f32 (BF16, F16 or F32 tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(err(
                    self.file,
                    format!("tensor `{}` is {other:?}, expected a float type", self.name),
                ))
            }
        })
    }
}
