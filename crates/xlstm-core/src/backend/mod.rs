//! The backend interface: the handful of operations xLSTM needs, over buffers a backend owns.
//!
//! Model code is written once against [`Backend`]; each backend brings its own kernels and memory.
//! Activations are row-major `[rows, width]` f32 buffers; weights are `[out, in]` matrices kept in the
//! backend's weight dtype. Recurrent state is f32 in every backend.
//!
//! Every op returns `Result` so that a backend can refuse a shape it has no kernel for
//! (`Error::Device`, naming the op and the limit) instead of panicking.
pub mod cpu;
pub mod shapes;

use crate::error::Result;

/// In `embed`'s ids: the id the device chose last for that row (see [`Backend::device_greedy`]).
pub const CHOSEN_ID: u32 = u32::MAX;
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
    /// The element type C is kept in: f32, or bf16 where the backend offers it
    /// ([`Backend::state_dtypes`]; two values to a 4-byte word of `c`, updated in f32 and rounded
    /// once per step). n and m stay f32.
    pub c_dtype: DType,
    /// Updates of C the backend has deferred ([`Backend::mlstm_pending_words`]): C alone is the
    /// state only after [`Backend::mlstm_settle`]. None where every step writes C.
    pub pending: Option<Buf>,
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

/// The four gate pre-activations an sLSTM cell takes from its input (the input-side projections
/// `W x`, without the recurrent term and without bias), each `[rows, NH·DH]`, head-major
/// (channel `h·DH + d`). Order as in the cell: input `i`, forget `f`, cell input `z`, output `o`.
pub struct SlstmGates<'a, Buf> {
    pub i: &'a Buf,
    pub f: &'a Buf,
    pub z: &'a Buf,
    pub o: &'a Buf,
}

/// Scratch of [`Backend::norm_gated_ffn_add`]: `xn` [rows, width], `g`, `u`, `a` [rows, ff],
/// `y` [rows, width].
pub struct FfnScratch<'a, Buf> {
    pub xn: &'a mut Buf,
    pub g: &'a mut Buf,
    pub u: &'a mut Buf,
    pub a: &'a mut Buf,
    pub y: &'a mut Buf,
}

/// The weights of an xlstm-large layer's mLSTM half ([`Backend::norm_mlstm_add`]): the RMSNorm
/// before it (`eps` also serves the per-head LayerNorm), the projections q, k, v, o, ĩ, f̃ of the
/// normalised rows, the gate biases and soft cap, the cell's eps, the head norm's weight, out_proj.
pub struct MlstmHalf<'a, B: Backend> {
    pub norm: &'a B::Buf,
    pub eps: f32,
    pub proj: [&'a B::Mat; 6],
    pub ibias: &'a B::Buf,
    pub fbias: &'a B::Buf,
    pub gate_cap: f32,
    pub cell_eps: f32,
    pub head_norm: &'a B::Buf,
    pub out_proj: &'a B::Mat,
}

/// One xlstm-large block for [`Backend::decode_stack`]: its mLSTM half, then its FFN (the RMSNorm
/// weight, gate and up `[ff, width]`, down `[width, ff]`, SiLU).
pub struct StackBlock<'a, B: Backend> {
    pub mlstm: MlstmHalf<'a, B>,
    pub norm_ffn: &'a B::Buf,
    pub gate: &'a B::Mat,
    pub up: &'a B::Mat,
    pub down: &'a B::Mat,
    pub ff: usize,
}

/// The LM head a [`Backend::decode_stack`] may end with, for greedy decoding on the device: the
/// final RMSNorm (`norm`, `eps`; None: x as it is), then what [`Backend::head_top1_chosen`] does
/// with `w` [n, width] and soft cap `cap`: the best id kept on the device, its copy back started
/// by [`Backend::chosen_readback`].
pub struct StackHead<'a, B: Backend> {
    pub norm: Option<&'a B::Buf>,
    pub eps: f32,
    pub w: &'a B::Mat,
    pub n: usize,
    pub cap: f32,
}

