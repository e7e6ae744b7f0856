//! xlstm-lm: the original xLSTM block stack of Beck et al. 2024 ("xLSTM: Extended Long Short-Term
//! Memory", arXiv:2405.04517), as the NX-AI `xlstm` package (2.0.6) builds it in `xLSTMLMModel`.
//!
//! x = Embedding(ids); per block (type from `slstm_at`):
//!   mLSTM block: x += mLSTMLayer(LN(x))
//!   sLSTM block: x += sLSTMLayer(LN(x)); x += GatedFFN(LN(x))
//! logits = lm_head(LN_post(x)). Every LayerNorm / group norm scales by (1 + w) (folded at load).
//! The exact forward, weight layouts and config derivations are in /work/notes/xlstm_lm_spec.md
//! (section numbers below refer to it).
//!
//! mLSTM layer (§4): [x_m | z] = W_up u; c = SiLU(conv(x_m)); q, k = Hw(c), v = Hw(x_m) (block-diagonal);
//! ĩ, f̃ = W [q; k; v] + b; h̃ = mLSTM cell (eps 1e-6, m starts at 0); h = (GN(h̃) + skip ⊙ c) ⊙ SiLU(z);
//! y = W_down h.
//! sLSTM layer (§5): c = SiLU(conv(u)); cell gates i ← Hw_fgate(c), f ← Hw_igate(c) (the module names are
//! swapped relative to the gates they feed), z ← Hw_zgate(u), o ← Hw_ogate(u); recurrent sLSTM cell;
//! y = GN(h). Gated FFN: W_down (act(W_gate u) ⊙ W_up u), exact-erf GELU by default.
//!
//! Recurrent state per block: mLSTM (C, n, m) + the last K−1 conv inputs x_m; sLSTM (c, n, m, h) + the
//! last K−1 conv inputs u. Prompt segments and single steps carry the same state, so any split of a
//! prompt gives the same result.
use serde_json::{json, Map, Value};

use crate::backend::{Activation, Backend, ConvDims, HeadwiseDims, MlstmDims, SlstmGates, SlstmState};
use crate::config::check_known_fields;
use crate::error::{Error, Result};
use crate::model::random::{Init, WeightSpec};
use crate::model::{ActivationCache, GrowBuf, LogitRows, Network, Rows};
use crate::state::{mlstm_zeros, ConvState, LayerState};
use crate::tensor::{DType, HostTensor};
use crate::weights::Weights;

/// LayerNorm eps (`xlstm_norm`, `ffn_norm`, `post_blocks_norm`), §3.1.
const LN_EPS: f32 = 1e-5;
/// Per-head group-norm eps (mLSTM `outnorm`, sLSTM `group_norm`), §3.2.
const GN_EPS: f32 = 1e-5;
/// mLSTM cell denominator eps, §4.2–4.3.
const MLSTM_EPS: f32 = 1e-6;

// =====================================================================================================
// Config
// =====================================================================================================

/// `xLSTMLMModelConfig`, with the build-time fields the package derives recomputed (§1).
#[derive(Clone, Debug, PartialEq)]
pub struct LmConfig {
    pub vocab_size: usize,
    pub embedding_dim: usize,
    pub num_blocks: usize,
    /// Size of the reference's causal-mask buffer (−1: unset). Not a limit here.
    pub context_length: i64,
    /// Indices of the sLSTM blocks, sorted (resolved: `"all"`, or a null `mlstm_block`, is every index).
    pub slstm_at: Vec<usize>,
    pub add_post_blocks_norm: bool,
    pub tie_weights: bool,
    /// Biases of the mLSTM layer's proj_up / proj_down / q / k / v.
    pub bias: bool,
    pub mlstm: Option<LmMlstmConfig>,
    pub slstm: Option<LmSlstmConfig>,
}

/// `mLSTMLayerConfig` (§1.3).
#[derive(Clone, Debug, PartialEq)]
pub struct LmMlstmConfig {
    pub proj_factor: f64,
    pub round_proj_up_dim_up: bool,
    pub round_proj_up_to_multiple_of: usize,
    pub conv1d_kernel_size: usize,
    pub qkv_proj_blocksize: usize,
    /// Heads of the mLSTM cell.
    pub num_heads: usize,
}

/// `sLSTMLayerConfig` (§1.4) and the block's feed-forward (§1.5).
#[derive(Clone, Debug, PartialEq)]
pub struct LmSlstmConfig {
    pub num_heads: usize,
    /// 0: no conv (the i/f gates see the raw normed input).
    pub conv1d_kernel_size: usize,
    pub group_norm_weight: bool,
    pub backend: String,
    pub feedforward: Option<LmFeedForwardConfig>,
}

/// `FeedForwardConfig` of the sLSTM block (§1.5).
#[derive(Clone, Debug, PartialEq)]
pub struct LmFeedForwardConfig {
    pub proj_factor: f64,
    pub round_proj_up_dim_up: bool,
    pub round_proj_up_to_multiple_of: usize,
    pub act_fn: String,
    pub bias: bool,
}

/// `UpProjConfigMixin._set_proj_up_dim`: `R(factor·dim / multiple)·multiple`, R = ceil or floor, in f64 (§1.2).
pub fn proj_up_dim(factor: f64, dim: usize, multiple: usize, round_up: bool) -> usize {
    let r = factor * dim as f64 / multiple as f64;
    let r = if round_up { r.ceil() } else { r.floor() };
    (r.max(0.0) as usize) * multiple
}

impl LmMlstmConfig {
    /// I: the inner (up-projected) width.
    pub fn inner_dim(&self, embedding_dim: usize) -> usize {
        proj_up_dim(self.proj_factor, embedding_dim, self.round_proj_up_to_multiple_of, self.round_proj_up_dim_up)
    }
    /// Number of blocks of the block-diagonal q/k/v projections.
    pub fn qkv_blocks(&self, embedding_dim: usize) -> usize {
        self.inner_dim(embedding_dim) / self.qkv_proj_blocksize
    }
}

impl LmFeedForwardConfig {
    /// F: the feed-forward's hidden width.
    pub fn dim(&self, embedding_dim: usize) -> usize {
        proj_up_dim(self.proj_factor, embedding_dim, self.round_proj_up_to_multiple_of, self.round_proj_up_dim_up)
    }
    pub fn activation(&self) -> Result<Activation> {
        Ok(match self.act_fn.as_str() {
            "gelu" => Activation::Gelu,
            "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            "relu^2" => Activation::ReluSquared,
            "sigmoid" => Activation::Sigmoid,
            "selu" => Activation::Selu,
            other => {
                return Err(Error::Config(format!(
                    "xlstm-lm config: slstm_block.feedforward.act_fn `{other}` is unknown (known: gelu, swish, relu, relu^2, sigmoid, selu)"
                )))
            }
        })
    }
}

