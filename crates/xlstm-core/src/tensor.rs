//! Host-side tensors: what checkpoints hold before a backend takes them.
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Element types a checkpoint may store and a backend may keep weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" | "half" => Ok(DType::F16),
            other => Err(Error::Input(format!("unknown dtype `{other}`: use f32, bf16 or f16"))),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug)]
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A dense row-major tensor in host memory.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data: HostData::F32(data) }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts in parallel; a no-op when the dtype already matches.
    pub fn to_dtype(self, dtype: DType) -> HostTensor {
        if self.dtype() == dtype {
            return self;
        }
        let shape = self.shape;
        let data = match dtype {
            DType::F32 => HostData::F32(to_f32_vec(&self.data)),
            DType::BF16 => {
                HostData::BF16(to_f32_vec(&self.data).par_iter().map(|&x| bf16::from_f32(x)).collect())
            }
            DType::F16 => {
                HostData::F16(to_f32_vec(&self.data).par_iter().map(|&x| f16::from_f32(x)).collect())
            }
        };
        HostTensor { shape, data }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        to_f32_vec(&self.data)
    }

    /// Rows `start..end` of a tensor seen as [shape[0], rest].
    pub fn rows(&self, start: usize, end: usize) -> HostTensor {
        let width: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        let (a, b) = (start * width, end * width);
        let data = match &self.data {
            HostData::F32(v) => HostData::F32(v[a..b].to_vec()),
            HostData::BF16(v) => HostData::BF16(v[a..b].to_vec()),
            HostData::F16(v) => HostData::F16(v[a..b].to_vec()),
        };
        HostTensor { shape, data }
    }

    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::Weights(format!(
                "tensor `{name}` has shape {:?}, the config implies {:?}: the checkpoint does not match its config.json",
                self.shape, shape
            )));
        }
        Ok(())
    }
}

fn to_f32_vec(data: &HostData) -> Vec<f32> {
    match data {
        HostData::F32(v) => v.clone(),
        HostData::BF16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
        HostData::F16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
    }
}
