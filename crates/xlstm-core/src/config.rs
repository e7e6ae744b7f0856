//! Model configs, read straight from a checkpoint's `config.json`, with the sizes the reference
//! implementations derive at build time computed here as methods.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lm::LmConfig;

/// Which of the two xLSTM families a config describes.
#[derive(Clone, Debug)]
pub enum ModelConfig {
    /// The xLSTM-7B architecture (Hugging Face `model_type: "xlstm"`): mLSTM blocks + SwiGLU FFN.
    Large(LargeConfig),
    /// The original block stack of the `xlstm` package (`xLSTMLMModel`): mLSTM and sLSTM blocks.
    Lm(LmConfig),
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::file(path, format!("cannot read the model config ({e}); a model directory needs a config.json"))
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not valid JSON ({e})")))?;
        Self::from_json(&value).map_err(|e| Error::file(path, e))
    }

    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| Error::Config("config.json must be a JSON object".into()))?;
        if let Some(mt) = obj.get("model_type") {
            return match mt.as_str() {
                Some("xlstm") => LargeConfig::from_json(value).map(ModelConfig::Large),
                other => Err(Error::Config(format!(
                    "unknown model_type {other:?}: this engine runs `xlstm` (xLSTM-7B architecture) and the xlstm package's xLSTMLMModel configs"
                ))),
            };
        }
        if obj.contains_key("mlstm_block") || obj.contains_key("slstm_block") {
            return LmConfig::from_json(value).map(ModelConfig::Lm);
        }
        Err(Error::Config(
            "neither an xlstm-large config (model_type \"xlstm\") nor an xlstm-lm config (mlstm_block/slstm_block): cannot tell which model this is".into(),
        ))
    }

    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Large(_) => "xlstm-large",
            ModelConfig::Lm(_) => "xlstm-lm",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Large(c) => c.vocab_size,
            ModelConfig::Lm(c) => c.vocab_size,
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Large(c) if c.force_bos_token_insert => c.bos_token_id,
            _ => None,
        }
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Large(c) => c.eos_token_id,
            ModelConfig::Lm(_) => None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ModelConfig::Large(c) => serde_json::to_value(c).expect("config serialises"),
            ModelConfig::Lm(c) => c.to_json(),
        }
    }
}

pub(crate) fn round_up(x: usize, multiple: usize) -> usize {
    x.div_ceil(multiple) * multiple
}

/// Rejects keys that neither this family nor Hugging Face's generic config knows, so a typo or a
/// config from another architecture is reported instead of silently ignored.
pub(crate) fn check_known_fields(value: &serde_json::Value, known: &[&str], family: &str) -> Result<()> {
    const HF_GENERIC: &[&str] = &[
        "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
        "model_type", "use_cache", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        "return_dict", "output_hidden_states", "output_attentions", "torchscript", "is_encoder_decoder",
        "is_decoder", "add_cross_attention", "tokenizer_class", "prefix", "task_specific_params",
        "problem_type", "id2label", "label2id", "max_length", "min_length", "do_sample", "num_beams",
        "temperature", "top_k", "top_p", "repetition_penalty", "chunk_size_feed_forward", "finetuning_task",
        "initializer_range", "max_position_embeddings",
    ];
    if let Some(obj) = value.as_object() {
        for key in obj.keys() {
            if !known.contains(&key.as_str()) && !HF_GENERIC.contains(&key.as_str()) {
                return Err(Error::Config(format!(
                    "unknown field `{key}` for an {family} config: remove it or check that the checkpoint is an {family} model"
                )));
            }
        }
    }
    Ok(())
}

fn default_true() -> bool {
    true
}
fn default_chunk() -> usize {
    64
}
fn default_64() -> usize {
    64
}
fn default_eps() -> f32 {
    1e-6
}
fn default_weight_mode() -> String {
    "single".into()
}

/// Hugging Face `xLSTMConfig` (transformers 5.x), the xLSTM-7B architecture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LargeConfig {
    pub vocab_size: usize,
    #[serde(alias = "embedding_dim")]
    pub hidden_size: usize,
    #[serde(alias = "num_blocks")]
    pub num_hidden_layers: usize,
    pub num_heads: usize,
    #[serde(default = "half_factor")]
    pub qk_dim_factor: f64,
    #[serde(default = "one_factor")]
    pub v_dim_factor: f64,
    #[serde(default = "ffn_factor")]
    pub ffn_proj_factor: f64,
    #[serde(default = "default_64")]
    pub ffn_round_up_to_multiple_of: usize,
    #[serde(default = "default_64")]
    pub mlstm_round_up_to_multiple_of: usize,
    #[serde(default = "soft_cap_gate")]
    pub gate_soft_cap: f32,
    #[serde(default = "soft_cap_logit")]
    pub output_logit_soft_cap: f32,
    #[serde(default = "default_eps")]
    pub norm_eps: f32,
    /// The mLSTM kernel's eps (the denominator guard).
    #[serde(default = "default_eps")]
    pub eps: f32,
    #[serde(default)]
    pub use_bias: bool,
    #[serde(default = "default_true")]
    pub add_out_norm: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_weight_mode")]
    pub weight_mode: String,
    #[serde(default = "default_chunk")]
    pub chunk_size: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_true")]
    pub force_bos_token_insert: bool,
}