const TOP_FIELDS: &[&str] = &[
    "mlstm_block", "slstm_block", "context_length", "num_blocks", "embedding_dim", "add_post_blocks_norm", "bias",
    "dropout", "slstm_at", "_block_map", "vocab_size", "tie_weights", "weight_decay_on_embedding",
    "add_embedding_dropout",
];
const BLOCK_FIELDS_M: &[&str] = &["mlstm", "_num_blocks", "_block_idx"];
const BLOCK_FIELDS_S: &[&str] = &["slstm", "feedforward", "_num_blocks", "_block_idx"];
const MLSTM_FIELDS: &[&str] = &[
    "proj_factor", "round_proj_up_dim_up", "round_proj_up_to_multiple_of", "_proj_up_dim", "conv1d_kernel_size",
    "qkv_proj_blocksize", "num_heads", "embedding_dim", "bias", "dropout", "context_length", "_num_blocks",
    "_inner_embedding_dim",
];
const SLSTM_FIELDS: &[&str] = &[
    "hidden_size", "num_heads", "num_states", "backend", "function", "bias_init", "recurrent_weight_init",
    "_block_idx", "_num_blocks", "num_gates", "gradient_recurrent_cut", "gradient_recurrent_clipval",
    "forward_clipval", "batch_size", "input_shape", "internal_input_shape", "output_shape", "constants", "dtype",
    "dtype_b", "dtype_r", "dtype_w", "dtype_g", "dtype_s", "dtype_a", "enable_automatic_mixed_precision",
    "initial_val", "embedding_dim", "conv1d_kernel_size", "group_norm_weight", "dropout",
];
const FFN_FIELDS: &[&str] = &[
    "proj_factor", "round_proj_up_dim_up", "round_proj_up_to_multiple_of", "_proj_up_dim", "act_fn",
    "embedding_dim", "dropout", "bias", "ff_type", "_num_blocks",
];

/// A JSON object of the config tree, with its dotted path for error messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> Result<Self> {
        let map = v.as_object().ok_or_else(|| cfg_err(format!("`{path}` must be a JSON object, got {v}")))?;
        Ok(Obj { map, path: path.to_string() })
    }
    fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }
    fn check_known(&self, known: &[&str]) -> Result<()> {
        for k in self.map.keys() {
            if !known.contains(&k.as_str()) {
                return Err(cfg_err(format!(
                    "unknown field `{}`: remove it, or check that the checkpoint is an xlstm package xLSTMLMModel",
                    self.key(k)
                )));
            }
        }
        Ok(())
    }
    /// A present, non-null value.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }
    fn int(&self, k: &str, default: Option<i64>) -> Result<i64> {
        match self.get(k) {
            None => default.ok_or_else(|| cfg_err(format!("missing field `{}` (an integer)", self.key(k)))),
            Some(v) => v.as_i64().ok_or_else(|| cfg_err(format!("`{}` must be an integer, got {v}", self.key(k)))),
        }
    }
    fn positive(&self, k: &str, default: Option<i64>) -> Result<usize> {
        let v = self.int(k, default)?;
        if v <= 0 {
            return Err(cfg_err(format!("`{}` must be positive, got {v}", self.key(k))));
        }
        Ok(v as usize)
    }
    fn float(&self, k: &str, default: f64) -> Result<f64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| cfg_err(format!("`{}` must be a number, got {v}", self.key(k)))),
        }
    }
    fn boolean(&self, k: &str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| cfg_err(format!("`{}` must be true or false, got {v}", self.key(k)))),
        }
    }
    fn string(&self, k: &str, default: &str) -> Result<String> {
        match self.get(k) {
            None => Ok(default.to_string()),
            Some(v) => v.as_str().map(str::to_owned).ok_or_else(|| cfg_err(format!("`{}` must be a string, got {v}", self.key(k)))),
        }
    }
    fn child(&self, k: &str) -> Result<Option<Obj<'a>>> {
        self.get(k).map(|v| Obj::new(v, &self.key(k))).transpose()
    }
}

fn cfg_err(what: String) -> Error {
    Error::Config(format!("xlstm-lm config: {what}"))
}

impl LmConfig {
    /// Parses the package's `dataclasses.asdict(xLSTMLMModelConfig)` tree. Fields the package gives a
    /// default take that default; `vocab_size`, `embedding_dim` and `num_blocks` are required. Unknown
    /// fields (at any level) are errors. Derived fields in the file (`_block_map`, `_proj_up_dim`,
    /// `_inner_embedding_dim`, nested `embedding_dim`/`hidden_size`/`context_length`/`bias`) are ignored
    /// and recomputed, as the package does at build time.
    pub fn from_json(value: &Value) -> Result<Self> {
        check_known_fields(value, TOP_FIELDS, "xlstm-lm")?;
        let top = Obj::new(value, "")?;
        let vocab_size = top.positive("vocab_size", None)?;
        let embedding_dim = top.positive("embedding_dim", None)?;
        let num_blocks = top.positive("num_blocks", None)?;
        let context_length = top.int("context_length", Some(-1))?;
        let bias = top.boolean("bias", false)?;
        let add_post_blocks_norm = top.boolean("add_post_blocks_norm", true)?;
        let tie_weights = top.boolean("tie_weights", false)?;
        for k in ["weight_decay_on_embedding", "add_embedding_dropout"] {
            top.boolean(k, false)?;
        }
        top.float("dropout", 0.0)?;

        let mlstm = match top.child("mlstm_block")? {
            None => None,
            Some(b) => {
                b.check_known(BLOCK_FIELDS_M)?;
                let m = b.child("mlstm")?.ok_or_else(|| cfg_err("missing field `mlstm_block.mlstm`".into()))?;
                m.check_known(MLSTM_FIELDS)?;
                Some(LmMlstmConfig {
                    proj_factor: m.float("proj_factor", 2.0)?,
                    round_proj_up_dim_up: m.boolean("round_proj_up_dim_up", true)?,
                    round_proj_up_to_multiple_of: m.positive("round_proj_up_to_multiple_of", Some(64))?,
                    conv1d_kernel_size: m.int("conv1d_kernel_size", Some(4))?.max(0) as usize,
                    qkv_proj_blocksize: m.positive("qkv_proj_blocksize", Some(4))?,
                    num_heads: m.positive("num_heads", Some(4))?,
                })
            }
        };
        let slstm = match top.child("slstm_block")? {
            None => None,
            Some(b) => {
                b.check_known(BLOCK_FIELDS_S)?;
                let s = b.child("slstm")?.ok_or_else(|| cfg_err("missing field `slstm_block.slstm`".into()))?;
                s.check_known(SLSTM_FIELDS)?;
                for (k, want) in [("num_gates", 4), ("num_states", 4)] {
                    let v = s.int(k, Some(want))?;
                    if v != want {
                        return Err(cfg_err(format!("`{}` = {v} is not supported (the sLSTM cell has {want})", s.key(k))));
                    }
                }
                let function = s.string("function", "slstm")?;
                if function != "slstm" {
                    return Err(cfg_err(format!("`{}` = \"{function}\" is not supported: only \"slstm\"", s.key("function"))));
                }
                let initial_val = s.float("initial_val", 0.0)?;
                if initial_val != 0.0 {
                    return Err(cfg_err(format!("`{}` = {initial_val} is not supported: sLSTM states start at 0", s.key("initial_val"))));
                }
                if let Some(v) = s.get("forward_clipval") {
                    return Err(cfg_err(format!("`{}` = {v} is not supported (only null)", s.key("forward_clipval"))));
                }
                let feedforward = match b.child("feedforward")? {
                    None => None,
                    Some(f) => {
                        f.check_known(FFN_FIELDS)?;
                        let ff_type = f.string("ff_type", "ffn_gated")?;
                        if ff_type != "ffn_gated" {
                            return Err(cfg_err(format!("`{}` = \"{ff_type}\" is unknown: only \"ffn_gated\"", f.key("ff_type"))));
                        }
                        f.float("dropout", 0.0)?;
                        Some(LmFeedForwardConfig {
                            proj_factor: f.float("proj_factor", 1.3)?,
                            round_proj_up_dim_up: f.boolean("round_proj_up_dim_up", true)?,
                            round_proj_up_to_multiple_of: f.positive("round_proj_up_to_multiple_of", Some(64))?,
                            act_fn: f.string("act_fn", "gelu")?,
                            bias: f.boolean("bias", false)?,
                        })
                    }
                };
                Some(LmSlstmConfig {
                    // The package turns num_heads ≤ 0 into 1.
                    num_heads: s.int("num_heads", Some(4))?.max(1) as usize,
                    conv1d_kernel_size: s.int("conv1d_kernel_size", Some(4))?.max(0) as usize,
                    group_norm_weight: s.boolean("group_norm_weight", true)?,
                    backend: s.string("backend", "cuda")?,
                    feedforward,
                })
            }
        };
        if mlstm.is_none() && slstm.is_none() {
            return Err(cfg_err("both `mlstm_block` and `slstm_block` are null: at least one block type is needed".into()));
        }
        let slstm_at: Vec<usize> = if mlstm.is_none() {
            (0..num_blocks).collect()
        } else {
            match top.get("slstm_at") {
                None => Vec::new(),
                Some(Value::String(s)) if s == "all" => (0..num_blocks).collect(),
                Some(Value::Array(a)) => {
                    let mut v = Vec::with_capacity(a.len());
                    for x in a {
                        let i = x.as_u64().ok_or_else(|| cfg_err(format!("`slstm_at` must list block indices, got {x}")))?;
                        v.push(i as usize);
                    }
                    v
                }
                Some(other) => return Err(cfg_err(format!("`slstm_at` must be a list of block indices or \"all\", got {other}"))),
            }
        };
        let c = LmConfig {
            vocab_size,
            embedding_dim,
            num_blocks,
            context_length,
            slstm_at: normalise(slstm_at),
            add_post_blocks_norm,
            tie_weights,
            bias,
            mlstm,
            slstm,
        };
        c.validate()?;
        Ok(c)
    }

