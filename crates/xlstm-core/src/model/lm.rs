//! xlstm-lm: the original xLSTM block stack (`xlstm` package `xLSTMLMModel`). Placeholder until the
//! family lands (issue 3): configs are recognised, loading reports that the family is not yet supported.
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::random::WeightSpec;
use crate::model::{LogitRows, Network, Rows};
use crate::state::LayerState;
use crate::weights::Weights;

#[derive(Clone, Debug)]
pub struct LmConfig {
    pub vocab_size: usize,
    raw: serde_json::Value,
}

impl LmConfig {
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let vocab_size = value.get("vocab_size").and_then(|v| v.as_u64()).ok_or_else(|| Error::Config("xlstm-lm config: missing vocab_size".into()))? as usize;
        Ok(LmConfig { vocab_size, raw: value.clone() })
    }
    pub fn to_json(&self) -> serde_json::Value {
        self.raw.clone()
    }
    pub fn fingerprint(&self) -> String {
        format!("xlstm-lm:V{}", self.vocab_size)
    }
}

pub struct LmNet<B: Backend>(std::marker::PhantomData<B>);

impl<B: Backend> LmNet<B> {
    pub fn new(_b: &B, _c: &LmConfig, _w: Weights) -> Result<Self> {
        Err(Error::Config("xlstm-lm models are not supported yet".into()))
    }
}

impl<B: Backend> Network<B> for LmNet<B> {
    fn new_state(&self, _: &B, _: usize) -> Result<Vec<LayerState<B::Buf>>> {
        unreachable!("LmNet cannot be constructed yet")
    }
    fn forward(&mut self, _: &B, _: &[u32], _: Rows, _: &mut [LayerState<B::Buf>], _: LogitRows) -> Result<Vec<f32>> {
        unreachable!("LmNet cannot be constructed yet")
    }
    fn weight_bytes_per_token(&self, _: &B) -> usize {
        0
    }
    fn max_segment(&self) -> usize {
        512
    }
}

pub fn weight_specs(_c: &LmConfig) -> Vec<WeightSpec> {
    Vec::new()
}
