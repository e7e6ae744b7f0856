//! Random weights of any model shape, generated in place in the target dtype (the 7B shape in bf16 is
//! 13.7 GB: no f32 copy is ever made), so speed can be measured without a download.
use std::collections::HashMap;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::tensor::{DType, HostData, HostTensor};
use crate::weights::Weights;

/// How one tensor is drawn.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Uniform with this standard deviation, centred on `mean`.
    Uniform { mean: f32, std: f32 },
}

impl Init {
    /// The usual 1/√fan_in scale for a matrix with `fan_in` inputs.
    pub fn fan_in(fan_in: usize) -> Self {
        Init::Uniform { mean: 0.0, std: 1.0 / (fan_in as f32).sqrt() }
    }
    pub fn around(mean: f32, std: f32) -> Self {
        Init::Uniform { mean, std }
    }
}

pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl WeightSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        WeightSpec { name: name.into(), shape: shape.to_vec(), init }
    }
}

#[inline]
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn draw(spec: &WeightSpec, key: u64, dtype: DType) -> HostTensor {
    let n: usize = spec.shape.iter().product();
    let Init::Uniform { mean, std } = spec.init;
    let amp = std * 3f32.sqrt();
    let value = move |i: usize| {
        let u = (splitmix(key ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 40) as f32 / (1u64 << 24) as f32;
        mean + amp * (2.0 * u - 1.0)
    };
    let data = match dtype {
        DType::F32 => HostData::F32((0..n).into_par_iter().map(value).collect()),
        DType::BF16 => HostData::BF16((0..n).into_par_iter().map(|i| bf16::from_f32(value(i))).collect()),
        DType::F16 => HostData::F16((0..n).into_par_iter().map(|i| f16::from_f32(value(i))).collect()),
    };
    HostTensor { shape: spec.shape.clone(), data }
}

/// The tensors `config` names, drawn reproducibly from `seed`.
pub fn random_weights(config: &ModelConfig, dtype: DType, seed: u64) -> Result<Weights> {
    let specs = match config {
        ModelConfig::Large(c) => super::large::weight_specs(c),
        ModelConfig::Lm(c) => super::lm::weight_specs(c),
    };
    let mut tensors = HashMap::new();
    for (idx, spec) in specs.iter().enumerate() {
        let key = splitmix(seed ^ ((idx as u64 + 1) << 32));
        tensors.insert(spec.name.clone(), draw(spec, key, dtype));
    }
    Ok(Weights::new(tensors, dtype))
}