    /// The package's default block configs at any size (used for random-weight models): mLSTM
    /// (proj_factor 2, conv 4, qkv blocks of 4, `heads` heads), sLSTM (`heads` heads, conv 4, vanilla
    /// layout) with a GELU gated FFN (proj_factor 1.3), post-blocks norm, untied head.
    pub fn with_shape(layers: usize, dim: usize, heads: usize, vocab: usize, slstm_at: &[usize], context_length: usize) -> Result<Self> {
        let c = LmConfig {
            vocab_size: vocab,
            embedding_dim: dim,
            num_blocks: layers,
            context_length: context_length as i64,
            slstm_at: normalise(slstm_at.to_vec()),
            add_post_blocks_norm: true,
            tie_weights: false,
            bias: false,
            mlstm: Some(LmMlstmConfig {
                proj_factor: 2.0,
                round_proj_up_dim_up: true,
                round_proj_up_to_multiple_of: 64,
                conv1d_kernel_size: 4,
                qkv_proj_blocksize: 4,
                num_heads: heads,
            }),
            slstm: Some(LmSlstmConfig {
                num_heads: heads,
                conv1d_kernel_size: 4,
                group_norm_weight: true,
                backend: "vanilla".into(),
                feedforward: Some(LmFeedForwardConfig {
                    proj_factor: 1.3,
                    round_proj_up_dim_up: true,
                    round_proj_up_to_multiple_of: 64,
                    act_fn: "gelu".into(),
                    bias: false,
                }),
            }),
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let d = self.embedding_dim;
        if self.vocab_size == 0 || d == 0 || self.num_blocks == 0 {
            return Err(cfg_err("vocab_size, embedding_dim and num_blocks must all be positive".into()));
        }
        if let Some(&bad) = self.slstm_at.iter().find(|&&i| i >= self.num_blocks) {
            return Err(cfg_err(format!("slstm_at lists block {bad}, but there are only {} blocks (0..{})", self.num_blocks, self.num_blocks - 1)));
        }
        if self.has_slstm() && self.slstm.is_none() {
            return Err(cfg_err(format!("slstm_at {:?} names sLSTM blocks but `slstm_block` is null", self.slstm_at)));
        }
        if self.has_mlstm() && self.mlstm.is_none() {
            return Err(cfg_err("some blocks are mLSTM blocks but `mlstm_block` is null".into()));
        }
        if let (true, Some(m)) = (self.has_mlstm(), &self.mlstm) {
            let inner = m.inner_dim(d);
            if m.proj_factor.is_nan() || m.proj_factor <= 0.0 || inner == 0 {
                return Err(cfg_err(format!("mlstm_block.mlstm.proj_factor {} gives an empty inner dimension", m.proj_factor)));
            }
            if m.conv1d_kernel_size == 0 {
                return Err(cfg_err("mlstm_block.mlstm.conv1d_kernel_size 0 is not supported (the mLSTM layer needs its conv)".into()));
            }
            if inner % m.num_heads != 0 {
                return Err(cfg_err(format!("the mLSTM inner dimension {inner} does not split into num_heads {}", m.num_heads)));
            }
            if inner % m.qkv_proj_blocksize != 0 {
                return Err(cfg_err(format!("the mLSTM inner dimension {inner} is not a multiple of qkv_proj_blocksize {}", m.qkv_proj_blocksize)));
            }
        }
        if let (true, Some(s)) = (self.has_slstm(), &self.slstm) {
            if s.backend != "vanilla" && s.backend != "cuda" {
                return Err(cfg_err(format!(
                    "slstm_block.slstm.backend \"{}\" is unknown: checkpoints of the \"vanilla\" and \"cuda\" sLSTM backends can be read",
                    s.backend
                )));
            }
            if d % s.num_heads != 0 {
                return Err(cfg_err(format!("embedding_dim {d} does not split into the sLSTM's num_heads {}", s.num_heads)));
            }
            if let Some(f) = &s.feedforward {
                f.activation()?;
                if f.proj_factor.is_nan() || f.proj_factor <= 0.0 || f.dim(d) == 0 {
                    return Err(cfg_err(format!("slstm_block.feedforward.proj_factor {} gives an empty feed-forward", f.proj_factor)));
                }
            }
        }
        Ok(())
    }

    pub fn is_slstm(&self, block: usize) -> bool {
        self.slstm_at.contains(&block)
    }
    fn has_slstm(&self) -> bool {
        !self.slstm_at.is_empty()
    }
    fn has_mlstm(&self) -> bool {
        self.slstm_at.len() < self.num_blocks
    }

    /// Parameters of a checkpoint of this config (the tied lm_head counted once).
    pub fn num_params(&self) -> usize {
        weight_specs(self).iter().map(|w| w.shape.iter().product::<usize>()).sum()
    }

    /// `_block_map`: "0" for mLSTM, "1" for sLSTM, comma-separated.
    pub fn block_map(&self) -> String {
        (0..self.num_blocks).map(|i| if self.is_slstm(i) { "1" } else { "0" }).collect::<Vec<_>>().join(",")
    }

    /// Identifies the shape of the recurrent state (and the weights): checked when a state is restored.
    pub fn fingerprint(&self) -> String {
        let d = self.embedding_dim;
        let mut s = format!("xlstm-lm:L{}:D{}:V{}:map{}", self.num_blocks, d, self.vocab_size, self.block_map().replace(',', ""));
        if let (true, Some(m)) = (self.has_mlstm(), &self.mlstm) {
            s += &format!(":m{}h{}k{}", m.inner_dim(d), m.num_heads, m.conv1d_kernel_size);
        }
        if let (true, Some(c)) = (self.has_slstm(), &self.slstm) {
            s += &format!(":s{}h{}k{}", d, c.num_heads, c.conv1d_kernel_size);
        }
        s
    }

    /// The config as the package's dataclass tree, derived fields filled in.
    pub fn to_json(&self) -> Value {
        let d = self.embedding_dim;
        let mlstm_block = self.mlstm.as_ref().map(|m| {
            let inner = m.inner_dim(d);
            json!({
                "mlstm": {
                    "proj_factor": m.proj_factor,
                    "round_proj_up_dim_up": m.round_proj_up_dim_up,
                    "round_proj_up_to_multiple_of": m.round_proj_up_to_multiple_of,
                    "_proj_up_dim": inner,
                    "conv1d_kernel_size": m.conv1d_kernel_size,
                    "qkv_proj_blocksize": m.qkv_proj_blocksize,
                    "num_heads": m.num_heads,
                    "embedding_dim": d,
                    "bias": self.bias,
                    "dropout": 0.0,
                    "context_length": self.context_length,
                    "_num_blocks": self.num_blocks,
                    "_inner_embedding_dim": inner,
                },
                "_num_blocks": self.num_blocks,
                "_block_idx": null,
            })
        });
        let slstm_block = self.slstm.as_ref().map(|s| {
            let ff = s.feedforward.as_ref().map(|f| {
                json!({
                    "proj_factor": f.proj_factor,
                    "round_proj_up_dim_up": f.round_proj_up_dim_up,
                    "round_proj_up_to_multiple_of": f.round_proj_up_to_multiple_of,
                    "_proj_up_dim": f.dim(d),
                    "act_fn": f.act_fn,
                    "embedding_dim": d,
                    "dropout": 0.0,
                    "bias": f.bias,
                    "ff_type": "ffn_gated",
                    "_num_blocks": 1,
                })
            });
            json!({
                "slstm": {
                    "hidden_size": d,
                    "num_heads": s.num_heads,
                    "num_states": 4,
                    "num_gates": 4,
                    "backend": s.backend,
                    "function": "slstm",
                    "embedding_dim": d,
                    "conv1d_kernel_size": s.conv1d_kernel_size,
                    "group_norm_weight": s.group_norm_weight,
                    "dropout": 0.0,
                    "initial_val": 0.0,
                    "_num_blocks": self.num_blocks,
                    "_block_idx": null,
                },
                "feedforward": ff,
                "_num_blocks": self.num_blocks,
                "_block_idx": null,
            })
        });
        json!({
            "mlstm_block": mlstm_block,
            "slstm_block": slstm_block,
            "context_length": self.context_length,
            "num_blocks": self.num_blocks,
            "embedding_dim": d,
            "add_post_blocks_norm": self.add_post_blocks_norm,
            "bias": self.bias,
            "dropout": 0.0,
            "slstm_at": self.slstm_at,
            "_block_map": self.block_map(),
            "vocab_size": self.vocab_size,
            "tie_weights": self.tie_weights,
            "weight_decay_on_embedding": false,
            "add_embedding_dropout": false,
        })
    }

    /// Sizes used by the network (valid only after `validate`).
    fn dims(&self) -> Dims {
        let d = self.embedding_dim;
        let (inner, m_heads, m_k, qkv_blocks) = match (&self.mlstm, self.has_mlstm()) {
            (Some(m), true) => (m.inner_dim(d), m.num_heads, m.conv1d_kernel_size, m.qkv_blocks(d)),
            _ => (0, 1, 0, 1),
        };
        let (s_heads, s_k, ffn) = match (&self.slstm, self.has_slstm()) {
            (Some(s), true) => (s.num_heads, s.conv1d_kernel_size, s.feedforward.as_ref().map_or(0, |f| f.dim(d))),
            _ => (1, 0, 0),
        };
        Dims { d, vocab: self.vocab_size, inner, m_heads, m_k, qkv_blocks, s_heads, s_k, ffn }
    }
}

fn normalise(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    d: usize,
    vocab: usize,
    /// mLSTM inner width I (0 without mLSTM blocks), cell heads, conv taps, q/k/v blocks.
    inner: usize,
    m_heads: usize,
    m_k: usize,
    qkv_blocks: usize,
    /// sLSTM heads (width = d), conv taps (0: none), FFN width (0: no FFN).
    s_heads: usize,
    s_k: usize,
    ffn: usize,
}

impl Dims {
    fn m_cell(&self) -> MlstmDims {
        let dh = self.inner / self.m_heads;
        MlstmDims { heads: self.m_heads, dk: dh, dv: dh }
    }
    fn qkv(&self) -> HeadwiseDims {
        let b = self.inner / self.qkv_blocks;
        HeadwiseDims { blocks: self.qkv_blocks, din: b, dout: b }
    }
    fn s_dh(&self) -> usize {
        self.d / self.s_heads
    }
    fn s_gates(&self) -> HeadwiseDims {
        HeadwiseDims { blocks: self.s_heads, din: self.s_dh(), dout: self.s_dh() }
    }
}

// =====================================================================================================
// Network
// =====================================================================================================

struct MBlock<B: Backend> {
    /// (1 + w) of `xlstm_norm`.
    norm: B::Buf,
    up_x: B::Mat,
    up_z: B::Mat,
    up_x_bias: Option<B::Buf>,
    up_z_bias: Option<B::Buf>,
    /// [K, I] (tap-major), bias [I].
    conv_w: B::Buf,
    conv_b: B::Buf,
    /// Block-diagonal [NHp, O, Ip], optional bias [I].
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    q_bias: Option<B::Buf>,
    k_bias: Option<B::Buf>,
    v_bias: Option<B::Buf>,
    /// [NH, 3I] on concat(q, k, v), f32.
    igate: B::Mat,
    fgate: B::Mat,
    igate_bias: B::Buf,
    fgate_bias: B::Buf,
    /// (1 + w) of `outnorm` [I].
    outnorm: B::Buf,
    skip: B::Buf,
    down: B::Mat,
    down_bias: Option<B::Buf>,
}

struct Ffn<B: Backend> {
    norm: B::Buf,
    up_gate: B::Mat,
    up: B::Mat,
    up_gate_bias: Option<B::Buf>,
    up_bias: Option<B::Buf>,
    down: B::Mat,
    down_bias: Option<B::Buf>,
    act: Activation,
}

struct SBlock<B: Backend> {
    norm: B::Buf,
    /// [K, H] (tap-major) and bias [H]; None without conv.
    conv: Option<(B::Buf, B::Buf)>,
    /// Headwise [NH, DH, DH] producing the cell's i, f, z, o pre-activations. `gi` is the module
    /// `fgate`, `gf` the module `igate` (§5.1).
    gi: B::Buf,
    gf: B::Buf,
    gz: B::Buf,
    go: B::Buf,
    /// [NH, 4·DH, DH] and [4·H] (gate-major).
    r: B::Buf,
    bias: B::Buf,
    /// (1 + w) of `group_norm` [H] (ones without weight).
    group_norm: B::Buf,
    ffn: Option<Ffn<B>>,
}

enum Block<B: Backend> {
    M(Box<MBlock<B>>),
    S(Box<SBlock<B>>),
}

/// Activation buffers for a number of rows (see `ActivationCache`).
struct Scratch<B: Backend> {
    x: B::Buf,
    xn: B::Buf,
    xm: B::Buf,
    z: B::Buf,
    c: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    qkv: B::Buf,
    ig: B::Buf,
    fg: B::Buf,
    h: B::Buf,
    hn: B::Buf,
    y: B::Buf,
    gi: B::Buf,
    gf: B::Buf,
    gz: B::Buf,
    go: B::Buf,
    g: B::Buf,
    u: B::Buf,
    a: B::Buf,
    last: B::Buf,
}

pub struct LmNet<B: Backend> {
    dims: Dims,
    embedding: B::Mat,
    blocks: Vec<Block<B>>,
    post_norm: Option<B::Buf>,
    lm_head: B::Mat,
    /// Bytes of the small f32 weights (headwise, recurrent, conv, norms) read per token.
    small_bytes: usize,
    scratch: ActivationCache<Scratch<B>>,
    logits: GrowBuf<B::Buf>,
}

/// Two optional buffers (the halves of a split bias).
type BufPair<B> = (Option<<B as Backend>::Buf>, Option<<B as Backend>::Buf>);

/// Takes tensors by name with shape checks and puts them on the backend.
struct Loader<'a, B: Backend> {
    b: &'a B,
    w: Weights,
    dt: DType,
    small: usize,
}