/// Scratch of [`Backend::norm_mlstm_add`]: `xn`, `y` [rows, width]; `q`, `k` [rows, NH·DK];
/// `v`, `o`, `h`, `hn` [rows, NH·DV]; `i`, `f` [rows, NH].
pub struct MlstmScratch<'a, Buf> {
    pub xn: &'a mut Buf,
    pub q: &'a mut Buf,
    pub k: &'a mut Buf,
    pub v: &'a mut Buf,
    pub o: &'a mut Buf,
    pub i: &'a mut Buf,
    pub f: &'a mut Buf,
    pub h: &'a mut Buf,
    pub hn: &'a mut Buf,
    pub y: &'a mut Buf,
}

/// Sizes of a block-diagonal ("headwise") projection: `blocks` independent `[dout, din]` matrices;
/// the input row is `blocks·din` wide, the output row `blocks·dout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadwiseDims {
    pub blocks: usize,
    pub din: usize,
    pub dout: usize,
}

/// Sizes of a causal depthwise conv1d: `channels` independent filters of `kernel` taps. Its rolling
/// state holds the last `kernel − 1` inputs of each sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub channels: usize,
    pub kernel: usize,
}

impl ConvDims {
    /// Inputs kept between calls (`kernel − 1`, 0 for a kernel of 0 or 1 taps).
    pub fn taps(&self) -> usize {
        self.kernel.saturating_sub(1)
    }
}

/// Activation of a gated feed-forward (`act(gate) ⊙ up`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))` (torch's default, `approximate='none'`).
    Gelu,
    /// SiLU / swish, `x·σ(x)`.
    Silu,
    Relu,
    /// `relu(x)²`.
    ReluSquared,
    Sigmoid,
    /// SELU with torch's constants (α = 1.6732632…, scale = 1.0507009…).
    Selu,
}

