//! The backend interface: the handful of operations xLSTM needs, over buffers a backend owns.
//!
//! Model code is written once against [`Backend`]; each backend brings its own kernels and memory.
//! Activations are row-major `[rows, width]` f32 buffers; weights are `[out, in]` matrices kept in the
//! backend's weight dtype. Recurrent state is f32 in every backend.
//!
//! Every op returns `Result` so that a backend can refuse a shape it has no kernel for
//! (`Error::Device`, naming the op and the limit) instead of panicking.
pub mod cpu;

use crate::error::Result;
use crate::tensor::{DType, HostTensor};

/// Sizes of one mLSTM layer's heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlstmDims {
    pub heads: usize,
    /// Query/key head dim (DHQK).
    pub dk: usize,
    /// Value head dim (DHV).
    pub dv: usize,
}

/// How a whole prompt segment goes through the mLSTM cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlstmKernel {
    /// Chunkwise-parallel: whole chunks of `chunk` tokens at once, the remainder step by step.
    Chunkwise { chunk: usize },
    /// A loop of recurrent steps.
    Sequence,
}

/// The per-sequence recurrent state of one mLSTM layer: C [B, NH, DK, DV], n [B, NH, DK], m [B, NH].
pub struct MlstmState<Buf> {
    pub c: Buf,
    pub n: Buf,
    pub m: Buf,
    pub dims: MlstmDims,
}

/// The per-sequence recurrent state of one sLSTM layer: c, n, m, h, each [B, width = NH·DH].
pub struct SlstmState<Buf> {
    pub c: Buf,
    pub n: Buf,
    pub m: Buf,
    pub h: Buf,
    pub width: usize,
    pub heads: usize,
}

pub trait Backend: Send + Sync + Sized + 'static {
    /// An f32 buffer in the backend's memory.
    type Buf: Send + Sync;
    /// A weight matrix `[out, in]` in the backend's memory and weight dtype.
    type Mat: Send + Sync;

    /// A short human-readable name (`cpu`, `cuda:0 (NVIDIA H100)`).
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf, len: usize) -> Result<Vec<f32>>;
    /// `dst[dst_off..dst_off + len] = src[src_off..src_off + len]`.
    fn copy(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, len: usize) -> Result<()>;
    /// Takes a 2-D host tensor as a weight matrix in `dtype`.
    fn matrix(&self, w: HostTensor, dtype: DType) -> Result<Self::Mat>;
    /// Bytes a matrix occupies (what one full read of it costs).
    fn matrix_bytes(&self, w: &Self::Mat) -> usize;

    // ---- dense ops ----------------------------------------------------------------------------
    /// `out[r] = table[ids[r]]` (f32).
    fn embed(&self, table: &Self::Mat, ids: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// `out[rows, n] = x[rows, k] · wᵀ` with `w` `[n, k]`.
    fn matmul(&self, x: &Self::Buf, rows: usize, w: &Self::Mat, out: &mut Self::Buf) -> Result<()>;
    /// RMSNorm over `width`: `x · rsqrt(mean(x²) + eps) · weight`.
    fn rms_norm(&self, x: &Self::Buf, rows: usize, width: usize, weight: &Self::Buf, eps: f32, out: &mut Self::Buf) -> Result<()>;
    /// LayerNorm per group of `group` values (mean-centred, biased variance) times `weight[width]`,
    /// plus `bias` when given. `group == width` is a plain LayerNorm.
    #[allow(clippy::too_many_arguments)]
    fn group_norm(&self, x: &Self::Buf, rows: usize, width: usize, group: usize, weight: &Self::Buf, bias: Option<&Self::Buf>, eps: f32, out: &mut Self::Buf) -> Result<()>;
    /// `x[r, j] = cap · tanh((x[r, j] + bias[j]) / cap)`; no bias or no cap (0) skips that part.
    fn bias_soft_cap(&self, x: &mut Self::Buf, rows: usize, width: usize, bias: Option<&Self::Buf>, cap: f32) -> Result<()>;
    /// `x += y` over `len` values.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;
    /// `out = silu(gate) ⊙ up` over `len` values.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, len: usize, out: &mut Self::Buf) -> Result<()>;
    /// `x = sigmoid(gate) ⊙ x` over `len` values.
    fn sigmoid_gate(&self, gate: &Self::Buf, x: &mut Self::Buf, len: usize) -> Result<()>;

    // ---- mLSTM --------------------------------------------------------------------------------
    /// One recurrent step for `batch` sequences: q, k [B, NH·DK], v [B, NH·DV], i, f [B, NH]
    /// (gate pre-activations, already soft-capped), state updated in place, h [B, NH·DV].
    #[allow(clippy::too_many_arguments)]
    fn mlstm_step(&self, dims: MlstmDims, batch: usize, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, i: &Self::Buf, f: &Self::Buf, state: &mut MlstmState<Self::Buf>, eps: f32, h: &mut Self::Buf) -> Result<()>;
    /// A segment of `seq` tokens of one sequence (batch 1), state carried in and out.
    #[allow(clippy::too_many_arguments)]
    fn mlstm_prefill(&self, kernel: MlstmKernel, dims: MlstmDims, seq: usize, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, i: &Self::Buf, f: &Self::Buf, state: &mut MlstmState<Self::Buf>, eps: f32, h: &mut Self::Buf) -> Result<()>;
}