impl<B: Backend> Loader<'_, B> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        self.w.take(name, shape)
    }
    fn upload(&mut self, v: &[f32]) -> Result<B::Buf> {
        self.small += 4 * v.len();
        self.b.upload(v)
    }
    fn vec(&mut self, name: &str, shape: &[usize]) -> Result<B::Buf> {
        let t = self.take(name, shape)?;
        self.upload(&t.to_f32())
    }
    /// A norm weight stored as the offset from 1: uploads 1 + w.
    fn plus_one(&mut self, name: &str, len: usize) -> Result<B::Buf> {
        let v: Vec<f32> = self.take(name, &[len])?.to_f32().iter().map(|w| 1.0 + w).collect();
        self.upload(&v)
    }
    fn opt_vec(&mut self, present: bool, name: &str, len: usize) -> Result<Option<B::Buf>> {
        if present {
            self.vec(name, &[len]).map(Some)
        } else {
            Ok(None)
        }
    }
    /// A [C, 1, K] conv weight, uploaded tap-major [K, C].
    fn conv(&mut self, name: &str, ch: usize, k: usize) -> Result<B::Buf> {
        let w = self.take(name, &[ch, 1, k])?.to_f32();
        let mut t = vec![0f32; ch * k];
        for c in 0..ch {
            for tap in 0..k {
                t[tap * ch + c] = w[c * k + tap];
            }
        }
        self.upload(&t)
    }
    fn mat(&mut self, t: HostTensor) -> Result<B::Mat> {
        self.b.matrix(t, self.dt)
    }
    /// The sLSTM recurrent kernel in the layout the cell runs on, [NH, 4·DH (gate, out), DH (in)] (the
    /// `xlstm` package's "vanilla" backend stores it so); the "cuda" backend stores it as
    /// [NH, DH (in), 4·DH (gate, out)], transposed here.
    fn slstm_recurrent(&mut self, name: &str, nh: usize, dh: usize, cuda_layout: bool) -> Result<B::Buf> {
        if !cuda_layout {
            return self.vec(name, &[nh, 4 * dh, dh]);
        }
        let c = self.take(name, &[nh, dh, 4 * dh])?.to_f32();
        let mut v = vec![0f32; c.len()];
        for h in 0..nh {
            for i in 0..dh {
                for go in 0..4 * dh {
                    v[(h * 4 * dh + go) * dh + i] = c[(h * dh + i) * 4 * dh + go];
                }
            }
        }
        self.upload(&v)
    }
    /// The sLSTM bias in (gate, head, dim) order ("vanilla"); the "cuda" backend stores it in
    /// (head, gate, dim) order, reordered here.
    fn slstm_bias(&mut self, name: &str, nh: usize, dh: usize, cuda_layout: bool) -> Result<B::Buf> {
        let b = self.take(name, &[4 * nh * dh])?.to_f32();
        if !cuda_layout {
            return self.upload(&b);
        }
        let mut v = vec![0f32; b.len()];
        for h in 0..nh {
            for g in 0..4 {
                let (src, dst) = ((h * 4 + g) * dh, (g * nh + h) * dh);
                v[dst..dst + dh].copy_from_slice(&b[src..src + dh]);
            }
        }
        self.upload(&v)
    }
    /// A [2·half, in] matrix split into its two row halves, each a backend matrix.
    fn halves(&mut self, name: &str, half: usize, inp: usize) -> Result<(B::Mat, B::Mat)> {
        let t = self.take(name, &[2 * half, inp])?;
        Ok((self.mat(t.rows(0, half))?, self.mat(t.rows(half, 2 * half))?))
    }
    fn opt_halves(&mut self, present: bool, name: &str, half: usize) -> Result<BufPair<B>> {
        if !present {
            return Ok((None, None));
        }
        let t = self.take(name, &[2 * half])?.to_f32();
        Ok((Some(self.upload(&t[..half])?), Some(self.upload(&t[half..])?)))
    }
}

