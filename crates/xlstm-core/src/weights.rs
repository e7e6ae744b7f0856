//! Checkpoint loading: a Hugging Face model directory (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`). Each shard is memory-mapped, its tensors converted to the compute
//! dtype, and the map dropped before the next shard opens, so peak memory is the converted weights plus
//! one shard.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};

/// The safetensors files of a model directory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub shards: Vec<PathBuf>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "no such model directory: pass a directory holding config.json and model.safetensors, or a hub id like NX-AI/xLSTM-7b"));
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shards = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::file(&index, format!("not valid JSON ({e})")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::file(&index, "has no `weight_map` object"))?;
            let mut files: Vec<String> =
                map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(Error::file(dir, "holds neither model.safetensors nor model.safetensors.index.json"));
        };
        for s in &shards {
            if !s.is_file() {
                return Err(Error::file(s, "shard listed in model.safetensors.index.json is missing: download it again"));
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards })
    }

    /// Reads every tensor, converting floating-point ones to `dtype`, one shard at a time.
    pub fn load(&self, dtype: DType) -> Result<Weights> {
        let mut tensors = HashMap::new();
        for shard in &self.shards {
            let file = std::fs::File::open(shard).map_err(|e| Error::file(shard, e))?;
            // SAFETY: the map is read-only and dropped before this function returns; a file truncated
            // underneath us is the one hazard, and safetensors validates sizes against the header.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(shard, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                Error::file(shard, format!("not a valid safetensors file ({e}): the download may be truncated or corrupt"))
            })?;
            for (name, view) in st.tensors() {
                let t = convert(&name, view.dtype(), view.shape(), view.data(), dtype)
                    .map_err(|e| Error::file(shard, e))?;
                release_pages(&mmap, view.data());
                tensors.insert(name, t);
            }
        }
        Ok(Weights { tensors, dtype })
    }

    /// Tensor names, shapes and stored dtypes, without reading the data.
    pub fn describe(&self) -> Result<BTreeMap<String, (String, Vec<usize>)>> {
        let mut out = BTreeMap::new();
        for shard in &self.shards {
            let file = std::fs::File::open(shard).map_err(|e| Error::file(shard, e))?;
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(shard, e))?;
            let (_, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::file(shard, format!("not a valid safetensors file ({e})")))?;
            for (name, info) in meta.tensors() {
                out.insert(name, (format!("{:?}", info.dtype), info.shape.clone()));
            }
        }
        Ok(out)
    }

    pub fn bytes_on_disk(&self) -> u64 {
        self.shards.iter().filter_map(|s| s.metadata().ok()).map(|m| m.len()).sum()
    }
}

/// Drops the file pages of a tensor already converted, so a shard's mapped pages never pile up in
/// resident memory next to the converted weights (peak = converted weights + one tensor).
fn release_pages(mmap: &memmap2::Mmap, data: &[u8]) {
    #[cfg(unix)]
    {
        let off = data.as_ptr() as usize - mmap.as_ptr() as usize;
        // SAFETY: the map is read-only and file-backed: dropped pages are re-read from the file if
        // touched again, and nothing borrows this tensor's bytes any more.
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, data.len()) };
    }
}

fn convert(name: &str, st: StDtype, shape: &[usize], bytes: &[u8], dtype: DType) -> Result<HostTensor> {
    let shape = shape.to_vec();
    let data = match st {
        StDtype::F32 => {
            let v: Vec<f32> = bytes.par_chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            HostData::F32(v)
        }
        StDtype::BF16 => HostData::BF16(
            bytes.par_chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
        ),
        StDtype::F16 => HostData::F16(
            bytes.par_chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
        ),
        other => {
            return Err(Error::Weights(format!(
                "tensor `{name}` is stored as {other:?}; only float32, bfloat16 and float16 weights are supported"
            )))
        }
    };
    Ok(HostTensor { shape, data }.to_dtype(dtype))
}

/// All tensors of a checkpoint, by name, in one dtype. Models take tensors out as they build.
pub struct Weights {
    tensors: HashMap<String, HostTensor>,
    pub dtype: DType,
}

impl Weights {
    pub fn new(tensors: HashMap<String, HostTensor>, dtype: DType) -> Self {
        Weights { tensors, dtype }
    }

    /// Bytes the 2-D tensors take as matrices, each in the dtype `dtype_of` gives its name and
    /// rounded up to 256 (what a backend that packs matrices back to back needs; see
    /// `Backend::expect_matrix_bytes`: a count that falls short leaves the pool's tail unused).
    pub fn matrix_bytes(&self, dtype_of: impl Fn(&str) -> DType) -> usize {
        self.tensors.iter().filter(|(_, t)| t.shape.len() == 2).map(|(n, t)| (t.numel() * dtype_of(n).size()).div_ceil(256) * 256).sum()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes a tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            Error::Weights(format!("tensor `{name}` is missing from the checkpoint: is it complete, and does config.json belong to it?"))
        })?;
        t.expect_shape(name, shape)?;
        Ok(t)
    }

    /// Takes the first of several accepted names (e.g. HF and NX-AI native spellings).
    pub fn take_any(&mut self, names: &[&str], shape: &[usize]) -> Result<HostTensor> {
        for n in names {
            if self.contains(n) {
                return self.take(n, shape);
            }
        }
        self.take(names[0], shape)
    }

    /// Tensors never taken: a sign that the checkpoint and the config disagree.
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut left: Vec<_> = self.tensors.into_keys().collect();
        left.sort();
        Err(Error::Weights(format!(
            "{} tensor(s) in the checkpoint are not used by this config (e.g. `{}`): config.json does not match the weights",
            left.len(),
            left[0]
        )))
    }
}