fn half_factor() -> f64 {
    0.5
}
fn one_factor() -> f64 {
    1.0
}
fn ffn_factor() -> f64 {
    2.667
}
fn soft_cap_gate() -> f32 {
    15.0
}
fn soft_cap_logit() -> f32 {
    30.0
}

/// Fields of the Hugging Face config that steer PyTorch kernels or training only; accepted and unused.
const LARGE_FIELDS: &[&str] = &[
    "vocab_size", "hidden_size", "embedding_dim", "num_hidden_layers", "num_blocks", "num_heads",
    "qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "ffn_round_up_to_multiple_of",
    "mlstm_round_up_to_multiple_of", "gate_soft_cap", "output_logit_soft_cap", "norm_eps", "eps", "use_bias",
    "add_out_norm", "tie_word_embeddings", "weight_mode", "chunk_size", "bos_token_id", "eos_token_id",
    "pad_token_id", "force_bos_token_insert", "norm_reduction_force_float32", "autocast_kernel_dtype",
    "inference_state_dtype", "chunkwise_kernel", "sequence_kernel", "step_kernel", "mode",
    "max_inference_chunksize", "return_last_states", "use_cache", "model_type",
];

impl LargeConfig {
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        check_known_fields(value, LARGE_FIELDS, "xlstm-large")?;
        // HF configs carry each size under two names (hidden_size = embedding_dim, num_hidden_layers =
        // num_blocks); keep one, after checking that they agree.
        let mut value = value.clone();
        let obj = value.as_object_mut().expect("checked to be an object");
        for (keep, alias) in [("hidden_size", "embedding_dim"), ("num_hidden_layers", "num_blocks")] {
            if let (Some(a), Some(b)) = (obj.get(keep), obj.get(alias)) {
                if a != b {
                    return Err(Error::Config(format!("`{keep}` ({a}) and `{alias}` ({b}) disagree")));
                }
                obj.remove(alias);
            }
        }
        let c: LargeConfig =
            serde_json::from_value(value).map_err(|e| Error::Config(format!("xlstm-large config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(what));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 || self.num_heads == 0 {
            return bad("vocab_size, hidden_size, num_blocks and num_heads must all be positive".into());
        }
        if self.qk_dim() % self.num_heads != 0 || self.v_dim() % self.num_heads != 0 {
            return bad(format!(
                "qk_dim {} and v_dim {} must divide evenly into num_heads {}",
                self.qk_dim(),
                self.v_dim(),
                self.num_heads
            ));
        }
        if self.chunk_size == 0 {
            return bad("chunk_size must be positive".into());
        }
        if self.weight_mode != "single" && self.weight_mode != "fused" {
            return bad(format!("weight_mode `{}` is unknown: use \"single\" or \"fused\"", self.weight_mode));
        }
        if self.use_bias {
            return bad("use_bias = true is not supported (xLSTM-7B has no projection biases)".into());
        }
        Ok(())
    }

    /// A config of the xLSTM-7B architecture at any size (used for random-weight models).
    pub fn with_shape(layers: usize, hidden: usize, heads: usize, vocab: usize) -> Self {
        LargeConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_heads: heads,
            qk_dim_factor: 0.5,
            v_dim_factor: 1.0,
            ffn_proj_factor: 2.667,
            ffn_round_up_to_multiple_of: 64,
            mlstm_round_up_to_multiple_of: 64,
            gate_soft_cap: 15.0,
            output_logit_soft_cap: 30.0,
            norm_eps: 1e-6,
            eps: 1e-6,
            use_bias: false,
            add_out_norm: true,
            tie_word_embeddings: false,
            weight_mode: "single".into(),
            chunk_size: 64,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            force_bos_token_insert: false,
        }
    }

    /// The published NX-AI/xLSTM-7b shape.
    pub fn xlstm_7b() -> Self {
        LargeConfig {
            bos_token_id: Some(0),
            eos_token_id: Some(2),
            pad_token_id: Some(1),
            force_bos_token_insert: true,
            ..Self::with_shape(32, 4096, 8, 50304)
        }
    }

    pub fn qk_dim(&self) -> usize {
        round_up((self.hidden_size as f64 * self.qk_dim_factor) as usize, self.mlstm_round_up_to_multiple_of)
    }
    pub fn v_dim(&self) -> usize {
        round_up((self.hidden_size as f64 * self.v_dim_factor) as usize, self.mlstm_round_up_to_multiple_of)
    }
    pub fn qk_head_dim(&self) -> usize {
        self.qk_dim() / self.num_heads
    }
    pub fn v_head_dim(&self) -> usize {
        self.v_dim() / self.num_heads
    }
    pub fn ffn_dim(&self) -> usize {
        round_up((self.hidden_size as f64 * self.ffn_proj_factor) as usize, self.ffn_round_up_to_multiple_of)
    }
    pub fn num_params(&self) -> usize {
        let (d, qk, v, f, nh) = (self.hidden_size, self.qk_dim(), self.v_dim(), self.ffn_dim(), self.num_heads);
        let block = 2 * d + 2 * qk * d + 2 * v * d + 2 * (nh * d + nh) + v + d * v + 3 * f * d;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_hidden_layers * block + d + head
    }
}