impl<B: Backend> LmNet<B> {
    pub fn new(backend: &B, cfg: &LmConfig, w: Weights) -> Result<Self> {
        cfg.validate()?;
        let dims = cfg.dims();
        let Dims { d, vocab, inner, m_heads, m_k, s_heads, s_k, ffn, .. } = dims;
        let mut l = Loader { b: backend, dt: w.dtype, w, small: 0 };
        // sLSTM weights saved by the `xlstm` package's CUDA cell are laid out differently (see
        // Loader::slstm_recurrent); they are reordered to the vanilla layout on load.
        let cuda_layout = cfg.slstm.as_ref().is_some_and(|s| s.backend == "cuda");
        let emb_names = if cfg.tie_weights { vec!["token_embedding.weight", "lm_head.weight"] } else { vec!["token_embedding.weight"] };
        let emb = l.w.take_any(&emb_names, &[vocab, d])?;
        let lm_head = if cfg.tie_weights {
            if l.w.contains("lm_head.weight") {
                l.take("lm_head.weight", &[vocab, d])?; // the tied copy
            }
            emb.clone()
        } else {
            l.take("lm_head.weight", &[vocab, d])?
        };
        let mut blocks = Vec::with_capacity(cfg.num_blocks);
        for i in 0..cfg.num_blocks {
            let p = format!("xlstm_block_stack.blocks.{i}");
            let x = format!("{p}.xlstm");
            let norm = l.plus_one(&format!("{p}.xlstm_norm.weight"), d)?;
            if !cfg.is_slstm(i) {
                let bias = cfg.bias;
                let hw = dims.qkv();
                let hw_shape = [hw.blocks, hw.dout, hw.din];
                let (up_x, up_z) = l.halves(&format!("{x}.proj_up.weight"), inner, d)?;
                let (up_x_bias, up_z_bias) = l.opt_halves(bias, &format!("{x}.proj_up.bias"), inner)?;
                let igate = l.take(&format!("{x}.mlstm_cell.igate.weight"), &[m_heads, 3 * inner])?;
                let fgate = l.take(&format!("{x}.mlstm_cell.fgate.weight"), &[m_heads, 3 * inner])?;
                blocks.push(Block::M(Box::new(MBlock {
                    norm,
                    up_x,
                    up_z,
                    up_x_bias,
                    up_z_bias,
                    conv_w: l.conv(&format!("{x}.conv1d.conv.weight"), inner, m_k)?,
                    conv_b: l.vec(&format!("{x}.conv1d.conv.bias"), &[inner])?,
                    q: l.vec(&format!("{x}.q_proj.weight"), &hw_shape)?,
                    k: l.vec(&format!("{x}.k_proj.weight"), &hw_shape)?,
                    v: l.vec(&format!("{x}.v_proj.weight"), &hw_shape)?,
                    q_bias: l.opt_vec(bias, &format!("{x}.q_proj.bias"), inner)?,
                    k_bias: l.opt_vec(bias, &format!("{x}.k_proj.bias"), inner)?,
                    v_bias: l.opt_vec(bias, &format!("{x}.v_proj.bias"), inner)?,
                    // The gate rows are tiny ([NH, 3I]); f32 keeps them exact at no cost.
                    igate: backend.matrix(igate, DType::F32)?,
                    fgate: backend.matrix(fgate, DType::F32)?,
                    igate_bias: l.vec(&format!("{x}.mlstm_cell.igate.bias"), &[m_heads])?,
                    fgate_bias: l.vec(&format!("{x}.mlstm_cell.fgate.bias"), &[m_heads])?,
                    outnorm: l.plus_one(&format!("{x}.mlstm_cell.outnorm.weight"), inner)?,
                    skip: l.vec(&format!("{x}.learnable_skip"), &[inner])?,
                    down: {
                        let t = l.take(&format!("{x}.proj_down.weight"), &[d, inner])?;
                        l.mat(t)?
                    },
                    down_bias: l.opt_vec(bias, &format!("{x}.proj_down.bias"), d)?,
                })));
            } else {
                let scfg = cfg.slstm.as_ref().expect("validated: sLSTM blocks have a config");
                let dh = dims.s_dh();
                let hw_shape = [s_heads, dh, dh];
                let conv = if s_k > 0 {
                    Some((l.conv(&format!("{x}.conv1d.conv.weight"), d, s_k)?, l.vec(&format!("{x}.conv1d.conv.bias"), &[d])?))
                } else {
                    None
                };
                let group_norm = if scfg.group_norm_weight { l.plus_one(&format!("{x}.group_norm.weight"), d)? } else { l.upload(&vec![1.0; d])? };
                let ffn = match &scfg.feedforward {
                    None => None,
                    Some(f) => {
                        let norm = l.plus_one(&format!("{p}.ffn_norm.weight"), d)?;
                        let (up_gate, up) = l.halves(&format!("{p}.ffn.proj_up.weight"), ffn, d)?;
                        let (up_gate_bias, up_bias) = l.opt_halves(f.bias, &format!("{p}.ffn.proj_up.bias"), ffn)?;
                        let down = l.take(&format!("{p}.ffn.proj_down.weight"), &[d, ffn])?;
                        Some(Ffn {
                            norm,
                            up_gate,
                            up,
                            up_gate_bias,
                            up_bias,
                            down: l.mat(down)?,
                            down_bias: l.opt_vec(f.bias, &format!("{p}.ffn.proj_down.bias"), d)?,
                            act: f.activation()?,
                        })
                    }
                };
                blocks.push(Block::S(Box::new(SBlock {
                    norm,
                    conv,
                    gi: l.vec(&format!("{x}.fgate.weight"), &hw_shape)?,
                    gf: l.vec(&format!("{x}.igate.weight"), &hw_shape)?,
                    gz: l.vec(&format!("{x}.zgate.weight"), &hw_shape)?,
                    go: l.vec(&format!("{x}.ogate.weight"), &hw_shape)?,
                    r: l.slstm_recurrent(&format!("{x}.slstm_cell._recurrent_kernel_"), s_heads, dh, cuda_layout)?,
                    bias: l.slstm_bias(&format!("{x}.slstm_cell._bias_"), s_heads, dh, cuda_layout)?,
                    group_norm,
                    ffn,
                })));
            }
        }
        let post_norm = if cfg.add_post_blocks_norm { Some(l.plus_one("xlstm_block_stack.post_blocks_norm.weight", d)?) } else { None };
        let embedding = l.mat(emb)?;
        let lm_head = l.mat(lm_head)?;
        let small_bytes = l.small;
        l.w.finish()?;
        Ok(LmNet { dims, embedding, blocks, post_norm, lm_head, small_bytes, scratch: ActivationCache::new(), logits: GrowBuf::new() })
    }