impl Activation {
    /// The number GPU kernels use for it (CUDA `act_apply`, WGSL `act`): the declaration order.
    pub fn code(self) -> u32 {
        self as u32
    }
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
    /// A buffer whose contents are unspecified until written (activations): a backend may skip
    /// clearing it. Default: `zeros`.
    fn scratch(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf, len: usize) -> Result<Vec<f32>>;
    /// `dst[dst_off..dst_off + len] = src[src_off..src_off + len]`.
    fn copy(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, len: usize) -> Result<()>;
    /// Takes a 2-D host tensor as a weight matrix in `dtype`.
    fn matrix(&self, w: HostTensor, dtype: DType) -> Result<Self::Mat>;
    /// Bytes a matrix occupies (what one full read of it costs).
    fn matrix_bytes(&self, w: &Self::Mat) -> usize;
    /// Prompt tokens one prefill pass should take by default: long enough for the matrix products
    /// to run near peak, short enough to bound activation memory. Default 512.
    fn prefill_segment(&self) -> usize {
        512
    }
    /// Told before a model uploads its matrices: about how many bytes they take in all (each
    /// rounded up to 256). A backend that packs matrices into pools may then allocate one pool of
    /// that size instead of many with slack. Default: nothing.
    fn expect_matrix_bytes(&self, _bytes: usize) {}
    /// Told at model load: the dtype of the model's weights. A backend may then use faster
    /// arithmetic of about that precision inside its kernels (the CUDA backend's chunkwise prefill
    /// rounds operands to TF32 for 16-bit weights); f32 weights keep f32 arithmetic. Default: nothing.
    fn set_weight_dtype(&self, _dtype: DType) {}
    /// The element types this backend keeps an mLSTM state's C in (`--state-dtype`); f32 first.
    /// Default: f32 only.
    fn state_dtypes(&self) -> &'static [DType] {
        &[DType::F32]
    }
    /// 4-byte words of room for deferred updates of C that an mLSTM state of `batch` sequences
    /// with C in `c_dtype` gets (`MlstmState::pending`). 0 (the default): every step writes C. A
    /// backend that defers settles a state itself before its other ops read or write C.
    fn mlstm_pending_words(&self, _dims: MlstmDims, _batch: usize, _c_dtype: DType) -> usize {
        0
    }
    /// Folds a state's deferred updates into C (before C is read, copied or replaced outside the
    /// backend's ops). Default: nothing deferred, nothing to do.
    fn mlstm_settle(&self, _state: &MlstmState<Self::Buf>) -> Result<()> {
        Ok(())
    }
    /// Decode steps per write of this state's C (with deferred updates a step reads C and writes
    /// it once in this many steps); 1 (the default): every step reads and writes it.
    fn mlstm_steps_per_write(&self, _state: &MlstmState<Self::Buf>) -> usize {
        1
    }
    /// Releases cached memory the backend holds beyond live buffers (the watchdog's `empty_cache`).
    fn release_cache(&self) -> Result<()> {
        Ok(())
    }
    /// Releases the working memory that ops outside decode steps (a prompt's) made for themselves;
    /// what decode steps use stays. Called after a long prompt.
    fn release_sequence_cache(&self) -> Result<()> {
        Ok(())
    }
    /// Device memory this backend allocated itself and still holds (weights, states, activation
    /// buffers, workspace; not the runtime's own), where it keeps count. Default: None.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// A probe of device memory (bytes used, bytes total) for the watchdog's thread, where the
    /// backend has memory of its own.
    fn memory_probe(&self) -> Option<crate::watchdog::DeviceProbe> {
        None
    }

    // ---- dense ops ----------------------------------------------------------------------------
    /// `out[r] = table[ids[r]]` (f32). On a backend with [`Backend::device_greedy`], an id equal to
    /// [`CHOSEN_ID`] stands for the id the last [`Backend::head_top1_chosen`] chose for that row.
    fn embed(&self, table: &Self::Mat, ids: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// `out[rows, n] = x[rows, k] · wᵀ` with `w` `[n, k]`.
    fn matmul(&self, x: &Self::Buf, rows: usize, w: &Self::Mat, out: &mut Self::Buf) -> Result<()>;
    /// Fused LM head: for each of `rows` rows, the `k` largest of `cap·tanh((x wᵀ)/cap)` (`w` has
    /// `n` rows; cap 0 = none) as (id, value), best first, without returning the full logits.
    /// The default composes matmul + soft-cap + a host-side selection, using `scratch` [rows, n].
    #[allow(clippy::too_many_arguments)]
    fn head_top_k(&self, x: &Self::Buf, rows: usize, w: &Self::Mat, n: usize, cap: f32, k: usize, scratch: &mut Self::Buf) -> Result<Vec<Vec<(u32, f32)>>> {
        head_top_k_on_host(self, x, rows, w, n, cap, k, scratch)
    }
    /// Greedy decoding with the chosen ids kept on the device (`Model::pipe_step`): the backend has
    /// [`Backend::head_top1_chosen`], [`Backend::chosen_ids`] and [`CHOSEN_ID`] in `embed`, so that
    /// a step can be recorded before the previous step's token is read back. Default: no.
    fn device_greedy(&self) -> bool {
        false
    }
    /// The fused LM head's best id per row (as `head_top_k` with k = 1), kept on the device for the
    /// next `embed` of [`CHOSEN_ID`], and its copy to the host started without waiting: returns the
    /// ticket [`Backend::chosen_ids`] takes. Default: unsupported.
    #[allow(clippy::too_many_arguments)]
    fn head_top1_chosen(&self, _x: &Self::Buf, _rows: usize, _w: &Self::Mat, _n: usize, _cap: f32, _scratch: &mut Self::Buf) -> Result<u64> {
        Err(crate::Error::Device("this backend keeps no chosen ids on the device".into()))
    }
    /// Starts the copy back of the ids the last [`Backend::decode_stack`] with a head chose, as
    /// [`Backend::head_top1_chosen`] does for its own; returns the ticket. Default: unsupported.
    fn chosen_readback(&self, _rows: usize) -> Result<u64> {
        Err(crate::Error::Device("this backend keeps no chosen ids on the device".into()))
    }
    /// The ids of a [`Backend::head_top1_chosen`] ticket (waits for that selection only). Each
    /// ticket is read once. Default: unsupported.
    fn chosen_ids(&self, _ticket: u64) -> Result<Vec<u32>> {
        Err(crate::Error::Device("this backend keeps no chosen ids on the device".into()))
    }
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
    /// `out = act(gate) ⊙ up` over `len` values (a gated feed-forward's middle).
    fn gated_act(&self, act: Activation, gate: &Self::Buf, up: &Self::Buf, len: usize, out: &mut Self::Buf) -> Result<()>;
    /// `x[r, j] += scale[j] · y[r, j]` for `rows` rows of `width` (a per-channel scaled skip).
    fn scaled_add(&self, x: &mut Self::Buf, y: &Self::Buf, scale: &Self::Buf, rows: usize, width: usize) -> Result<()>;
    /// Strided 2-D copy: `dst[r·dst_stride + dst_off + j] = src[r·src_stride + src_off + j]` for
    /// `r < rows`, `j < width` (e.g. concatenating activations column-wise).
    #[allow(clippy::too_many_arguments)]
    fn copy_cols(&self, src: &Self::Buf, src_stride: usize, src_off: usize, dst: &mut Self::Buf, dst_stride: usize, dst_off: usize, rows: usize, width: usize) -> Result<()>;
    /// Block-diagonal projection: `x [rows, blocks·din]`, `w [blocks, dout, din]` (f32, row-major),
    /// `out[r, b·dout + o] = Σ_j w[b, o, j] · x[r, b·din + j] (+ bias[b·dout + o])`, `out [rows, blocks·dout]`.
    #[allow(clippy::too_many_arguments)]
    fn headwise(&self, x: &Self::Buf, rows: usize, w: &Self::Buf, dims: HeadwiseDims, bias: Option<&Self::Buf>, out: &mut Self::Buf) -> Result<()>;

    // ---- causal depthwise conv1d ----------------------------------------------------------------
    // Weights `w [kernel, channels]` (tap-major: `w[k, c]`; tap `kernel − 1` multiplies the current
    // input, tap 0 the input `kernel − 1` steps back), `bias [channels]`. The rolling state
    // `[B, kernel − 1, channels]` holds each sequence's previous inputs, oldest first (zeros at the
    // start). `y[t, c] = bias[c] + Σ_k w[k, c] · x[t − (kernel − 1) + k, c]`, where inputs before the
    // segment come from the state; then SiLU when `silu`. The state is advanced past the inputs.

    /// A segment of `seq` consecutive inputs `x [seq, channels]` of one sequence (state batch 1);
    /// writes `out [seq, channels]`.
    #[allow(clippy::too_many_arguments)]
    fn conv1d_prefill(&self, dims: ConvDims, seq: usize, x: &Self::Buf, w: &Self::Buf, bias: &Self::Buf, state: &mut Self::Buf, silu: bool, out: &mut Self::Buf) -> Result<()>;
    /// One input for each of `batch` sequences: `x [B, channels]` (row b uses state slot b);
    /// writes `out [B, channels]`.
    #[allow(clippy::too_many_arguments)]
    fn conv1d_step(&self, dims: ConvDims, batch: usize, x: &Self::Buf, w: &Self::Buf, bias: &Self::Buf, state: &mut Self::Buf, silu: bool, out: &mut Self::Buf) -> Result<()>;

    // ---- mLSTM --------------------------------------------------------------------------------
    /// One recurrent step for `batch` sequences: q, k [B, NH·DK], v [B, NH·DV], i, f [B, NH]
    /// (gate pre-activations, already soft-capped), state updated in place, h [B, NH·DV].
    #[allow(clippy::too_many_arguments)]
    fn mlstm_step(&self, dims: MlstmDims, batch: usize, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, i: &Self::Buf, f: &Self::Buf, state: &mut MlstmState<Self::Buf>, eps: f32, h: &mut Self::Buf) -> Result<()>;
    /// A segment of `seq` tokens of one sequence (batch 1), state carried in and out.
    #[allow(clippy::too_many_arguments)]
    fn mlstm_prefill(&self, kernel: MlstmKernel, dims: MlstmDims, seq: usize, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, i: &Self::Buf, f: &Self::Buf, state: &mut MlstmState<Self::Buf>, eps: f32, h: &mut Self::Buf) -> Result<()>;

    // ---- sLSTM --------------------------------------------------------------------------------
    // H = state.width = NH·DH channels, head-major; NH = state.heads. `gates` are the input-side
    // pre-activations (see [`SlstmGates`]). `r [NH, 4·DH, DH]`: per head h a DH → 4·DH map of the
    // previous output, rows gate-major (`r[h, g·DH + o, j]`, g = i, f, z, o). `bias [4·H]`, gate-major
    // (`bias[g·H + h·DH + d]`). Per step, per channel:
    //   raw_g = gates.g + Σ_j r[h, g·DH + o, j]·h_prev[h·DH + j] + bias_g
    //   lfm = m + logsigmoid(raw_f);  m' = raw_i if the sequence is fresh (its n all zero) else max(raw_i, lfm)
    //   i = min(e^(raw_i − m'), 1);  f = min(e^(lfm − m'), 1);  c' = f·c + i·tanh(raw_z);  n' = f·n + i
    //   h' = σ(raw_o)·c'/n'
    // State (c, n, m, h) is updated in place; `y` receives h' for every row.

    /// One step for `batch` sequences: gates `[B, H]`, row b uses state slot b; `y [B, H]`.
    fn slstm_step(&self, batch: usize, gates: SlstmGates<'_, Self::Buf>, r: &Self::Buf, bias: &Self::Buf, state: &mut SlstmState<Self::Buf>, y: &mut Self::Buf) -> Result<()>;
    /// `seq` consecutive steps of one sequence (state batch 1): gates `[seq, H]`, `y [seq, H]`.
    fn slstm_prefill(&self, seq: usize, gates: SlstmGates<'_, Self::Buf>, r: &Self::Buf, bias: &Self::Buf, state: &mut SlstmState<Self::Buf>, y: &mut Self::Buf) -> Result<()>;

    // ---- fusable compositions (defaults: the primitive ops above, in this order) ---------------
    // Model code calls these where several ops always go together; a backend may override one to
    // run it in fewer passes (the CUDA backend fuses each into one or two kernels for decode). The
    // defaults are the reference semantics: an override must compute the same values.

    /// `xn = rms_norm(x)`, then `outs[j] = xn · mats[j]ᵀ` for every matrix (projections that share
    /// one normalised input).
    #[allow(clippy::too_many_arguments)]
    fn norm_matmuls(&self, x: &Self::Buf, rows: usize, width: usize, weight: &Self::Buf, eps: f32, xn: &mut Self::Buf, mats: &[&Self::Mat], outs: &mut [&mut Self::Buf]) -> Result<()> {
        self.rms_norm(x, rows, width, weight, eps, xn)?;
        for (w, out) in mats.iter().zip(outs.iter_mut()) {
            self.matmul(xn, rows, w, out)?;
        }
        Ok(())
    }
    /// `acc += x · wᵀ` (a projection added to the residual stream); `w` has `out` rows; `tmp`
    /// (`[rows, out]`) is scratch whose contents are unspecified afterwards.
    fn matmul_add(&self, x: &Self::Buf, rows: usize, w: &Self::Mat, out: usize, tmp: &mut Self::Buf, acc: &mut Self::Buf) -> Result<()> {
        self.matmul(x, rows, w, tmp)?;
        self.add(acc, tmp, rows * out)
    }
    /// A gated feed-forward's first half: `xn = rms_norm(x)`, `out = act(xn·gateᵀ) ⊙ (xn·upᵀ)`
    /// (`gate`, `up`: `[ff, width]`); `g` and `u` (`[rows, ff]`) are scratch whose contents are
    /// unspecified afterwards.
    #[allow(clippy::too_many_arguments)]
    fn norm_gated_up(&self, x: &Self::Buf, rows: usize, width: usize, weight: &Self::Buf, eps: f32, xn: &mut Self::Buf, gate: &Self::Mat, up: &Self::Mat, ff: usize, act: Activation, g: &mut Self::Buf, u: &mut Self::Buf, out: &mut Self::Buf) -> Result<()> {
        self.rms_norm(x, rows, width, weight, eps, xn)?;
        self.matmul(xn, rows, gate, g)?;
        self.matmul(xn, rows, up, u)?;
        let len = rows * ff;
        match act {
            Activation::Silu => self.swiglu(g, u, len, out),
            a => self.gated_act(a, g, u, len, out),
        }
    }
    /// A gated feed-forward added to the residual stream (`norm_gated_up`, then `matmul_add` of
    /// `down` [`width`, ff]): `x += down(act(xn·gateᵀ) ⊙ (xn·upᵀ))`, `xn = rms_norm(x)`. Every buffer
    /// of `s` is scratch whose contents are unspecified afterwards, so a backend may keep the
    /// intermediates in the form its products take (the CUDA prefill: 16-bit only).
    #[allow(clippy::too_many_arguments)]
    fn norm_gated_ffn_add(&self, x: &mut Self::Buf, rows: usize, width: usize, weight: &Self::Buf, eps: f32, gate: &Self::Mat, up: &Self::Mat, down: &Self::Mat, ff: usize, act: Activation, s: FfnScratch<'_, Self::Buf>) -> Result<()> {
        norm_gated_ffn_add_composed(self, x, rows, width, weight, eps, gate, up, down, ff, act, s)
    }
    /// The gated mLSTM cell of an xlstm-large layer: ĩ, f̃ (`[rows, NH]`, raw projections) get `bias`
    /// and the soft `cap` (the default does this in place; afterwards both are scratch); the cell runs (`kernel` None: one batched step, `rows` = batch; Some: a
    /// prefill segment of `rows` tokens) writing `h`; then `hn = σ(o) ⊙ LayerNorm_head(h)·norm`
    /// (per head of DV values, eps `norm_eps`).
    #[allow(clippy::too_many_arguments)]
    fn mlstm_gated_cell(&self, kernel: Option<MlstmKernel>, dims: MlstmDims, rows: usize, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, o: &Self::Buf, i: &mut Self::Buf, f: &mut Self::Buf, ibias: &Self::Buf, fbias: &Self::Buf, cap: f32, state: &mut MlstmState<Self::Buf>, eps: f32, norm: &Self::Buf, norm_eps: f32, h: &mut Self::Buf, hn: &mut Self::Buf) -> Result<()> {
        self.bias_soft_cap(i, rows, dims.heads, Some(ibias), cap)?;
        self.bias_soft_cap(f, rows, dims.heads, Some(fbias), cap)?;
        match kernel {
            Some(kernel) => self.mlstm_prefill(kernel, dims, rows, q, k, v, i, f, state, eps, h)?,
            None => self.mlstm_step(dims, rows, q, k, v, i, f, state, eps, h)?,
        }
        let width = dims.heads * dims.dv;
        self.group_norm(h, rows, width, dims.dv, norm, None, norm_eps, hn)?;
        self.sigmoid_gate(o, hn, rows * width)
    }
    /// The mLSTM half of an xlstm-large layer added to the residual stream (`norm_matmuls` of the
    /// six projections, `mlstm_gated_cell`, then `matmul_add` of out_proj): `x += out_proj(σ(o) ⊙
    /// LN_head(mLSTM(q, k, v, ĩ, f̃)))` on `rms_norm(x)`; `kernel` as for `mlstm_gated_cell`. Every
    /// buffer of `s` is scratch whose contents are unspecified afterwards, so a backend may keep the
    /// intermediates in the form its kernels take (the CUDA prefill: q, k, v, o left in one merged
    /// product's output, 16-bit operands only).
    #[allow(clippy::too_many_arguments)]
    fn norm_mlstm_add(&self, x: &mut Self::Buf, rows: usize, width: usize, dims: MlstmDims, kernel: Option<MlstmKernel>, w: &MlstmHalf<'_, Self>, state: &mut MlstmState<Self::Buf>, s: MlstmScratch<'_, Self::Buf>) -> Result<()> {
        norm_mlstm_add_composed(self, x, rows, width, dims, kernel, w, state, s)
    }
    /// What `norm_mlstm_add` does to `state`, for prompt rows whose outputs nothing reads (a prompt's
    /// last block, where only the last row's output goes on to the head): afterwards `x`'s rows and
    /// every buffer of `s` are unspecified. A backend may skip the work that only the outputs need
    /// (the CUDA backend: q, o, the chunk outputs, the head norm and out_proj). Default:
    /// `norm_mlstm_add` itself.
    #[allow(clippy::too_many_arguments)]
    fn norm_mlstm_state(&self, x: &mut Self::Buf, rows: usize, width: usize, dims: MlstmDims, kernel: MlstmKernel, w: &MlstmHalf<'_, Self>, state: &mut MlstmState<Self::Buf>, s: MlstmScratch<'_, Self::Buf>) -> Result<()> {
        self.norm_mlstm_add(x, rows, width, dims, Some(kernel), w, state, s)
    }
    // ---- decode-step capture (optional) --------------------------------------------------------
    /// One decode step of one sequence through a whole xlstm-large stack: for each block in order,
    /// what `norm_mlstm_add` and `norm_gated_ffn_add` (SiLU) do to the row `x` [width], where the
    /// backend has that as one operation (the CUDA backend: one persistent kernel). Ok(false): it
    /// has not, nothing ran, and the caller runs the blocks one by one. With `head`, the same
    /// operation also picks the next token as `head_top1_chosen` would (Ok(false) where it cannot:
    /// the caller may ask again without the head).
    #[allow(clippy::too_many_arguments)]
    fn decode_stack(&self, _x: &mut Self::Buf, _width: usize, _dims: MlstmDims, _blocks: &[StackBlock<'_, Self>], _states: &mut [&mut MlstmState<Self::Buf>], _head: Option<StackHead<'_, Self>>) -> Result<bool> {
        Ok(false)
    }

    /// Brackets one decode step (`Model::step` calls it before running the layers): a backend may
    /// record the device work of a step once and replay it on later steps (the CUDA backend captures
    /// a CUDA graph). Default: nothing.
    fn step_begin(&self) -> Result<()> {
        Ok(())
    }
    /// Ends the step begun by `step_begin`. `Ok(true)` asks the caller to run the step again: the
    /// backend skipped this step's work (no recording matched the ops it was given, or an op could
    /// not be recorded) and left every buffer untouched. A backend settles within three attempts
    /// (the CUDA backend: replay, then record, then eager); `Model::step` gives up after three.
    fn step_end(&self) -> Result<bool> {
        Ok(false)
    }
    /// The device's own measured memory bandwidth, where it is not the host's (the bench's decode
    /// floor). Default: None (host memory).
    fn device_bandwidth(&self) -> Result<Option<crate::bench::Bandwidth>> {
        Ok(None)
    }
}

/// [`Backend::norm_gated_ffn_add`] as its two compositions, `norm_gated_up` then `matmul_add` (the
/// default, and an override's fallback for the cases it does not fuse).
#[allow(clippy::too_many_arguments)]
pub fn norm_gated_ffn_add_composed<B: Backend + ?Sized>(b: &B, x: &mut B::Buf, rows: usize, width: usize, weight: &B::Buf, eps: f32, gate: &B::Mat, up: &B::Mat, down: &B::Mat, ff: usize, act: Activation, s: FfnScratch<'_, B::Buf>) -> Result<()> {
    b.norm_gated_up(x, rows, width, weight, eps, s.xn, gate, up, ff, act, s.g, s.u, s.a)?;
    b.matmul_add(s.a, rows, down, width, s.y, x)
}

/// [`Backend::norm_mlstm_add`] as its three compositions (the default, and an override's fallback).
#[allow(clippy::too_many_arguments)]
pub fn norm_mlstm_add_composed<B: Backend>(b: &B, x: &mut B::Buf, rows: usize, width: usize, dims: MlstmDims, kernel: Option<MlstmKernel>, w: &MlstmHalf<'_, B>, state: &mut MlstmState<B::Buf>, s: MlstmScratch<'_, B::Buf>) -> Result<()> {
    let [q, k, v, o, ig, fg] = w.proj;
    b.norm_matmuls(x, rows, width, w.norm, w.eps, s.xn, &[q, k, v, o, ig, fg], &mut [&mut *s.q, &mut *s.k, &mut *s.v, &mut *s.o, &mut *s.i, &mut *s.f])?;
    b.mlstm_gated_cell(kernel, dims, rows, s.q, s.k, s.v, s.o, s.i, s.f, w.ibias, w.fbias, w.gate_cap, state, w.cell_eps, w.head_norm, w.eps, s.h, s.hn)?;
    b.matmul_add(s.hn, rows, w.out_proj, width, s.y, x)
}

/// The `k` largest values of `x` as (index, value), best first (ties: lower index first).
/// The LM head with the selection on the host: matmul + soft-cap on the backend, the logits
/// downloaded, `top_k_of` per row (`Backend::head_top_k`'s default, and a device selection's fallback).
#[allow(clippy::too_many_arguments)]
pub fn head_top_k_on_host<B: Backend + ?Sized>(b: &B, x: &B::Buf, rows: usize, w: &B::Mat, n: usize, cap: f32, k: usize, scratch: &mut B::Buf) -> Result<Vec<Vec<(u32, f32)>>> {
    b.matmul(x, rows, w, scratch)?;
    b.bias_soft_cap(scratch, rows, n, None, cap)?;
    let host = b.download(scratch, rows * n)?;
    Ok(host.chunks(n).map(|r| top_k_of(r, k)).collect())
}

pub fn top_k_of(x: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    let by = |a: &u32, b: &u32| x[*b as usize].total_cmp(&x[*a as usize]).then(a.cmp(b));
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by);
    idx.into_iter().map(|i| (i, x[i as usize])).collect()
}