    fn make_scratch(b: &B, dims: Dims, rows: usize) -> Result<Scratch<B>> {
        let Dims { d, inner, m_heads, ffn, .. } = dims;
        let wide = inner.max(d);
        let z = |w: usize| b.scratch(rows * w);
        Ok(Scratch {
            x: z(d)?,
            xn: z(d)?,
            xm: z(inner)?,
            z: z(inner)?,
            c: z(wide)?,
            q: z(inner)?,
            k: z(inner)?,
            v: z(inner)?,
            qkv: z(3 * inner)?,
            ig: z(m_heads)?,
            fg: z(m_heads)?,
            h: z(wide)?,
            hn: z(wide)?,
            y: z(d)?,
            gi: z(d)?,
            gf: z(d)?,
            gz: z(d)?,
            go: z(d)?,
            g: z(ffn)?,
            u: z(ffn)?,
            a: z(ffn.max(inner))?,
            last: z(d)?,
        })
    }
}

fn add_bias<B: Backend>(b: &B, x: &mut B::Buf, rows: usize, width: usize, bias: &Option<B::Buf>) -> Result<()> {
    match bias {
        Some(bias) => b.bias_soft_cap(x, rows, width, Some(bias), 0.0),
        None => Ok(()),
    }
}

fn conv_zeros<B: Backend>(b: &B, dims: ConvDims, batch: usize) -> Result<ConvState<B::Buf>> {
    Ok(ConvState { buf: b.zeros(batch * dims.taps() * dims.channels)?, taps: dims.taps(), channels: dims.channels })
}

impl<B: Backend> Network<B> for LmNet<B> {
    fn new_state(&self, b: &B, batch: usize, c_dtype: DType) -> Result<Vec<LayerState<B::Buf>>> {
        let dm = self.dims;
        self.blocks
            .iter()
            .map(|blk| {
                Ok(match blk {
                    Block::M(_) => LayerState::Mlstm {
                        cell: mlstm_zeros(b, dm.m_cell(), batch, c_dtype)?,
                        conv: Some(conv_zeros(b, ConvDims { channels: dm.inner, kernel: dm.m_k }, batch)?),
                    },
                    Block::S(_) => {
                        let w = batch * dm.d;
                        LayerState::Slstm {
                            cell: SlstmState { c: b.zeros(w)?, n: b.zeros(w)?, m: b.zeros(w)?, h: b.zeros(w)?, width: dm.d, heads: dm.s_heads },
                            conv: conv_zeros(b, ConvDims { channels: dm.d, kernel: dm.s_k }, batch)?,
                        }
                    }
                })
            })
            .collect()
    }

    fn release_cache(&mut self) {
        self.scratch.clear();
        self.logits.clear();
    }

    fn release_sequence_cache(&mut self, keep_rows: usize) -> bool {
        let freed = self.scratch.release_sequence(keep_rows);
        self.logits.shrink_to(keep_rows * self.dims.vocab);
        freed
    }


    fn weight_bytes_per_token(&self, b: &B) -> usize {
        let mats: usize = self
            .blocks
            .iter()
            .map(|blk| match blk {
                Block::M(m) => [&m.up_x, &m.up_z, &m.igate, &m.fgate, &m.down].iter().map(|x| b.matrix_bytes(x)).sum::<usize>(),
                Block::S(s) => s.ffn.as_ref().map_or(0, |f| [&f.up_gate, &f.up, &f.down].iter().map(|x| b.matrix_bytes(x)).sum()),
            })
            .sum();
        mats + self.small_bytes + b.matrix_bytes(&self.lm_head)
    }

    fn forward(&mut self, b: &B, ids: &[u32], rows: Rows, state: &mut [LayerState<B::Buf>], logits: LogitRows) -> Result<Vec<f32>> {
        let n = ids.len();
        if state.len() != self.blocks.len() {
            return Err(Error::State(format!("the state has {} layers, this model {} blocks", state.len(), self.blocks.len())));
        }
        let dm = self.dims;
        let (d, inner) = (dm.d, dm.inner);
        let s = self.scratch.get(rows, n, |n| Self::make_scratch(b, dm, n))?;
        b.embed(&self.embedding, ids, &mut s.x)?; //                                      [n, D]
        // A pruned prompt (`LogitRows::prunable`; whether the last row is kept): after the last
        // block's recurrent cell has taken every row into the state, the rest of the block runs
        // on the last row alone.
        let pruned = logits.prunable(rows).filter(|_| n > 1).map(|(_, keep_last)| keep_last);
        let last_block = self.blocks.len().saturating_sub(1);
        for (li, (blk, layer)) in self.blocks.iter().zip(state.iter_mut()).enumerate() {
            let prune = pruned.filter(|_| li == last_block);
            b.group_norm(&s.x, n, d, d, match blk {
                Block::M(m) => &m.norm,
                Block::S(sb) => &sb.norm,
            }, None, LN_EPS, &mut s.xn)?; //                                                [n, D]
            match (blk, layer) {
                (Block::M(m), LayerState::Mlstm { cell, conv: Some(conv) }) => {
                    let cd = ConvDims { channels: inner, kernel: dm.m_k };
                    let hw = dm.qkv();
                    b.matmul(&s.xn, n, &m.up_x, &mut s.xm)?; //                              [n, I]
                    add_bias(b, &mut s.xm, n, inner, &m.up_x_bias)?;
                    if prune.is_none() {
                        b.matmul(&s.xn, n, &m.up_z, &mut s.z)?; //                           [n, I]
                        add_bias(b, &mut s.z, n, inner, &m.up_z_bias)?;
                    }
                    match rows {
                        Rows::Sequence(_) => b.conv1d_prefill(cd, n, &s.xm, &m.conv_w, &m.conv_b, &mut conv.buf, true, &mut s.c)?,
                        Rows::Step => b.conv1d_step(cd, n, &s.xm, &m.conv_w, &m.conv_b, &mut conv.buf, true, &mut s.c)?,
                    } //                                                                    c = SiLU(conv(x_m)) [n, I]
                    b.headwise(&s.c, n, &m.q, hw, m.q_bias.as_ref(), &mut s.q)?; //           [n, I]
                    b.headwise(&s.c, n, &m.k, hw, m.k_bias.as_ref(), &mut s.k)?; //           [n, I]
                    b.headwise(&s.xm, n, &m.v, hw, m.v_bias.as_ref(), &mut s.v)?; //          [n, I]
                    b.copy_cols(&s.q, inner, 0, &mut s.qkv, 3 * inner, 0, n, inner)?; //      [n, 3I] = [q | k | v]
                    b.copy_cols(&s.k, inner, 0, &mut s.qkv, 3 * inner, inner, n, inner)?;
                    b.copy_cols(&s.v, inner, 0, &mut s.qkv, 3 * inner, 2 * inner, n, inner)?;
                    b.matmul(&s.qkv, n, &m.igate, &mut s.ig)?; //                             [n, NH]
                    b.matmul(&s.qkv, n, &m.fgate, &mut s.fg)?; //                             [n, NH]
                    b.bias_soft_cap(&mut s.ig, n, dm.m_heads, Some(&m.igate_bias), 0.0)?;
                    b.bias_soft_cap(&mut s.fg, n, dm.m_heads, Some(&m.fgate_bias), 0.0)?;
                    let cd = dm.m_cell();
                    match rows {
                        Rows::Sequence(kernel) => b.mlstm_prefill(kernel, cd, n, &s.q, &s.k, &s.v, &s.ig, &s.fg, cell, MLSTM_EPS, &mut s.h)?,
                        Rows::Step => b.mlstm_step(cd, n, &s.q, &s.k, &s.v, &s.ig, &s.fg, cell, MLSTM_EPS, &mut s.h)?,
                    } //                                                                    h̃ [n, I]
                    // the rows the rest runs on, and their h̃ and c
                    let (t, h, c) = match prune {
                        None => (n, &s.h, &s.c),
                        Some(false) => break,
                        Some(true) => {
                            b.copy(&s.xn, (n - 1) * d, &mut s.y, 0, d)?;
                            b.matmul(&s.y, 1, &m.up_z, &mut s.z)?; //                        z of the last row [1, I]
                            add_bias(b, &mut s.z, 1, inner, &m.up_z_bias)?;
                            b.copy(&s.h, (n - 1) * inner, &mut s.a, 0, inner)?;
                            b.copy(&s.c, (n - 1) * inner, &mut s.q, 0, inner)?;
                            last_row_to_front(b, &mut s.x, &mut s.last, n, d)?;
                            (1, &s.a, &s.q)
                        }
                    };
                    b.group_norm(h, t, inner, cd.dv, &m.outnorm, None, GN_EPS, &mut s.hn)?; // per-head norm [t, I]
                    b.scaled_add(&mut s.hn, c, &m.skip, t, inner)?; //                        + skip ⊙ c
                    b.swiglu(&s.z, &s.hn, t * inner, &mut s.a)?; //                           ⊙ SiLU(z) [t, I]
                    b.matmul(&s.a, t, &m.down, &mut s.y)?; //                                 [t, D]
                    add_bias(b, &mut s.y, t, d, &m.down_bias)?;
                    b.add(&mut s.x, &s.y, t * d)?;
                }
                (Block::S(sb), LayerState::Slstm { cell, conv }) => {
                    let hw = dm.s_gates();
                    let cin = match &sb.conv {
                        Some((w, bias)) => {
                            let cd = ConvDims { channels: d, kernel: dm.s_k };
                            match rows {
                                Rows::Sequence(_) => b.conv1d_prefill(cd, n, &s.xn, w, bias, &mut conv.buf, true, &mut s.c)?,
                                Rows::Step => b.conv1d_step(cd, n, &s.xn, w, bias, &mut conv.buf, true, &mut s.c)?,
                            }
                            &s.c //                                                         SiLU(conv(u)) [n, H]
                        }
                        None => &s.xn,
                    };
                    b.headwise(cin, n, &sb.gi, hw, None, &mut s.gi)?; //                      cell i [n, H]
                    b.headwise(cin, n, &sb.gf, hw, None, &mut s.gf)?; //                      cell f [n, H]
                    b.headwise(&s.xn, n, &sb.gz, hw, None, &mut s.gz)?; //                    cell z [n, H]
                    b.headwise(&s.xn, n, &sb.go, hw, None, &mut s.go)?; //                    cell o [n, H]
                    let gates = SlstmGates { i: &s.gi, f: &s.gf, z: &s.gz, o: &s.go };
                    match rows {
                        Rows::Sequence(_) => b.slstm_prefill(n, gates, &sb.r, &sb.bias, cell, &mut s.h)?,
                        Rows::Step => b.slstm_step(n, gates, &sb.r, &sb.bias, cell, &mut s.h)?,
                    } //                                                                    h [n, H]
                    // the rows the rest runs on, and their h
                    let (t, h) = match prune {
                        None => (n, &s.h),
                        Some(false) => break,
                        Some(true) => {
                            b.copy(&s.h, (n - 1) * d, &mut s.y, 0, d)?;
                            last_row_to_front(b, &mut s.x, &mut s.last, n, d)?;
                            (1, &s.y)
                        }
                    };
                    b.group_norm(h, t, d, dm.s_dh(), &sb.group_norm, None, GN_EPS, &mut s.hn)?; // [t, H]
                    b.add(&mut s.x, &s.hn, t * d)?;
                    if let Some(f) = &sb.ffn {
                        let ff = dm.ffn;
                        b.group_norm(&s.x, t, d, d, &f.norm, None, LN_EPS, &mut s.xn)?; //   [t, D]
                        b.matmul(&s.xn, t, &f.up_gate, &mut s.g)?; //                         [t, F]
                        add_bias(b, &mut s.g, t, ff, &f.up_gate_bias)?;
                        b.matmul(&s.xn, t, &f.up, &mut s.u)?; //                              [t, F]
                        add_bias(b, &mut s.u, t, ff, &f.up_bias)?;
                        b.gated_act(f.act, &s.g, &s.u, t * ff, &mut s.a)?; //                 act(g) ⊙ u [t, F]
                        b.matmul(&s.a, t, &f.down, &mut s.y)?; //                             [t, D]
                        add_bias(b, &mut s.y, t, d, &f.down_bias)?;
                        b.add(&mut s.x, &s.y, t * d)?;
                    }
                }
                _ => {
                    return Err(Error::State(format!("state layer {li} does not match block {li} of this xlstm-lm model")));
                }
            }
        }
        match logits.range_pruned(n, pruned.is_some()) {
            Some((first, count)) => self.head_logits_of(b, first, count),
            None => Ok(Vec::new()),
        }
    }

    fn head_logits(&mut self, b: &B, rows: usize) -> Result<Vec<f32>> {
        self.head_logits_of(b, 0, rows)
    }
}

/// Moves row `n - 1` of `x` ([n, width]) to row 0 through `tmp` (a pruned prompt's last row).
fn last_row_to_front<B: Backend>(b: &B, x: &mut B::Buf, tmp: &mut B::Buf, n: usize, width: usize) -> Result<()> {
    b.copy(x, (n - 1) * width, tmp, 0, width)?;
    b.copy(tmp, 0, x, 0, width)
}

impl<B: Backend> LmNet<B> {
    /// Post-blocks norm and LM head over hidden rows `first..first + count` of the last forward.
    fn head_logits_of(&mut self, b: &B, first: usize, count: usize) -> Result<Vec<f32>> {
        let d = self.dims.d;
        let vocab = self.dims.vocab;
        let s = self.scratch.last();
        b.copy(&s.x, first * d, &mut s.last, 0, count * d)?;
        let normed = match &self.post_norm {
            Some(w) => {
                b.group_norm(&s.last, count, d, d, w, None, LN_EPS, &mut s.xn)?;
                &s.xn
            }
            None => &s.last,
        };
        let logits = self.logits.get(b, count * vocab)?;
        b.matmul(normed, count, &self.lm_head, logits)?; //                           [count, V]
        b.download(logits, count * vocab)
    }
}

/// Every tensor of an xlstm-lm checkpoint (vanilla sLSTM layout), with a random init that keeps
/// activations in a sane range. Norm weights are offsets from 1 (drawn around 0).
pub fn weight_specs(c: &LmConfig) -> Vec<WeightSpec> {
    type W = WeightSpec;
    let dm = c.dims();
    let Dims { d, vocab, inner, m_heads, m_k, s_heads, s_k, ffn, .. } = dm;
    let mut s = vec![W::new("token_embedding.weight", &[vocab, d], Init::around(0.0, 1.0))];
    for i in 0..c.num_blocks {
        let p = format!("xlstm_block_stack.blocks.{i}");
        let x = format!("{p}.xlstm");
        s.push(W::new(format!("{p}.xlstm_norm.weight"), &[d], Init::around(0.0, 0.1)));
        if !c.is_slstm(i) {
            let hw = dm.qkv();
            s.push(W::new(format!("{x}.proj_up.weight"), &[2 * inner, d], Init::fan_in(d)));
            s.push(W::new(format!("{x}.conv1d.conv.weight"), &[inner, 1, m_k], Init::fan_in(m_k)));
            s.push(W::new(format!("{x}.conv1d.conv.bias"), &[inner], Init::around(0.0, 0.1)));
            for q in ["q_proj", "k_proj", "v_proj"] {
                s.push(W::new(format!("{x}.{q}.weight"), &[hw.blocks, hw.dout, hw.din], Init::fan_in(hw.din)));
            }
            s.push(W::new(format!("{x}.mlstm_cell.igate.weight"), &[m_heads, 3 * inner], Init::fan_in(3 * inner)));
            s.push(W::new(format!("{x}.mlstm_cell.igate.bias"), &[m_heads], Init::around(-1.0, 1.0)));
            s.push(W::new(format!("{x}.mlstm_cell.fgate.weight"), &[m_heads, 3 * inner], Init::fan_in(3 * inner)));
            s.push(W::new(format!("{x}.mlstm_cell.fgate.bias"), &[m_heads], Init::around(3.0, 1.0)));
            s.push(W::new(format!("{x}.mlstm_cell.outnorm.weight"), &[inner], Init::around(0.0, 0.1)));
            s.push(W::new(format!("{x}.learnable_skip"), &[inner], Init::around(1.0, 0.1)));
            s.push(W::new(format!("{x}.proj_down.weight"), &[d, inner], Init::fan_in(inner)));
            if c.bias {
                s.push(W::new(format!("{x}.proj_up.bias"), &[2 * inner], Init::around(0.0, 0.1)));
                for q in ["q_proj", "k_proj", "v_proj"] {
                    s.push(W::new(format!("{x}.{q}.bias"), &[inner], Init::around(0.0, 0.1)));
                }
                s.push(W::new(format!("{x}.proj_down.bias"), &[d], Init::around(0.0, 0.1)));
            }
        } else {
            let scfg = c.slstm.as_ref().expect("validated");
            let dh = dm.s_dh();
            if s_k > 0 {
                s.push(W::new(format!("{x}.conv1d.conv.weight"), &[d, 1, s_k], Init::fan_in(s_k)));
                s.push(W::new(format!("{x}.conv1d.conv.bias"), &[d], Init::around(0.0, 0.1)));
            }
            for g in ["fgate", "igate", "zgate", "ogate"] {
                s.push(W::new(format!("{x}.{g}.weight"), &[s_heads, dh, dh], Init::fan_in(dh)));
            }
            s.push(W::new(format!("{x}.slstm_cell._recurrent_kernel_"), &[s_heads, 4 * dh, dh], Init::fan_in(dh)));
            s.push(W::new(format!("{x}.slstm_cell._bias_"), &[4 * d], Init::around(0.0, 1.0)));
            if scfg.group_norm_weight {
                s.push(W::new(format!("{x}.group_norm.weight"), &[d], Init::around(0.0, 0.1)));
            }
            if let Some(f) = &scfg.feedforward {
                s.push(W::new(format!("{p}.ffn_norm.weight"), &[d], Init::around(0.0, 0.1)));
                s.push(W::new(format!("{p}.ffn.proj_up.weight"), &[2 * ffn, d], Init::fan_in(d)));
                s.push(W::new(format!("{p}.ffn.proj_down.weight"), &[d, ffn], Init::fan_in(ffn)));
                if f.bias {
                    s.push(W::new(format!("{p}.ffn.proj_up.bias"), &[2 * ffn], Init::around(0.0, 0.1)));
                    s.push(W::new(format!("{p}.ffn.proj_down.bias"), &[d], Init::around(0.0, 0.1)));
                }
            }
        }
    }
    if c.add_post_blocks_norm {
        s.push(W::new("xlstm_block_stack.post_blocks_norm.weight", &[d], Init::around(0.0, 0.1)));
    }
    if !c.tie_weights {
        s.push(W::new("lm_head.weight", &[vocab, d], Init::fan_in(d)));
    }
    s
}
