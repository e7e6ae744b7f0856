//! CUDA backend of the xLSTM engine: [`CudaBackend`] implements `xlstm_core::Backend`.
//!
//! - Libraries are loaded at run time (cudarc `dynamic-loading`): a binary built without a CUDA
//!   toolkit starts anywhere; [`CudaBackend::new`] checks driver, GPU, NVRTC and cuBLAS first and
//!   names what is missing ([`probe`]).
//! - Kernels are CUDA C in `kernels/*.cu` (one file per op family, see each header), compiled by
//!   NVRTC at start (PTX cached on disk, see `kernels.rs`).
//! - Products: a custom GEMV for 1–2 rows (1–4 of f32 weights; decode: weights read once at full bandwidth, several
//!   matrices and the RMSNorm / residual add / gated activation fused into one launch), cuBLAS for more
//!   rows (bf16/f16 weights × activations converted to the same 16-bit type, f32 accumulation and
//!   output; f32 weights through SGEMM).
//! - State and activations are f32. The decode step is captured in a CUDA graph and replayed
//!   (`capture.rs`); greedy decoding can keep the chosen token on the device (`greedy.rs`).
mod capture;
mod device;
mod greedy;
mod lt;
mod stack;
pub mod kernels;

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys as cb;
use cudarc::driver::result as dres;
use cudarc::driver::sys::CUdeviceptr;
use xlstm_core::backend::{
    norm_gated_ffn_add_composed, norm_mlstm_add_composed, shapes, Activation, Backend, ConvDims, FfnScratch, HeadwiseDims, MlstmDims, MlstmHalf, MlstmKernel, MlstmScratch, MlstmState, SlstmGates,
    SlstmState, StackBlock, StackHead, CHOSEN_ID,
};
use xlstm_core::bench::Bandwidth;
use xlstm_core::tensor::{DType, HostData, HostTensor};
use xlstm_core::{Error, Result};

use device::{drv, Dev, KArgs, CHUNK_BF16_STAGE, CHUNK_STATE_STAGE, GEMV_SMEM};
pub use device::{ChunkKernels, ChunkPhase};

/// Checks that a CUDA device can be used here: driver library, driver initialisation and version,
/// a GPU, NVRTC and cuBLAS. The error names the first thing missing.
pub fn probe() -> std::result::Result<(), String> {
    device::probe()
}

/// An f32 buffer in device memory.
pub struct CudaBuf {
    ptr: CUdeviceptr,
    len: usize,
    dev: Arc<Dev>,
}

impl CudaBuf {
    /// The raw device pointer (for tests and tools).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        self.dev.free(self.ptr);
    }
}

/// A weight matrix `[rows, cols]` in device memory, in f32, bf16 or f16.
pub struct CudaMat {
    ptr: CUdeviceptr,
    rows: usize,
    cols: usize,
    dtype: DType,
    /// The allocation the matrix lives in (a slab shared with the matrices loaded next to it).
    _mem: Arc<DevMem>,
}

/// A device allocation freed when the last matrix in it is dropped.
struct DevMem {
    ptr: CUdeviceptr,
    dev: Arc<Dev>,
}

impl Drop for DevMem {
    fn drop(&mut self) {
        self.dev.free(self.ptr);
    }
}

/// Matrices are carved one after another out of shared slabs, so consecutive loads (q, k, v, o;
/// gate, up) are adjacent in memory and one cuBLAS call can cover them. Without an announced total
/// (`expect_matrix_bytes`) slabs are SLAB bytes and larger matrices get their own allocation.
const SLAB: usize = 1 << 30;
const SLAB_MAX_MAT: usize = 256 << 20;

#[derive(Default)]
struct Slab {
    mem: Option<Arc<DevMem>>,
    used: usize,
    size: usize,
    /// Bytes of matrices the model announced (`expect_matrix_bytes`): the next pool is made that
    /// large, so every matrix of the model lies in one allocation without slack.
    announced: usize,
}

impl CudaMat {
    fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }
    /// `next` starts right where `self` ends, with the same dtype and width.
    fn adjacent(&self, next: &CudaMat) -> bool {
        next.dtype == self.dtype && next.cols == self.cols && next.ptr == self.ptr + self.bytes() as u64
    }
}

fn dt_code(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// The CUDA backend: one GPU, one stream.
#[derive(Clone)]
pub struct CudaBackend {
    dev: Arc<Dev>,
    slab: Arc<std::sync::Mutex<Slab>>,
    /// The fused LM head's selections (ids, then values), reused across steps.
    topk_out: Arc<std::sync::Mutex<Option<CudaBuf>>>,
    /// Greedy decoding kept on the device: its picks and their read-back (greedy.rs).
    chosen: Arc<std::sync::Mutex<greedy::Chosen>>,
    /// Deferred updates of C a new mLSTM state makes room for (kernels/mlstm.cu: a step reads C
    /// and writes it once per cap + 1 steps); 0: every step writes C.
    pending_cap: Arc<std::sync::atomic::AtomicUsize>,
}

/// `pending_cap`'s default (`XLSTM_CUDA_PENDING=N` sets it, 0 switches deferral off): C written
/// every 9th step, the most the kernel takes (batch 64: 94.4 µs a cell step against 96.0 with 7).
const PENDING_CAP: usize = 8;
/// The most entries a ring holds (`PEND_MAX` in kernels/mlstm.cu).
const PENDING_CAP_MAX: usize = 8;

/// Largest k the device selection takes (more: the logits come back and the host selects).
const TOP_K_MAX: usize = 256;
/// Floats of gate terms per chunk and head (`CG_STRIDE` in kernels/mlstm_chunk.cu).
const CHUNK_GATE_STRIDE: usize = 328;

// Op codes for capture signatures.
mod opc {
    pub const COPY: u64 = 1;
    pub const EMBED: u64 = 2;
    pub const MATMUL: u64 = 3;
    pub const RMS: u64 = 4;
    pub const GN: u64 = 5;
    pub const CAP: u64 = 6;
    pub const ADD: u64 = 7;
    pub const GATED: u64 = 8;
    pub const SIG: u64 = 9;
    pub const SCALED: u64 = 10;
    pub const COLS: u64 = 11;
    pub const HEADWISE: u64 = 12;
    pub const CONV_SEQ: u64 = 13;
    pub const CONV_STEP: u64 = 14;
    pub const MSTEP: u64 = 15;
    pub const MPREFILL: u64 = 16;
    pub const SLSTM: u64 = 17;
    pub const NORM_MM: u64 = 18;
    pub const MM_ADD: u64 = 19;
    pub const GATED_UP: u64 = 20;
    pub const MCELL: u64 = 21;
    pub const TOPK: u64 = 22;
    pub const FFN: u64 = 23;
    pub const MLSTM_ADD: u64 = 24;
    pub const SETTLE: u64 = 25;
    pub const STACK: u64 = 26;
    pub const MLSTM_STATE: u64 = 27;

    /// The op's name, for `CudaBackend::op_times`.
    pub fn name(code: u64) -> &'static str {
        const NAMES: [&str; 28] = [
            "?", "copy", "embed", "matmul", "rms_norm", "group_norm", "bias_soft_cap", "add", "gated_act", "sigmoid_gate", "scaled_add",
            "copy_cols", "headwise", "conv1d_prefill", "conv1d_step", "mlstm_step", "mlstm_prefill", "slstm", "norm_matmuls", "matmul_add",
            "norm_gated_up", "mlstm_gated_cell", "head_top_k", "norm_gated_ffn_add", "norm_mlstm_add", "mlstm_settle", "decode_stack",
            "norm_mlstm_state",
        ];
        NAMES.get(code as usize).copied().unwrap_or("?")
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvSeg {
    w: u64,
    w2: u64,
    out: u64,
    n: i32,
    dt: i32,
    mode: i32,
    ld: i32,
    block0: i32,
    rpw: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvArgs {
    seg: [GemvSeg; 8],
    x: u64,
    norm_w: u64,
    xn_out: u64,
    nseg: i32,
    k: i32,
    eps: f32,
    act: i32,
}

/// Where a decode step's q, k, v, o rows lie (row strides, in values) and the dtype the fused step
/// writes hn in (kernels/mlstm.cu).
#[derive(Clone, Copy)]
struct StepLayout {
    ld: [usize; 4],
    hn: DType,
}

impl StepLayout {
    /// Each in its own buffer ([rows, NH·DK] or [rows, NH·DV]); hn in f32.
    fn packed(d: MlstmDims) -> Self {
        let (qk, vw) = (d.heads * d.dk, d.heads * d.dv);
        StepLayout { ld: [qk, qk, vw, vw], hn: DType::F32 }
    }
}

/// The element types a state's C may have here (`Backend::state_dtypes`): f32, or bf16 (the `_c16`
/// step kernels; the chunkwise prefill widens it around its kernels).
const STATE_DTYPES: &[DType] = &[DType::F32, DType::BF16];

/// An mLSTM state's device pointers, whether its C is bf16 (`MlstmState::c_dtype`), and its
/// deferred updates' room (0 when none) and capacity.
#[derive(Clone, Copy)]
struct StatePtrs {
    c: CUdeviceptr,
    n: CUdeviceptr,
    m: CUdeviceptr,
    c16: bool,
    pend: CUdeviceptr,
    pcap: usize,
}

impl StatePtrs {
    fn of(s: &MlstmState<CudaBuf>) -> Self {
        let units = s.m.len;
        let (pend, pcap) = match &s.pending {
            Some(p) if units > 0 => (p.ptr, pending_cap_of(p.len / units, s.dims)),
            _ => (0, 0),
        };
        StatePtrs { c: s.c.ptr, n: s.n.ptr, m: s.m.ptr, c16: s.c_dtype != DType::F32, pend, pcap }
    }
}

/// 4-byte words of deferred-update room per unit for `cap` entries (kernels/mlstm.cu: count, a,
/// then e, k, v per entry).
fn pending_unit_words(cap: usize, d: MlstmDims) -> usize {
    2 + cap * (1 + d.dk + d.dv)
}

/// The capacity a unit's `words` of room hold (inverse of `pending_unit_words`).
fn pending_cap_of(words: usize, d: MlstmDims) -> usize {
    words.saturating_sub(2) / (1 + d.dk + d.dv)
}

/// Dynamic shared memory of a step kernel: q, k, n', and with deferred updates a full ring's
/// factors × k for the write-back (from the next 16-byte boundary).
fn step_smem(d: MlstmDims, pend: bool) -> usize {
    4 * if pend { (3 * d.dk).next_multiple_of(4) + PENDING_CAP_MAX * d.dk } else { 3 * d.dk }
}

/// Without opting in, a kernel gets 48 KiB of shared memory; the step kernels' static arrays take
/// up to ~4.3 KiB of it, the rest is for `step_smem`.
const STEP_SMEM_MAX: usize = 40 * 1024;

/// `skinny_mma`'s argument (kernels/gemv.cu `SkinnyArgs`).
#[repr(C)]
#[repr(align(64))]
struct SkinnyArgs {
    wmap: cudarc::driver::sys::CUtensorMap,
    xmap: cudarc::driver::sys::CUtensorMap,
    out: u64,
    parts: u64,
    counters: u64,
    m: i32,
    n: i32,
    k: i32,
    ldo: i32,
    splits: i32,
    beta: f32,
    gated_out: u64,
    gated: i32,
    act: i32,
    ff: i32,
    out_dt: i32,
}

impl SkinnyArgs {
    /// The product of `rows` rows of x (its tensor map `xmap`) and `w` (`wmap`); nothing written
    /// yet (the caller sets the output: `out` with `ldo`, or the gated one).
    fn new(wmap: cudarc::driver::sys::CUtensorMap, xmap: cudarc::driver::sys::CUtensorMap, rows: usize, w: &MatView) -> Self {
        SkinnyArgs {
            wmap, xmap, out: 0, parts: 0, counters: 0, m: rows as i32, n: w.rows as i32, k: w.cols as i32, ldo: 0, splits: 1, beta: 0.0,
            gated_out: 0, gated: 0, act: 0, ff: 0, out_dt: 0,
        }
    }
}

/// A TMA tensor map of a row-major bf16 matrix [rows, cols] read in tiles of `box_rows` × 64
/// values with the 128-byte swizzle (skinny_mma's shared-memory layout).
fn tile_map(ptr: CUdeviceptr, rows: usize, cols: usize, box_rows: usize) -> Result<cudarc::driver::sys::CUtensorMap> {
    use cudarc::driver::sys as s;
    let mut map = s::CUtensorMap { opaque: [0; 16] };
    let (dims, strides, boxd, elem) = ([cols as u64, rows as u64], [(cols * 2) as u64], [64u32, box_rows as u32], [1u32, 1]);
    // SAFETY: plain descriptors of a live allocation; the map is written in place.
    let r = unsafe {
        s::cuTensorMapEncodeTiled(
            &mut map, s::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ptr as *mut c_void, dims.as_ptr(), strides.as_ptr(), boxd.as_ptr(),
            elem.as_ptr(), s::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE, s::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            s::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B, s::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().map_err(|e| drv("tensor map", e))?;
    Ok(map)
}

/// `split_cols` (kernels/elementwise.cu): one output's column block.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SplitOut {
    dst: u64,
    off: i32,
    width: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SplitArgs {
    out: [SplitOut; 8],
    src: u64,
    ld: i32,
    rows: i32,
    nout: i32,
    vec: i32,
}

/// A matrix (or several adjacent ones) as cuBLAS sees it.
#[derive(Clone, Copy)]
struct MatView {
    ptr: CUdeviceptr,
    rows: usize,
    cols: usize,
    dtype: DType,
}

/// One output of a GEMV launch: matrix, optional partner (gated pair), output pointer, epilogue.
struct Seg<'a> {
    w: &'a CudaMat,
    w2: Option<&'a CudaMat>,
    out: CUdeviceptr,
    mode: i32,
}

fn grid1(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1)
}

fn check(op: &str, what: &str, have: usize, need: usize) -> Result<()> {
    shapes::len("cuda", op, what, have, need)
}

fn act_code(a: Activation) -> usize {
    a.code() as usize
}

impl CudaBackend {
    /// Opens GPU `ordinal`: checks the driver and libraries, creates the context and stream,
    /// compiles (or loads cached) kernels and sets up cuBLAS. Never panics on a machine without a
    /// GPU: every missing piece is an `Error::Device` that names it.
    pub fn new(ordinal: usize) -> Result<Self> {
        match std::panic::catch_unwind(|| Dev::new(ordinal)) {
            Ok(r) => {
                let dev = Arc::new(r?);
                let chosen = Arc::new(std::sync::Mutex::new(greedy::Chosen::new(dev.clone())));
                let cap = std::env::var("XLSTM_CUDA_PENDING").ok().and_then(|v| v.parse().ok()).unwrap_or(PENDING_CAP);
                let pending_cap = Arc::new(cap.min(PENDING_CAP_MAX).into());
                Ok(CudaBackend { dev, slab: Arc::default(), topk_out: Arc::default(), chosen, pending_cap })
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::Device(format!("cuda unavailable: {msg}")))
            }
        }
    }

    /// Device name and compute capability.
    pub fn device_name(&self) -> String {
        format!("{} (sm_{}{}, {} SMs)", self.dev.name, self.dev.cc.0, self.dev.cc.1, self.dev.sms)
    }

    /// Switches decode-step graph capture on or off (default on; `XLSTM_CUDA_GRAPHS=0` starts off);
    /// switching on also forgets earlier failures.
    pub fn set_graphs(&self, on: bool) {
        self.dev.cap.lock().expect("capture lock").set_enabled(on);
    }

    /// Sets how many updates of C the mLSTM states created from now on may defer (0: none, every
    /// step writes C; at most 8); states made earlier keep theirs. Returns the previous setting.
    pub fn set_pending_cap(&self, cap: usize) -> usize {
        self.pending_cap.swap(cap.min(PENDING_CAP_MAX), std::sync::atomic::Ordering::Relaxed)
    }

    /// (replayed, recorded, eager) decode steps so far.
    pub fn graph_stats(&self) -> (u64, u64, u64) {
        let c = self.dev.cap.lock().expect("capture lock");
        (c.replays, c.records, c.eager)
    }

    /// The kernel timing trace gathered since the last call, when kernels were built with it
    /// (`XLSTM_CUDA_TRACE=1`; records as common.cuh describes them). Profiling only.
    pub fn trace_take(&self) -> Result<Option<Vec<[u64; 8]>>> {
        self.dev.bind()?;
        self.dev.trace_take()
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.bind()?;
        self.dev.sync()
    }

    fn buf(&self, len: usize) -> Result<CudaBuf> {
        let ptr = self.dev.alloc(len * 4)?;
        Ok(CudaBuf { ptr, len, dev: self.dev.clone() })
    }

    /// Runs `f` unless a graph replay covers this op (see capture.rs).
    /// Turns per-op timing on or off (profiling: every op is then waited for, so only for
    /// measurements outside decode graphs); `op_times` reads what was gathered.
    pub fn set_op_timing(&self, on: bool) {
        let mut t = self.dev.op_times.lock().expect("op times lock");
        *t = on.then(std::collections::BTreeMap::new);
    }

    /// Sets which chunkwise-prefill kernels run (profiling and comparisons; the defaults come
    /// from `XLSTM_CUDA_CHUNK_TC` / `XLSTM_CUDA_CHUNK_ONLY`, see [`ChunkKernels`]).
    pub fn set_chunk_kernels(&self, choice: ChunkKernels) {
        *self.dev.chunk_kernels.lock().expect("chunk kernels lock") = choice;
    }

    /// Sets the stages of the tensor-core chunk-states kernels' shared-memory ring (tests: the
    /// default is the most the device takes, 3 on sm_80 / sm_90); returns the number now in use
    /// (clamped to 2 ..= that).
    pub fn set_chunk_states_stages(&self, stages: usize) -> usize {
        let n = stages.clamp(2, self.dev.max_chunk_stages);
        *self.dev.chunk_stages.lock().expect("chunk stages lock") = n;
        n
    }

    /// (op, calls, seconds) for every op timed since `set_op_timing(true)`, longest first.
    pub fn op_times(&self) -> Vec<(&'static str, u64, f64)> {
        let t = self.dev.op_times.lock().expect("op times lock");
        let mut v: Vec<_> = t.iter().flatten().map(|(&code, &(n, s))| (opc::name(code), n, s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    fn op(&self, words: &[u64], f: impl FnOnce(&Dev) -> Result<()>) -> Result<()> {
        self.dev.bind()?;
        let run = self.dev.cap.lock().expect("capture lock").enter(capture::sig(words))?;
        self.dev.next_op();
        if !run {
            return Ok(());
        }
        let timing = self.dev.op_times.lock().expect("op times lock").is_some();
        if timing {
            self.dev.sync()?;
            let t = std::time::Instant::now();
            let r = f(&self.dev).and_then(|_| self.dev.sync());
            let mut times = self.dev.op_times.lock().expect("op times lock");
            if let Some(e) = times.as_mut().map(|m| m.entry(words[0]).or_insert((0, 0.0))) {
                e.0 += 1;
                e.1 += t.elapsed().as_secs_f64();
            }
            return r;
        }
        let r = f(&self.dev);
        if r.is_err() {
            self.dev.cap.lock().expect("capture lock").fail();
        }
        r
    }

    fn ew(&self, dev: &Dev, f: cudarc::driver::sys::CUfunction, n: usize, args: &mut KArgs) -> Result<()> {
        dev.launch(f, grid1(n), 256, 0, args)
    }

    /// Whether the GEMV takes a product of `rows` rows: up to 4 rows of f32 weights, up to 2 of
    /// 16-bit ones. Each 16-byte chunk of 16-bit weights (8 values) meets 8 staged x values per row,
    /// read from shared memory: at 3–4 rows that is 6–8 times the weight bytes, which shared memory
    /// cannot serve at the weights' rate (batch 3 / 4 of the 7B shape: 6.27 / 7.74 ms per step on
    /// the GEMV, 5.01–5.07 / 5.21 through cuBLASLt; batch 2: 4.77–4.78 against 4.79–4.80).
    fn gemv_fits(rows: usize, w: &CudaMat) -> bool {
        let most = if w.dtype == DType::F32 { 4 } else { 2 };
        (1..=most).contains(&rows) && rows * w.cols * 4 <= GEMV_SMEM && w.cols > 0
    }

    /// One GEMV launch over `segs` (all with `k` inputs), optional RMS-norm prologue.
    #[allow(clippy::too_many_arguments)]
    fn gemv(&self, dev: &Dev, rows: usize, k: usize, x: CUdeviceptr, norm: Option<(CUdeviceptr, f32)>, xn_out: CUdeviceptr, segs: &[Seg], act: usize) -> Result<()> {
        // Rows per warp: about one wave of blocks (x is staged once per block), the same bytes per
        // warp in every segment (f32 rows and gated pairs are wider), a small segment spread over
        // all 8 warps of its block.
        let smem = rows * k * 4;
        let per_sm = ((227 * 1024) / (smem + 1024)).clamp(1, 2); // 2 blocks/SM by registers (128 each)
        let target = dev.sms.max(1) as usize * per_sm;
        let row_bytes = |s: &Seg| k * s.w.dtype.size() * if s.w2.is_some() { 2 } else { 1 };
        let total: usize = segs.iter().map(|s| s.w.rows * row_bytes(s)).sum();
        let per_warp = total.div_ceil(8 * target).max(1);
        let mut a = GemvArgs { x, norm_w: norm.map_or(0, |n| n.0), xn_out, nseg: segs.len() as i32, k: k as i32, eps: norm.map_or(0.0, |n| n.1), act: act as i32, ..Default::default() };
        let mut blocks = 0usize;
        for (i, s) in segs.iter().enumerate() {
            let rpw = per_warp.div_ceil(row_bytes(s)).min(s.w.rows.div_ceil(8)).max(1);
            a.seg[i] = GemvSeg {
                w: s.w.ptr,
                w2: s.w2.map_or(0, |m| m.ptr),
                out: s.out,
                n: s.w.rows as i32,
                dt: dt_code(s.w.dtype) as i32,
                mode: s.mode,
                ld: s.w.rows as i32,
                block0: blocks as i32,
                rpw: rpw as i32,
            };
            blocks += s.w.rows.div_ceil(8 * rpw);
        }
        dev.launch_struct(dev.f.gemv[rows - 1], (blocks as u32, 1, 1), 256, smem as u32, &mut a, true)
    }

    /// The LM head on the device: the soft-capped logits of `rows` rows into `scratch`, then the `k`
    /// best of each row by k rounds of a block-wide maximum (kernels/topk.cu) into `out`: ids
    /// [rows·k] (u32 bits), then their logits [rows·k].
    #[allow(clippy::too_many_arguments)]
    fn head_select(&self, x: &CudaBuf, rows: usize, w: &CudaMat, n: usize, cap: f32, k: usize, scratch: &mut CudaBuf, out: CUdeviceptr) -> Result<()> {
        self.matmul(x, rows, w, scratch)?;
        self.bias_soft_cap(scratch, rows, n, None, cap)?;
        let sp = scratch.ptr;
        self.op(&[opc::TOPK, sp, rows as u64, n as u64, k as u64, out], |dev| {
            let mut a = KArgs::new();
            a.p(sp).i(n).i(k).p(out).p(out + (4 * rows * k) as u64);
            dev.launch(dev.f.topk_rows, (rows as u32, 1, 1), 1024, 0, &mut a)
        })
    }

    /// `embed` of the ids the last `head_top1_chosen` chose (every id `CHOSEN_ID`): read on the
    /// device, no host copy.
    fn embed_chosen(&self, table: &CudaMat, ids: &[u32], out: &mut CudaBuf) -> Result<()> {
        if ids.iter().any(|&t| t != CHOSEN_ID) {
            return Err(Error::Input("embed: CHOSEN_ID stands for every row of a step or for none".into()));
        }
        let Some(dids) = self.chosen.lock().expect("chosen ids lock").ids_for(ids.len()) else {
            return Err(Error::Input(format!("embed: {} ids stand for the device's choice (CHOSEN_ID), but no step chose that many on the device yet", ids.len())));
        };
        self.dev.bind()?;
        let (d, outp) = (table.cols, out.ptr);
        self.op(&[opc::EMBED, table.ptr, ids.len() as u64, outp, dids], |dev| {
            let mut a = KArgs::new();
            a.p(table.ptr).i(dt_code(table.dtype)).p(dids).i(d).p(outp);
            dev.launch(dev.f.embed, (d.div_ceil(256).min(64) as u32, ids.len() as u32, 1), 256, 0, &mut a)
        })
    }

    /// A 16-bit copy of `x [n]` (the type of `dt`) in the scratch; returns its pointer.
    fn half_copy(&self, dev: &Dev, x: CUdeviceptr, n: usize, dt: DType) -> Result<CUdeviceptr> {
        if let Some(p) = dev.half_copy_of(x, n, dt) {
            return Ok(p);
        }
        let p = dev.half_scratch(n, None)?;
        self.convert(dev, dev.f.to_half, x, p, n, dt)?;
        Ok(p)
    }

    /// `n` values from `src` into `dst` through `to_half` (f32 → `dt`) or `from_half` (`dt` → f32).
    fn convert(&self, dev: &Dev, f: cudarc::driver::sys::CUfunction, src: CUdeviceptr, dst: CUdeviceptr, n: usize, dt: DType) -> Result<()> {
        let mut a = KArgs::new();
        a.p(src).p(dst).i(n).i(dt_code(dt));
        self.ew(dev, f, n, &mut a)
    }

    /// `out[rows, w.rows] = x · wᵀ (+ beta·out)` through cuBLAS. `xh`: the 16-bit copy of x when w
    /// is 16-bit (made here when None).
    fn gemm(&self, dev: &Dev, rows: usize, w: &CudaMat, x: CUdeviceptr, xh: Option<CUdeviceptr>, out: CUdeviceptr, beta: f32) -> Result<()> {
        self.gemm_view(dev, rows, MatView { ptr: w.ptr, rows: w.rows, cols: w.cols, dtype: w.dtype }, x, xh, out, beta, false)
    }

    /// Products for `mats` (all `[·, width]`) into `outs`, through cuBLAS; runs of matrices that lie
    /// next to each other in memory go through one call (into the `wide` scratch, then split). (For
    /// a 2,048-token prompt, separate products straight into the outputs measured the same.)
    fn gemm_group(&self, dev: &Dev, rows: usize, mats: &[&CudaMat], x: CUdeviceptr, xh: Option<CUdeviceptr>, outs: &[CUdeviceptr]) -> Result<()> {
        let mut j = 0;
        while j < mats.len() {
            let mut e = j + 1;
            while e < mats.len() && e - j < 8 && mats[e - 1].adjacent(mats[e]) {
                e += 1;
            }
            let h = xh.filter(|_| mats[j].dtype != DType::F32);
            let pair = MatView { ptr: mats[j].ptr, rows: mats[j].rows + mats.get(j + 1).map_or(0, |m| m.rows), cols: mats[j].cols, dtype: mats[j].dtype };
            if e - j == 2 && Self::dots_fit(rows, &pair, x) {
                // two adjacent f32 matrices (ĩ and f̃), each straight into its output
                self.dots(dev, rows, &pair, x, (outs[j], mats[j].rows), outs[j + 1], 0.0)?;
            } else if e - j == 1 {
                self.gemm(dev, rows, mats[j], x, h, outs[j], 0.0)?;
            } else {
                let total: usize = mats[j..e].iter().map(|m| m.rows).sum();
                let wide = dev.scratch(|s| &mut s.wide, rows * total * 4, false)?;
                let view = MatView { ptr: mats[j].ptr, rows: total, cols: mats[j].cols, dtype: mats[j].dtype };
                self.gemm_view(dev, rows, view, x, h, wide, 0.0, false)?;
                // the column blocks into their outputs, one launch (a decode batch's are a few KB:
                // a launch each would cost more than the copying)
                let mut a = SplitArgs { src: wide, ld: total as i32, rows: rows as i32, nout: (e - j) as i32, ..Default::default() };
                let (mut off, mut vec) = (0, total % 4 == 0 && wide % 16 == 0);
                for (i, (m, &o)) in mats[j..e].iter().zip(&outs[j..e]).enumerate() {
                    a.out[i] = SplitOut { dst: o, off: off as i32, width: m.rows as i32 };
                    vec &= (off | m.rows) % 4 == 0 && o % 16 == 0;
                    off += m.rows;
                }
                a.vec = vec as i32;
                let per_block = if vec { 4 * 256 } else { 256 };
                dev.launch_struct(dev.f.split_cols, (rows as u32, total.div_ceil(per_block) as u32, 1), 256, 0, &mut a, false)?;
            }
            j = e;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    /// `half_out`: the product is written in the weights' 16-bit dtype (f32 accumulation) rather
    /// than f32 (16-bit weights only).
    #[allow(clippy::too_many_arguments)]
    fn gemm_view(&self, dev: &Dev, rows: usize, w: MatView, x: CUdeviceptr, xh: Option<CUdeviceptr>, out: CUdeviceptr, beta: f32, half_out: bool) -> Result<()> {
        let (n, k, m) = (w.rows as i32, w.cols as i32, rows as i32);
        let alpha = 1f32;
        // SAFETY: pointers are live device buffers of the checked sizes; the handle is bound to our
        // stream; alpha/beta are host scalars (the default pointer mode).
        unsafe {
            match w.dtype {
                DType::F32 if Self::dots_fit(rows, &w, x) && !half_out => self.dots(dev, rows, &w, x, (out, w.rows), 0, beta),
                DType::F32 => device::blas_ok(
                    "sgemm",
                    cb::cublasSgemm_v2(
                        dev.blas, cb::cublasOperation_t::CUBLAS_OP_T, cb::cublasOperation_t::CUBLAS_OP_N, n, m, k, &alpha,
                        w.ptr as *const f32, k, x as *const f32, k, &beta, out as *mut f32, n,
                    ),
                ),
                dt => {
                    let xh = match xh {
                        Some(p) => p,
                        None => self.half_copy(dev, x, rows * w.cols, dt)?,
                    };
                    if out % 16 == 0 && Self::skinny_fits(dev, rows, &w, half_out, xh) {
                        return self.skinny(dev, rows, &w, xh, out, beta);
                    }
                    if let Some(lt) = &dev.lt {
                        let p = lt::Product { m: rows, n: w.rows, k: w.cols, dtype: dt, out16: half_out, w: w.ptr, x: xh, out, beta };
                        if !lt.knows(&p) {
                            // choosing the algorithm runs the stream: not while recording
                            dev.cap.lock().expect("capture lock").unrecordable()?;
                        }
                        return lt.run(dev.stream, &p);
                    }
                    let ty = if dt == DType::BF16 { cb::cudaDataType::CUDA_R_16BF } else { cb::cudaDataType::CUDA_R_16F };
                    device::blas_ok(
                        "gemm",
                        cb::cublasGemmEx(
                            dev.blas, cb::cublasOperation_t::CUBLAS_OP_T, cb::cublasOperation_t::CUBLAS_OP_N, n, m, k,
                            &alpha as *const f32 as *const c_void, w.ptr as *const c_void, ty, k, xh as *const c_void, ty, k,
                            &beta as *const f32 as *const c_void, out as *mut c_void, if half_out { ty } else { cb::cudaDataType::CUDA_R_32F }, n,
                            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F, cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                        ),
                    )
                }
            }
        }
    }

    /// Whether a bf16 product of a decode batch goes through skinny_mma (kernels/gemv.cu) rather
    /// than cuBLASLt: 3–16 rows (fewer take the GEMV; from 32 on it lost to cuBLASLt), f32 output,
    /// K and N multiples of 64, 16-byte aligned operands, sm_90 (wgmma), the setting on. (An f32
    /// output is also stored four values at a time when K is split: 16-byte aligned, the caller's
    /// check.)
    fn skinny_fits(dev: &Dev, rows: usize, w: &MatView, half_out: bool, xh: CUdeviceptr) -> bool {
        dev.skinny && w.dtype == DType::BF16 && !half_out && (3..=16).contains(&rows) && w.cols % 64 == 0 && w.rows % 64 == 0 && (w.ptr | xh) % 16 == 0
    }

    /// out [rows, N] (+)= xh [rows, K] · Wᵀ on tensor cores (skinny_mma): a block a 64-row column
    /// tile, K split so that there are about two blocks an SM.
    fn skinny(&self, dev: &Dev, rows: usize, w: &MatView, xh: CUdeviceptr, out: CUdeviceptr, beta: f32) -> Result<()> {
        let (tiles, steps, sms) = (w.rows / 64, w.cols / 64, dev.sms as usize);
        let splits = if tiles >= sms { 1 } else { (2 * sms / tiles).clamp(1, (steps / 2).clamp(1, 8)) };
        let (counters, parts) = if splits > 1 {
            (dev.scratch(|s| &mut s.sk_counters, tiles * 4, true)?, dev.scratch(|s| &mut s.sk_parts, splits * rows * w.rows * 4, false)?)
        } else {
            (0, 0)
        };
        let (wmap, xmap) = (tile_map(w.ptr, w.rows, w.cols, 64)?, tile_map(xh, rows, w.cols, 16)?);
        let mut a = SkinnyArgs { out, parts, counters, ldo: w.rows as i32, splits: splits as i32, beta, ..SkinnyArgs::new(wmap, xmap, rows, w) };
        dev.launch_struct(dev.f.skinny_mma, (tiles as u32, splits as u32, 1), 128, device::SKINNY_SMEM as u32, &mut a, false)
    }

    /// A FFN's [gate; up] product (`gate_up`: the two stacked, 2·ff rows) and its activation in one
    /// skinny_mma launch: act(g)·u written in bf16 to `out16` [rows, ff]; a block 32 gate rows and
    /// the same up rows. Same conditions as `skinny_fits`, and ff % 32 == 0.
    #[allow(clippy::too_many_arguments)]
    fn skinny_gated(&self, dev: &Dev, rows: usize, gate_up: &MatView, xh: CUdeviceptr, out16: CUdeviceptr, ff: usize, act: Activation) -> Result<()> {
        let (wmap, xmap) = (tile_map(gate_up.ptr, gate_up.rows, gate_up.cols, 32)?, tile_map(xh, rows, gate_up.cols, 16)?);
        let mut a = SkinnyArgs { gated_out: out16, gated: 1, act: act_code(act) as i32, ff: ff as i32, out_dt: dt_code(DType::BF16) as i32, ..SkinnyArgs::new(wmap, xmap, rows, gate_up) };
        dev.launch_struct(dev.f.skinny_mma, ((ff / 32) as u32, 1, 1), 128, device::SKINNY_SMEM as u32, &mut a, false)
    }

    /// Whether an f32 product goes through dots_f32 (kernels/gemv.cu) rather than cuBLAS's SGEMM,
    /// which splits K for a few rows and reduces in a second kernel: up to 64 rows of weights and
    /// of x (the gate rows of a decode batch).
    fn dots_fit(rows: usize, w: &MatView, x: CUdeviceptr) -> bool {
        w.dtype == DType::F32 && rows <= 64 && w.rows <= 64 && w.cols % 4 == 0 && (w.ptr | x) % 16 == 0
    }

    /// dots_f32: rows `..n0` of `w` into `out.0` ([rows, n0]), the rest into `out2`.
    #[allow(clippy::too_many_arguments)]
    fn dots(&self, dev: &Dev, rows: usize, w: &MatView, x: CUdeviceptr, out: (CUdeviceptr, usize), out2: CUdeviceptr, beta: f32) -> Result<()> {
        let mut a = KArgs::new();
        a.p(w.ptr).p(x).p(out.0).p(out2).i(out.1).i(rows).i(w.rows).i(w.cols).f(beta);
        dev.launch(dev.f.dots_f32, (w.rows as u32, rows as u32, 1), 128, 0, &mut a)
    }

    fn rms(&self, dev: &Dev, x: CUdeviceptr, rows: usize, width: usize, w: CUdeviceptr, eps: f32, out: CUdeviceptr, out_h: CUdeviceptr, hdt: DType) -> Result<()> {
        let mut a = KArgs::new();
        a.p(x).i(width).p(w).f(eps).p(out).p(out_h).i(dt_code(hdt));
        dev.launch(dev.f.rms_norm, (rows as u32, 1, 1), 256, 0, &mut a)
    }

    /// LayerNorm per group of `group` values of each row, optional output gate (pointer, row stride,
    /// dtype) and 16-bit copy (see norm.cu): one warp per group where the group fits a warp's
    /// registers, else one block.
    #[allow(clippy::too_many_arguments)]
    fn group_norm_rows(&self, dev: &Dev, x: CUdeviceptr, rows: usize, width: usize, group: usize, w: CUdeviceptr, bias: CUdeviceptr, eps: f32, gate: (CUdeviceptr, usize, DType), out: CUdeviceptr, out_h: CUdeviceptr, hdt: DType) -> Result<()> {
        let mut a = KArgs::new();
        a.p(x).i(width).i(group).p(w).p(bias).f(eps).p(gate.0).i(gate.1).i(dt_code(gate.2)).p(out).p(out_h).i(dt_code(hdt));
        let gate_align = if gate.2 == DType::F32 { 16 } else { 8 };
        let aligned = [x, w, bias, out].iter().all(|&p| p % 16 == 0) && gate.0 % gate_align == 0 && out_h % 8 == 0 && gate.1 % 4 == 0;
        if group % 128 == 0 && group <= 1024 && aligned {
            let groups = rows * (width / group);
            a.i(groups);
            let g16 = gate.0 != 0 && gate.2 != DType::F32;
            let f = match (group <= 512, g16) {
                (true, true) => dev.f.group_norm_warp4h,
                (true, false) => dev.f.group_norm_warp4,
                _ => dev.f.group_norm_warp,
            };
            return dev.launch(f, (groups.div_ceil(8) as u32, 1, 1), 256, 0, &mut a);
        }
        dev.launch(dev.f.group_norm, ((width / group) as u32, rows as u32, 1), 256, 0, &mut a)
    }

    /// `out = act(xn·gateᵀ) ⊙ (xn·upᵀ)` for adjacent [gate; up] (ff rows each) as one product, then
    /// act(g)·u straight from it. With 16-bit weights (`xh`: xn's 16-bit copy) the product is kept in
    /// 16 bits (what a bf16 model's reference computes; half the traffic) and the 16-bit copy of the
    /// result that the down projection's product takes is left in the half scratch; its pointer is
    /// returned (0 for f32 weights). `out` 0: only that copy.
    #[allow(clippy::too_many_arguments)]
    fn gated_up_adjacent(&self, dev: &Dev, rows: usize, width: usize, xn: CUdeviceptr, xh: Option<CUdeviceptr>, gate: &CudaMat, ff: usize, act: Activation, out: CUdeviceptr) -> Result<CUdeviceptr> {
        let hdt = (gate.dtype != DType::F32).then_some(gate.dtype);
        let wide_dt = hdt.unwrap_or(DType::F32);
        let view = MatView { ptr: gate.ptr, rows: 2 * ff, cols: width, dtype: gate.dtype };
        if let Some(h) = xh.filter(|&h| out == 0 && ff % 32 == 0 && Self::skinny_fits(dev, rows, &view, false, h)) {
            // a decode batch of 3–16: the activation in the product's epilogue
            let oh = dev.half_scratch(rows * ff, None)?;
            self.skinny_gated(dev, rows, &view, h, oh, ff, act)?;
            return Ok(oh);
        }
        let wide = dev.scratch(|s| &mut s.wide, rows * 2 * ff * wide_dt.size(), false)?;
        self.gemm_view(dev, rows, view, xn, xh, wide, 0.0, hdt.is_some())?;
        let oh = match hdt {
            Some(dt) => dev.half_scratch(rows * ff, (out != 0).then_some((out, rows * ff, dt)))?,
            None => 0,
        };
        let vec = wide_dt != DType::F32 && ff % 8 == 0 && [wide, out, oh].iter().all(|&p| p % 16 == 0);
        let per_block = if vec { 8 * 256 } else { 256 };
        let mut a = KArgs::new();
        a.i(act_code(act)).p(wide).i(dt_code(wide_dt)).i(ff).p(out).i(rows).p(oh).i(dt_code(hdt.unwrap_or(DType::BF16))).i(vec as usize);
        dev.launch(dev.f.gated_act_split, (rows as u32, ff.div_ceil(per_block) as u32, 1), 256, 0, &mut a)?;
        Ok(oh)
    }

    /// One mLSTM step kernel. `pdl`: its launch may overlap the previous kernel's tail (the kernel
    /// waits for that kernel before its first read).
    #[allow(clippy::too_many_arguments)]
    fn mstep(&self, dev: &Dev, d: MlstmDims, batch: usize, p: [CUdeviceptr; 5], gate_bias: Option<(CUdeviceptr, CUdeviceptr, f32)>, s: StatePtrs, eps: f32, h: CUdeviceptr, fused: Option<(CUdeviceptr, CUdeviceptr, f32, CUdeviceptr)>, pdl: bool, layout: StepLayout) -> Result<()> {
        let units = batch * d.heads;
        let counters = dev.scratch(|s| &mut s.counters, units * 4, true)?;
        let (ib, fb, cap) = gate_bias.unwrap_or((0, 0, 0.0));
        let (o, hnw, neps, hn) = fused.unwrap_or((0, 0, 0.0, 0));
        let mut a = KArgs::new();
        a.i(d.heads).i(d.dk).i(d.dv).p(p[0]).p(p[1]).p(p[2]).p(p[3]).p(p[4]).p(ib).p(fb).f(cap);
        a.p(s.c).p(s.n).p(s.m).f(eps).p(h).p(o).p(hnw).f(neps).p(hn).p(counters);
        a.i(layout.ld[0]).i(layout.ld[1]).i(layout.ld[2]).i(layout.ld[3]).i(dt_code(layout.hn));
        // The state is read before waiting for the previous kernel when no launch it may overlap
        // wrote it (a decode step's; not the next token of a prompt's token-by-token loop).
        let early = pdl && dev.state_settled(s.c);
        a.i(early as usize).p(s.pend).i(s.pcap);
        // Wide tiles (64 columns, 256 threads; 128 with C in bf16) once there are enough units to
        // fill the GPU twice over; narrow ones (32 columns, 512 threads) give more blocks to small
        // batches, two per SM once there are more of them than SMs.
        let narrow = units * d.dv.div_ceil(32);
        let [narrow_f, pair_f, wide_f] = dev.f.mlstm_step[s.c16 as usize];
        let (wide_cols, wide_step) = if s.c16 { (128, 4) } else { (64, 2) };
        let pend = if s.pend != 0 { Self::pend_tile(dev, d, units, s.c16) } else { None };
        if let Some(wide) = pend {
            let (f, cols, threads) = if wide { (dev.f.mlstm_step_pend[1], 64, 256) } else { (dev.f.mlstm_step_pend[0], 32, 512) };
            dev.launch_pdl(f, (d.dv.div_ceil(cols) as u32, units as u32, 1), threads, step_smem(d, true) as u32, &mut a, pdl)?;
        } else if s.pend != 0 {
            // (not a shape `mlstm_pending_words` gives room to) C alone, stepped as usual
            Self::settle(dev, d, batch, s)?;
            return self.mstep(dev, d, batch, p, gate_bias, StatePtrs { pend: 0, pcap: 0, ..s }, eps, h, fused, false, layout);
        } else if d.dv % wide_step == 0 && units * d.dv.div_ceil(wide_cols) >= 2 * dev.sms as usize {
            dev.launch_pdl(wide_f, (d.dv.div_ceil(wide_cols) as u32, units as u32, 1), 256, step_smem(d, false) as u32, &mut a, pdl)?;
        } else {
            let f = if narrow > dev.sms as usize { pair_f } else { narrow_f };
            dev.launch_pdl(f, (d.dv.div_ceil(32) as u32, units as u32, 1), 512, step_smem(d, false) as u32, &mut a, pdl)?;
        }
        dev.note_state_write(s.c);
        Ok(())
    }

    /// The tile a step of `units` takes with deferred updates (Some(true): wide, Some(false):
    /// narrow), or None: an f32 C with DK within the kernels' shared memory, at the batches the
    /// plain wide tile takes (where C's bytes dominate the step) or the narrow one at a block an
    /// SM at most (batch 1 of the 7B shape); not the paired narrow tile (64 registers), and not a
    /// bf16 C, whose write-back costs more arithmetic per byte than the step saves.
    fn pend_tile(dev: &Dev, d: MlstmDims, units: usize, c16: bool) -> Option<bool> {
        let sms = dev.sms as usize;
        if c16 || step_smem(d, true) > STEP_SMEM_MAX {
            None
        } else if d.dv % 2 == 0 && units * d.dv.div_ceil(64) >= 2 * sms {
            Some(true)
        } else if units * d.dv.div_ceil(32) <= sms {
            Some(false)
        } else {
            None
        }
    }

    /// Folds the deferred updates of a state of `batch` sequences into C and empties their rings
    /// (kernels/mlstm.cu `mlstm_settle`); nothing without room for them.
    fn settle(dev: &Dev, d: MlstmDims, batch: usize, s: StatePtrs) -> Result<()> {
        let units = batch * d.heads;
        if s.pend == 0 || units == 0 {
            return Ok(());
        }
        let mut a = KArgs::new();
        a.i(d.dk).i(d.dv).p(s.c).p(s.pend).i(s.pcap).i(s.c16 as usize);
        dev.launch(dev.f.mlstm_settle, (d.dv.div_ceil(32) as u32, units as u32, 1), 256, (4 * PENDING_CAP_MAX * d.dk) as u32, &mut a)?;
        // every unit's count and a (the room's first 2·units words)
        // SAFETY: the room holds at least 2·units words (`pending_unit_words`); queued on the stream.
        unsafe { dres::memset_d8_async(s.pend, 0, 8 * units, dev.stream) }.map_err(|e| drv("memset", e))?;
        dev.note_state_write(s.c);
        Ok(())
    }

    /// Chunkwise prefill of `seq` tokens (state batch 1) on gate pre-activations already capped.
    /// `qkv`: q, k, v as (pointer, row stride); strides other than NH·DK, NH·DK, NH·DV only for the
    /// tensor-core kernels (`chunk_tc`); bf16 values with `bf16` (the bf16 kernels: `chunk_bf16`).
    /// A bf16 C is widened into an f32 scratch for the chunk kernels and rounded back after them
    /// (once per prompt segment, as a step rounds it once per token). `h` None: the state only
    /// (the tensor-core kernels: the chunk-output kernel is not launched).
    #[allow(clippy::too_many_arguments)]
    fn mchunk(&self, dev: &Dev, d: MlstmDims, seq: usize, chunk: usize, qkv: [(CUdeviceptr, usize); 3], i: CUdeviceptr, f: CUdeviceptr, s: StatePtrs, eps: f32, h: Option<CUdeviceptr>, bf16: bool) -> Result<()> {
        // the chunk kernels read C alone: deferred updates first
        Self::settle(dev, d, 1, s)?;
        if !s.c16 {
            return self.mchunk_f32(dev, d, seq, chunk, qkv, i, f, s, eps, h, bf16);
        }
        let n = d.heads * d.dk * d.dv;
        let c32 = dev.scratch(|s| &mut s.c32, n * 4, false)?;
        self.convert(dev, dev.f.from_half, s.c, c32, n, DType::BF16)?;
        self.mchunk_f32(dev, d, seq, chunk, qkv, i, f, StatePtrs { c: c32, c16: false, ..s }, eps, h, bf16)?;
        self.convert(dev, dev.f.to_half, c32, s.c, n, DType::BF16)?;
        dev.note_state_write(s.c);
        Ok(())
    }

    /// `mchunk` on an f32 C.
    #[allow(clippy::too_many_arguments)]
    fn mchunk_f32(&self, dev: &Dev, d: MlstmDims, seq: usize, chunk: usize, qkv: [(CUdeviceptr, usize); 3], i: CUdeviceptr, f: CUdeviceptr, s: StatePtrs, eps: f32, h: Option<CUdeviceptr>, bf16: bool) -> Result<()> {
        let [(q, ldq), (k, ldk), (v, ldv)] = qkv;
        let (outputs, h) = (h.is_some(), h.unwrap_or(0));
        let l = chunk.clamp(1, 64);
        let nc = seq.div_ceil(l);
        // Tensor cores where the shape and alignment allow (see kernels/mlstm_chunk.cu) and the
        // setting does not keep the CUDA-core kernels.
        let choice = *dev.chunk_kernels.lock().expect("chunk kernels lock");
        let tc = Self::chunk_tc(dev, d, [q, k, v, h], [ldq, ldk, ldv]);
        if !tc && (ldq, ldk, ldv) != (d.heads * d.dk, d.heads * d.dk, d.heads * d.dv) {
            return Err(Error::Device("cuda mlstm prefill: strided q, k, v need the tensor-core chunk kernels".into()));
        }
        if bf16 && !tc {
            return Err(Error::Device("cuda mlstm prefill: bf16 q, k, v need the tensor-core chunk kernels".into()));
        }
        if !outputs && !tc {
            // (the CUDA-core kernels' output blocks write the final m)
            return Err(Error::Device("cuda mlstm prefill: a state-only prefill needs the tensor-core chunk kernels".into()));
        }
        let exact = (*dev.weight_dtype.lock().expect("dtype lock") == DType::F32 && !bf16) as usize;
        // the states entering the chunks: bf16 between the plain or bf16 tensor-core kernels, else f32
        let cs_bytes = if tc && exact == 0 { 2 } else { 4 };
        let cs = dev.scratch(|s| &mut s.cs, nc * d.heads * d.dk * d.dv * cs_bytes, false)?;
        let ns = dev.scratch(|s| &mut s.ns, nc * d.heads * d.dk * 4, false)?;
        let states_grid = (d.dv.div_ceil(64) as u32, d.dk.div_ceil(64) as u32, d.heads as u32);
        let stages = *dev.chunk_stages.lock().expect("chunk stages lock");
        let (mut sa, mut oa) = (KArgs::new(), KArgs::new());
        let (states, states_smem, out, out_grid) = if tc {
            // every chunk's gate terms first, which both kernels then read
            let gates = dev.scratch(|s| &mut s.gates, nc * d.heads * CHUNK_GATE_STRIDE * 4, false)?;
            let mut a = KArgs::new();
            a.i(d.heads).i(seq).i(l).p(i).p(f).p(s.m).p(gates);
            dev.launch(dev.f.chunk_gates, (d.heads as u32, 1, 1), 1024, 0, &mut a)?;
            sa.i(d.heads).i(d.dk).i(d.dv).i(seq).i(l).p(k).i(ldk).p(v).i(ldv).p(gates).p(s.c).p(s.n).p(cs).p(ns).i(stages);
            oa.i(d.heads).i(d.dk).i(d.dv).i(seq).i(l).p(q).i(ldq).p(k).i(ldk).p(v).i(ldv).p(gates).p(cs).p(ns).f(eps).p(h);
            let out_grid = (d.dv.div_ceil(128) as u32, nc as u32, d.heads as u32);
            if bf16 {
                (dev.f.chunk_states_bf16, (stages * CHUNK_BF16_STAGE) as u32, dev.f.chunk_out_bf16, out_grid)
            } else {
                (dev.f.chunk_states_tc[exact], (stages * CHUNK_STATE_STAGE) as u32, dev.f.chunk_out_tc[exact], out_grid)
            }
        } else {
            let ms = dev.scratch(|s| &mut s.ms, (nc + 1) * d.heads * 4, false)?;
            sa.i(d.heads).i(d.dk).i(d.dv).i(seq).i(l).p(k).p(v).p(i).p(f).p(s.c).p(s.n).p(s.m).p(cs).p(ns).p(ms);
            oa.i(d.heads).i(d.dk).i(d.dv).i(seq).i(l).p(q).p(k).p(v).p(i).p(f).p(cs).p(ns).p(ms).p(s.m).f(eps).p(h);
            (dev.f.chunk_states, 0, dev.f.chunk_out, (d.dv.div_ceil(64) as u32, nc as u32, d.heads as u32))
        };
        if choice.only != Some(ChunkPhase::Out) {
            dev.launch(states, states_grid, 256, states_smem, &mut sa)?;
            // (a decode step launched right after it must not read the state early)
            dev.note_state_write(s.c);
        }
        if choice.only == Some(ChunkPhase::States) || !outputs {
            return Ok(());
        }
        dev.launch(out, out_grid, 256, 0, &mut oa)
    }

    /// The chunk length when `norm_mlstm_add` can run as the merged prompt path: a chunkwise prefill
    /// past the GEMV's rows, q, k, v, o adjacent in one 16-bit dtype (one product), ĩ, f̃ one f32
    /// row per head (at most 8 heads), out_proj in that dtype, and the tensor-core chunk kernels.
    #[allow(clippy::too_many_arguments)]
    fn merged_mlstm_prefill(&self, x: CUdeviceptr, rows: usize, width: usize, d: MlstmDims, kernel: Option<MlstmKernel>, w: &MlstmHalf<'_, Self>, s: &MlstmScratch<'_, CudaBuf>) -> Option<usize> {
        let Some(MlstmKernel::Chunkwise { chunk }) = kernel else { return None };
        let [q, _, _, _, ig, fg] = w.proj;
        let (qk, vw) = (d.heads * d.dk, d.heads * d.dv);
        let gates = [ig, fg].iter().all(|m| m.dtype == DType::F32 && m.rows == d.heads && m.cols == width) && d.heads <= 8 && width % 256 == 0;
        let aligned = [x, w.norm.ptr, ig.ptr, fg.ptr].iter().all(|&p| p % 16 == 0);
        // (q, k, v's pointers into the merged output are checked where they are known)
        let tc = Self::chunk_tc(&self.dev, d, [0, 0, 0, s.h.ptr], [qk, qk, vw]);
        (chunk > 0 && rows > 0 && !Self::gemv_fits(rows, q) && Self::merged_projections(width, d, w) && gates && aligned && tc).then_some(chunk)
    }

    /// The merged prompt path of `norm_mlstm_add` (see there), `chunk` from `merged_mlstm_prefill`;
    /// without `outputs` only the state is updated (`norm_mlstm_state`): k and v alone are formed
    /// and the chunk-output kernel, head norm and out_proj do not run.
    #[allow(clippy::too_many_arguments)]
    fn norm_mlstm_prompt(&self, x: &mut CudaBuf, rows: usize, width: usize, d: MlstmDims, chunk: usize, w: &MlstmHalf<'_, Self>, state: &mut MlstmState<CudaBuf>, s: MlstmScratch<'_, CudaBuf>, outputs: bool) -> Result<()> {
        Self::check_mlstm_half(x, rows, width, d, 1, w, &s, state)?;
        let [q, k, v, o, ig, fg] = w.proj;
        let (vw, dt) = (d.heads * d.dv, q.dtype);
        // the rows of the merged weights formed: q, k, v, o, or k and v; where k and v start in them
        let (lead, total) = if outputs { (q, q.rows + k.rows + v.rows + o.rows) } else { (k, k.rows + v.rows) };
        let k_at = if outputs { q.rows } else { 0 };
        let v_at = k_at + k.rows;
        let (xp, hp, ip, fp) = (x.ptr, s.h.ptr, s.i.ptr, s.f.ptr);
        let words = [
            if outputs { opc::MLSTM_ADD } else { opc::MLSTM_STATE }, xp, rows as u64, width as u64, w.norm.ptr, w.eps.to_bits() as u64, q.ptr, ig.ptr, fg.ptr, w.ibias.ptr, w.fbias.ptr,
            w.gate_cap.to_bits() as u64, state.c.ptr, state.n.ptr, state.m.ptr, w.cell_eps.to_bits() as u64, w.head_norm.ptr, w.out_proj.ptr, hp, chunk as u64,
            StatePtrs::of(state).c16 as u64,
        ];
        let st = StatePtrs::of(state);
        self.op(&words, |dev| {
            let xh = dev.half_scratch(rows * width, None)?;
            let mut a = KArgs::new();
            a.p(xp).i(rows).i(width).p(w.norm.ptr).f(w.eps).p(ig.ptr).p(fg.ptr).i(d.heads).p(w.ibias.ptr).p(w.fbias.ptr).f(w.gate_cap).p(ip).p(fp).p(xh).i(dt_code(dt));
            let warps = if width % 512 == 0 { 32 } else { 16 }; // width / warps: whole 16-column steps
            dev.launch(dev.f.rms_gate_dots, (rows.div_ceil(16) as u32, 1, 1), 32 * warps, 0, &mut a)?;
            // q, k, v, o (or k, v) in bf16 for a bf16 model whose shape the bf16 chunk kernels take, else f32
            let wide = dev.scratch(|s| &mut s.wide, rows * total * 4, false)?;
            let at = |bytes: usize, n: usize| (wide + (bytes * n) as u64, total);
            let bf16 = dt == DType::BF16 && {
                let c = |n: usize| at(2, n).0;
                Self::chunk_bf16(dev, d, [c(0), c(k_at), c(v_at), hp], [total; 3])
            };
            let bytes = if bf16 { 2 } else { 4 };
            let col = |n: usize| at(bytes, n);
            self.gemm_view(dev, rows, MatView { ptr: lead.ptr, rows: total, cols: width, dtype: dt }, 0, Some(xh), wide, 0.0, bf16)?;
            // (without outputs q's slot holds k: the state kernels do not read it)
            let qkv = [col(0), col(k_at), col(v_at)];
            if !Self::chunk_tc(dev, d, [qkv[0].0, qkv[1].0, qkv[2].0, hp], [total; 3]) {
                return Err(Error::Device("cuda norm_mlstm_add: the tensor-core chunk kernels cannot take these operands".into()));
            }
            self.mchunk(dev, d, rows, chunk, qkv, ip, fp, st, w.cell_eps, outputs.then_some(hp), bf16)?;
            if !outputs {
                return Ok(());
            }
            let hh = dev.half_scratch(rows * vw, None)?;
            let (o, ldo) = col(v_at + v.rows);
            let gate = (o, ldo, if bf16 { DType::BF16 } else { DType::F32 });
            self.group_norm_rows(dev, hp, rows, vw, d.dv, w.head_norm.ptr, 0, w.eps, gate, 0, hh, dt)?;
            self.gemm(dev, rows, w.out_proj, 0, Some(hh), xp, 1.0)
        })
    }

    /// What both merged `norm_mlstm_add` paths need of the projections: q, k, v, o adjacent in one
    /// 16-bit dtype (one product) and shaped for `d`, out_proj in that dtype.
    fn merged_projections(width: usize, d: MlstmDims, w: &MlstmHalf<'_, Self>) -> bool {
        let [q, k, v, o, _, _] = w.proj;
        let (qk, vw) = (d.heads * d.dk, d.heads * d.dv);
        let projections = q.dtype != DType::F32 && q.adjacent(k) && k.adjacent(v) && v.adjacent(o) && q.cols == width && (q.rows, k.rows, v.rows, o.rows) == (qk, qk, vw, vw);
        projections && w.out_proj.dtype == q.dtype && w.out_proj.rows == width && w.out_proj.cols == vw
    }

    /// Whether `norm_mlstm_add` can run a decode step of up to 64 sequences as one merged product
    /// (from 3 on: below that the GEMV takes the compositions' products): q, k, v, o adjacent in one
    /// 16-bit dtype, ĩ and f̃ adjacent f32 rows for `dots_f32`, out_proj in that 16-bit dtype.
    fn merged_mlstm_step(&self, x: CUdeviceptr, rows: usize, width: usize, d: MlstmDims, kernel: Option<MlstmKernel>, w: &MlstmHalf<'_, Self>, s: &MlstmScratch<'_, CudaBuf>) -> bool {
        let [q, _, _, _, ig, fg] = w.proj;
        let gates = ig.adjacent(fg) && ig.rows == d.heads && fg.rows == d.heads && ig.cols == width;
        let pair = MatView { ptr: ig.ptr, rows: 2 * d.heads, cols: width, dtype: ig.dtype };
        kernel.is_none() && rows <= 64 && !Self::gemv_fits(rows, q) && Self::merged_projections(width, d, w) && gates && Self::dots_fit(rows, &pair, s.xn.ptr) && x % 16 == 0 && d.dk <= 4096
    }

    /// A decode step of 3–64 sequences (see `merged_mlstm_step`): RMSNorm into f32 (the gate rows'
    /// operand) and 16 bits (the products'), one product for q, k, v, o into the `wide` scratch, one
    /// `dots_f32` launch for ĩ and f̃, the step kernel reading q, k, v, o there with row strides and
    /// writing hn in 16 bits, out_proj + residual: no column split, no 16-bit copy of hn.
    #[allow(clippy::too_many_arguments)]
    fn norm_mlstm_add_step(&self, x: &mut CudaBuf, rows: usize, width: usize, d: MlstmDims, w: &MlstmHalf<'_, Self>, state: &mut MlstmState<CudaBuf>, s: MlstmScratch<'_, CudaBuf>) -> Result<()> {
        check("norm_mlstm_add", "xn", s.xn.len, rows * width)?;
        Self::check_mlstm_half(x, rows, width, d, rows, w, &s, state)?;
        let [q, k, v, o, ig, _] = w.proj;
        let (total, vw, dt) = (q.rows + k.rows + v.rows + o.rows, d.heads * d.dv, q.dtype);
        let (xp, xnp, hp, ip, fp) = (x.ptr, s.xn.ptr, s.h.ptr, s.i.ptr, s.f.ptr);
        let words = [
            opc::MLSTM_ADD, xp, rows as u64, width as u64, w.norm.ptr, w.eps.to_bits() as u64, q.ptr, ig.ptr, w.ibias.ptr, w.fbias.ptr,
            w.gate_cap.to_bits() as u64, state.c.ptr, state.n.ptr, state.m.ptr, w.cell_eps.to_bits() as u64, w.head_norm.ptr, w.out_proj.ptr, xnp, hp, ip, fp, 0,
            StatePtrs::of(state).c16 as u64,
        ];
        let st = StatePtrs::of(state);
        self.op(&words, |dev| {
            let xh = dev.half_scratch(rows * width, None)?;
            self.rms(dev, xp, rows, width, w.norm.ptr, w.eps, xnp, xh, dt)?;
            let wide = dev.scratch(|s| &mut s.wide, rows * total * 4, false)?;
            self.gemm_view(dev, rows, MatView { ptr: q.ptr, rows: total, cols: width, dtype: dt }, 0, Some(xh), wide, 0.0, false)?;
            let pair = MatView { ptr: ig.ptr, rows: 2 * d.heads, cols: width, dtype: DType::F32 };
            self.dots(dev, rows, &pair, xnp, (ip, d.heads), fp, 0.0)?;
            let col = |n: usize| wide + 4 * n as u64;
            let p = [col(0), col(q.rows), col(q.rows + k.rows), ip, fp];
            let hh = dev.half_scratch(rows * vw, None)?;
            let fused = (col(q.rows + k.rows + v.rows), w.head_norm.ptr, w.eps, hh);
            self.mstep(dev, d, rows, p, Some((w.ibias.ptr, w.fbias.ptr, w.gate_cap)), st, w.cell_eps, hp, Some(fused), true, StepLayout { ld: [total; 4], hn: dt })?;
            self.gemm(dev, rows, w.out_proj, 0, Some(hh), xp, 1.0)
        })
    }

    /// Whether the tensor-core chunk kernels take these operands (see kernels/mlstm_chunk.cu) and the
    /// setting does not keep the CUDA-core ones.
    fn chunk_tc(dev: &Dev, d: MlstmDims, ptrs: [CUdeviceptr; 4], lds: [usize; 3]) -> bool {
        let choice = *dev.chunk_kernels.lock().expect("chunk kernels lock");
        let aligned = ptrs.iter().all(|&p| p % 16 == 0) && lds.iter().all(|&l| l % 4 == 0);
        dev.cc.0 >= 8 && d.dk % 64 == 0 && d.dv % 128 == 0 && aligned && choice.tensor_cores
    }

    /// Whether the bf16 chunk kernels take these bf16 q, k, v (16-byte aligned rows: strides of
    /// 8 values) and f32 h, and the setting does not keep the TF32 ones.
    fn chunk_bf16(dev: &Dev, d: MlstmDims, ptrs: [CUdeviceptr; 4], lds: [usize; 3]) -> bool {
        let choice = *dev.chunk_kernels.lock().expect("chunk kernels lock");
        Self::chunk_tc(dev, d, ptrs, lds) && lds.iter().all(|&l| l % 8 == 0) && choice.bf16
    }

    /// The operands of a merged `norm_mlstm_add` (`batch` sequences: 1 for a prompt).
    #[allow(clippy::too_many_arguments)]
    fn check_mlstm_half(x: &CudaBuf, rows: usize, width: usize, d: MlstmDims, batch: usize, w: &MlstmHalf<'_, Self>, s: &MlstmScratch<'_, CudaBuf>, state: &MlstmState<CudaBuf>) -> Result<()> {
        check("norm_mlstm_add", "x", x.len, rows * width)?;
        check("norm_mlstm_add", "norm", w.norm.len, width)?;
        check("norm_mlstm_add", "ibias", w.ibias.len, d.heads)?;
        check("norm_mlstm_add", "fbias", w.fbias.len, d.heads)?;
        check("norm_mlstm_add", "head_norm", w.head_norm.len, d.heads * d.dv)?;
        Self::check_mlstm("norm_mlstm_add", d, rows, batch, [&*s.q, &*s.k, &*s.v, &*s.i, &*s.f, &*s.h], state)
    }

    fn check_mlstm(op: &str, d: MlstmDims, rows: usize, batch: usize, bufs: [&CudaBuf; 6], s: &MlstmState<CudaBuf>) -> Result<()> {
        shapes::mlstm("cuda", op, d, rows, batch, bufs.map(|b| b.len), [s.c.len, s.n.len, s.m.len], s.c_dtype, STATE_DTYPES)?;
        if d.dk == 0 || d.dv == 0 || d.dk > 4096 {
            return Err(Error::Device(format!("cuda {op}: head dims {}×{} unsupported (DK ≤ 4096)", d.dk, d.dv)));
        }
        if let Some(p) = &s.pending {
            let units = batch * d.heads;
            let cap = pending_cap_of(p.len / units.max(1), d);
            if cap == 0 || cap > PENDING_CAP_MAX || p.len != units * pending_unit_words(cap, d) {
                return Err(Error::Input(format!("cuda {op}: the state's room for deferred updates ({} words) fits no ring for {units} units of {}×{}", p.len, d.dk, d.dv)));
            }
        }
        Ok(())
    }

    /// Measures device-to-device copy bandwidth (bytes read + written) and read bandwidth on 1 GiB.
    pub fn measure_bandwidth(&self) -> Result<Bandwidth> {
        let dev = &self.dev;
        dev.bind()?;
        let bytes = 1usize << 30;
        let a = self.buf(bytes / 4)?;
        let b = self.buf(bytes / 4)?;
        let acc = self.buf(1)?;
        unsafe { dres::memset_d8_async(a.ptr, 1, bytes, dev.stream) }.map_err(|e| drv("memset", e))?;
        let ev = |_: ()| -> Result<cudarc::driver::sys::CUevent> {
            dres::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| drv("event", e))
        };
        let (e0, e1) = (ev(())?, ev(())?);
        let mut best_copy = f32::MAX;
        let mut best_read = f32::MAX;
        for _ in 0..6 {
            unsafe {
                dres::event::record(e0, dev.stream).map_err(|e| drv("event", e))?;
                dres::memcpy_dtod_async(b.ptr, a.ptr, bytes, dev.stream).map_err(|e| drv("copy", e))?;
                dres::event::record(e1, dev.stream).map_err(|e| drv("event", e))?;
                dres::event::synchronize(e1).map_err(|e| drv("event", e))?;
                best_copy = best_copy.min(dres::event::elapsed(e0, e1).map_err(|e| drv("event", e))?);
            }
            // n4 is a 64-bit parameter: a full 8-byte slot.
            let mut args = KArgs::new();
            args.p(a.ptr).p((bytes / 16) as u64).p(acc.ptr);
            unsafe { dres::event::record(e0, dev.stream) }.map_err(|e| drv("event", e))?;
            dev.launch(dev.f.read_sum, ((dev.sms * 8) as u32, 1, 1), 512, 0, &mut args)?;
            unsafe {
                dres::event::record(e1, dev.stream).map_err(|e| drv("event", e))?;
                dres::event::synchronize(e1).map_err(|e| drv("event", e))?;
                best_read = best_read.min(dres::event::elapsed(e0, e1).map_err(|e| drv("event", e))?);
            }
        }
        unsafe {
            let _ = dres::event::destroy(e0);
            let _ = dres::event::destroy(e1);
        }
        Ok(Bandwidth {
            copy_gb_s: 2.0 * bytes as f64 / (best_copy as f64 * 1e-3) / 1e9,
            read_gb_s: bytes as f64 / (best_read as f64 * 1e-3) / 1e9,
        })
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Mat = CudaMat;

    fn name(&self) -> String {
        format!("cuda:0 ({})", self.device_name())
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        let b = self.scratch(len)?;
        // SAFETY: fresh allocation of len·4 bytes.
        unsafe { dres::memset_d8_async(b.ptr, 0, len * 4, self.dev.stream) }.map_err(|e| drv("memset", e))?;
        Ok(b)
    }

    fn scratch(&self, len: usize) -> Result<CudaBuf> {
        self.dev.bind()?;
        self.dev.cap.lock().expect("capture lock").unrecordable()?;
        self.buf(len)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaBuf> {
        self.dev.bind()?;
        self.dev.cap.lock().expect("capture lock").unrecordable()?;
        let b = self.buf(host.len())?;
        // SAFETY: b holds host.len() floats; synchronised before return (pageable source).
        unsafe { dres::memcpy_htod_async(b.ptr, host, self.dev.stream) }.map_err(|e| drv("upload", e))?;
        self.dev.sync()?;
        Ok(b)
    }

    fn download(&self, buf: &CudaBuf, len: usize) -> Result<Vec<f32>> {
        check("download", "buf", buf.len, len)?;
        self.dev.bind()?;
        {
            let mut c = self.dev.cap.lock().expect("capture lock");
            c.enter(capture::sig(&[100, buf.ptr, len as u64]))?;
            c.flush(self.dev.stream)?;
        }
        let mut out = vec![0f32; len];
        // SAFETY: out holds len floats; the stream is synchronised before out is read.
        unsafe { dres::memcpy_dtoh_async(&mut out, buf.ptr, self.dev.stream) }.map_err(|e| drv("download", e))?;
        self.dev.sync()?;
        Ok(out)
    }

    fn copy(&self, src: &CudaBuf, src_off: usize, dst: &mut CudaBuf, dst_off: usize, len: usize) -> Result<()> {
        check("copy", "src", src.len, src_off + len)?;
        check("copy", "dst", dst.len, dst_off + len)?;
        let (s, d) = (src.ptr + 4 * src_off as u64, dst.ptr + 4 * dst_off as u64);
        self.op(&[opc::COPY, s, d, len as u64], |dev| {
            if len == 0 {
                return Ok(());
            }
            // SAFETY: both ranges checked above.
            unsafe { dres::memcpy_dtod_async(d, s, len * 4, dev.stream) }.map_err(|e| drv("copy", e))
        })
    }

    fn matrix(&self, w: HostTensor, dtype: DType) -> Result<CudaMat> {
        if w.shape.len() != 2 {
            return Err(Error::Weights(format!("expected a 2-D weight matrix, got shape {:?}", w.shape)));
        }
        let (rows, cols) = (w.shape[0], w.shape[1]);
        self.dev.bind()?;
        self.dev.cap.lock().expect("capture lock").unrecordable()?;
        let t = w.to_dtype(dtype);
        let bytes: &[u8] = match &t.data {
            HostData::F32(v) => as_bytes(v),
            HostData::BF16(v) => as_bytes(v),
            HostData::F16(v) => as_bytes(v),
        };
        let n = bytes.len();
        let need = n.div_ceil(256) * 256;
        let mut slab = self.slab.lock().expect("slab lock");
        let fits = slab.mem.is_some() && slab.used + need <= slab.size;
        let (ptr, mem) = if !fits && slab.announced < need && n > SLAB_MAX_MAT {
            let p = self.dev.alloc(n)?;
            (p, Arc::new(DevMem { ptr: p, dev: self.dev.clone() }))
        } else {
            if !fits {
                let size = if slab.announced >= need { std::mem::take(&mut slab.announced) } else { SLAB };
                let p = self.dev.alloc(size)?;
                slab.mem = Some(Arc::new(DevMem { ptr: p, dev: self.dev.clone() }));
                slab.used = 0;
                slab.size = size;
            }
            let mem = slab.mem.clone().expect("slab present");
            let p = mem.ptr + slab.used as u64;
            slab.used += need;
            (p, mem)
        };
        drop(slab);
        let m = CudaMat { ptr, rows, cols, dtype, _mem: mem };
        // SAFETY: ptr holds bytes.len() bytes; synchronised (pageable source).
        unsafe { dres::memcpy_htod_async(ptr, bytes, self.dev.stream) }.map_err(|e| drv("upload matrix", e))?;
        self.dev.sync()?;
        Ok(m)
    }

    fn matrix_bytes(&self, w: &CudaMat) -> usize {
        w.rows * w.cols * w.dtype.size()
    }

    fn head_top_k(&self, x: &CudaBuf, rows: usize, w: &CudaMat, n: usize, cap: f32, k: usize, scratch: &mut CudaBuf) -> Result<Vec<Vec<(u32, f32)>>> {
        let k = k.min(n);
        if k == 0 || k > TOP_K_MAX || n != w.rows {
            return xlstm_core::backend::head_top_k_on_host(self, x, rows, w, n, cap, k, scratch);
        }
        // Only rows·k (id, value) pairs come back, not rows·n logits.
        let mut picked = self.topk_out.lock().expect("top-k buffer lock");
        if picked.as_ref().is_none_or(|b| b.len < 2 * rows * k) {
            *picked = Some(self.buf(2 * rows * k)?);
        }
        let out = picked.as_ref().expect("allocated above");
        self.head_select(x, rows, w, n, cap, k, scratch, out.ptr)?;
        let host = self.download(out, 2 * rows * k)?;
        let (ids, vals) = host.split_at(rows * k);
        Ok((0..rows).map(|r| (0..k).map(|j| (ids[r * k + j].to_bits(), vals[r * k + j])).collect()).collect())
    }

    fn prefill_segment(&self) -> usize {
        // cuBLAS runs the 7B products at 600–800 TFLOP/s from ~2k rows (500–730 at 512); 2048 rows
        // of the 7B shape hold ~0.6 GB of activation buffers (4096: ~3% faster prefill, ~1.2 GB).
        2048
    }

    fn expect_matrix_bytes(&self, bytes: usize) {
        self.slab.lock().expect("slab lock").announced = bytes;
    }

    fn state_dtypes(&self) -> &'static [DType] {
        STATE_DTYPES
    }

    fn mlstm_pending_words(&self, d: MlstmDims, batch: usize, c_dtype: DType) -> usize {
        let cap = self.pending_cap.load(std::sync::atomic::Ordering::Relaxed);
        let units = batch * d.heads;
        // batch 1 on the stack kernel writes C every step (its cell is not the step's tail there)
        let stacked = batch == 1 && self.dev.stack.load(std::sync::atomic::Ordering::Relaxed);
        if cap == 0 || stacked || Self::pend_tile(&self.dev, d, units, c_dtype != DType::F32).is_none() {
            return 0;
        }
        units * pending_unit_words(cap, d)
    }

    fn mlstm_settle(&self, s: &MlstmState<CudaBuf>) -> Result<()> {
        let st = StatePtrs::of(s);
        if st.pend == 0 {
            return Ok(());
        }
        let d = s.dims;
        let batch = s.m.len / d.heads.max(1);
        self.op(&[opc::SETTLE, st.c, st.pend, d.dk as u64, d.dv as u64, batch as u64], |dev| Self::settle(dev, d, batch, st))
    }

    fn mlstm_steps_per_write(&self, s: &MlstmState<CudaBuf>) -> usize {
        StatePtrs::of(s).pcap + 1
    }

    fn set_weight_dtype(&self, dtype: DType) {
        *self.dev.weight_dtype.lock().expect("dtype lock") = dtype;
    }

    fn release_cache(&self) -> Result<()> {
        self.dev.bind()?;
        self.dev.release_scratch()
    }

    fn release_sequence_cache(&self) -> Result<()> {
        self.dev.bind()?;
        self.dev.release_sequence_scratch()
    }

    fn allocated_bytes(&self) -> Option<u64> {
        Some(self.dev.allocated() as u64)
    }

    fn memory_probe(&self) -> Option<xlstm_core::watchdog::DeviceProbe> {
        let ctx = self.dev.ctx.clone();
        Some(Box::new(move || {
            ctx.bind_to_thread().ok()?;
            let (free, total) = dres::mem_get_info().ok()?;
            Some(((total - free) as u64, total as u64))
        }))
    }

    fn embed(&self, table: &CudaMat, ids: &[u32], out: &mut CudaBuf) -> Result<()> {
        let d = table.cols;
        check("embed", "out", out.len, ids.len() * d)?;
        if ids.contains(&CHOSEN_ID) {
            return self.embed_chosen(table, ids, out);
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= table.rows) {
            return Err(Error::Input(format!("token id {bad} is out of range: the vocabulary has {} tokens", table.rows)));
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        let (host, dids) = self.dev.ids_buffers(ids.len())?;
        // The pinned staging is written now, whatever the mode: a replayed graph's first copy reads it.
        // SAFETY: the staging holds at least ids.len() u32 and no queued copy still reads it (every
        // eager embed waits for its copy; a graph's copy finished at the last read-back).
        unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), host, ids.len()) };
        let outp = out.ptr;
        self.op(&[opc::EMBED, table.ptr, ids.len() as u64, outp, dids], |dev| {
            let eager = dev.cap.lock().expect("capture lock").mode() == capture::Mode::Eager;
            unsafe {
                cudarc::driver::sys::cuMemcpyHtoDAsync_v2(dids, host as *const c_void, ids.len() * 4, dev.stream)
                    .result()
                    .map_err(|e| drv("ids upload", e))?;
            }
            let mut a = KArgs::new();
            a.p(table.ptr).i(dt_code(table.dtype)).p(dids).i(d).p(outp);
            dev.launch(dev.f.embed, (d.div_ceil(256).min(64) as u32, ids.len() as u32, 1), 256, 0, &mut a)?;
            if eager {
                dev.sync()?;
            }
            Ok(())
        })
    }

    fn device_greedy(&self) -> bool {
        true
    }

    fn head_top1_chosen(&self, x: &CudaBuf, rows: usize, w: &CudaMat, n: usize, cap: f32, scratch: &mut CudaBuf) -> Result<u64> {
        if n != w.rows || n == 0 || rows == 0 {
            return Err(Error::Device(format!("cuda head_top1_chosen: {rows} rows of {n} logits from a {}-row head", w.rows)));
        }
        // As head_top_k with k = 1, the picks kept on the device for the next embed and their copy
        // to the host queued behind them; nothing waits here.
        let mut chosen = self.chosen.lock().expect("chosen ids lock");
        let picked = chosen.picked_for(rows)?;
        self.head_select(x, rows, w, n, cap, 1, scratch, picked)?;
        chosen.start_readback(rows)
    }

    fn chosen_readback(&self, rows: usize) -> Result<u64> {
        self.chosen.lock().expect("chosen ids lock").start_readback(rows)
    }

    fn chosen_ids(&self, ticket: u64) -> Result<Vec<u32>> {
        self.dev.bind()?;
        self.chosen.lock().expect("chosen ids lock").take(ticket)
    }

    fn matmul(&self, x: &CudaBuf, rows: usize, w: &CudaMat, out: &mut CudaBuf) -> Result<()> {
        check("matmul", "x", x.len, rows * w.cols)?;
        check("matmul", "out", out.len, rows * w.rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, op) = (x.ptr, out.ptr);
        self.op(&[opc::MATMUL, xp, rows as u64, w.ptr, op], |dev| {
            if Self::gemv_fits(rows, w) {
                self.gemv(dev, rows, w.cols, xp, None, 0, &[Seg { w, w2: None, out: op, mode: 0 }], 0)
            } else {
                self.gemm(dev, rows, w, xp, None, op, 0.0)
            }
        })
    }

    fn rms_norm(&self, x: &CudaBuf, rows: usize, width: usize, weight: &CudaBuf, eps: f32, out: &mut CudaBuf) -> Result<()> {
        check("rms_norm", "x", x.len, rows * width)?;
        check("rms_norm", "out", out.len, rows * width)?;
        check("rms_norm", "weight", weight.len, width)?;
        let (xp, wp, op) = (x.ptr, weight.ptr, out.ptr);
        self.op(&[opc::RMS, xp, rows as u64, width as u64, wp, eps.to_bits() as u64, op], |dev| {
            if rows == 0 {
                return Ok(());
            }
            self.rms(dev, xp, rows, width, wp, eps, op, 0, DType::BF16)
        })
    }

    fn group_norm(&self, x: &CudaBuf, rows: usize, width: usize, group: usize, weight: &CudaBuf, bias: Option<&CudaBuf>, eps: f32, out: &mut CudaBuf) -> Result<()> {
        check("group_norm", "x", x.len, rows * width)?;
        check("group_norm", "out", out.len, rows * width)?;
        check("group_norm", "weight", weight.len, width)?;
        if group == 0 || width % group != 0 {
            return Err(Error::Device(format!("group_norm: width {width} is not a multiple of group {group}")));
        }
        let (xp, wp, bp, op) = (x.ptr, weight.ptr, bias.map_or(0, |b| b.ptr), out.ptr);
        self.op(&[opc::GN, xp, rows as u64, width as u64, group as u64, wp, bp, eps.to_bits() as u64, op], |dev| {
            if rows == 0 {
                return Ok(());
            }
            self.group_norm_rows(dev, xp, rows, width, group, wp, bp, eps, (0, width, DType::F32), op, 0, DType::BF16)
        })
    }

    fn bias_soft_cap(&self, x: &mut CudaBuf, rows: usize, width: usize, bias: Option<&CudaBuf>, cap: f32) -> Result<()> {
        check("bias_soft_cap", "x", x.len, rows * width)?;
        let (xp, bp) = (x.ptr, bias.map_or(0, |b| b.ptr));
        self.op(&[opc::CAP, xp, rows as u64, width as u64, bp, cap.to_bits() as u64], |dev| {
            let mut a = KArgs::new();
            a.p(xp).i(rows).i(width).p(bp).f(cap);
            self.ew(dev, dev.f.bias_soft_cap, rows * width, &mut a)
        })
    }

    fn add(&self, x: &mut CudaBuf, y: &CudaBuf, len: usize) -> Result<()> {
        check("add", "x", x.len, len)?;
        check("add", "y", y.len, len)?;
        let (xp, yp) = (x.ptr, y.ptr);
        self.op(&[opc::ADD, xp, yp, len as u64], |dev| {
            let mut a = KArgs::new();
            a.p(xp).p(yp).i(len);
            self.ew(dev, dev.f.add, len, &mut a)
        })
    }

    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf, len: usize, out: &mut CudaBuf) -> Result<()> {
        self.gated_act(Activation::Silu, gate, up, len, out)
    }

    fn sigmoid_gate(&self, gate: &CudaBuf, x: &mut CudaBuf, len: usize) -> Result<()> {
        check("sigmoid_gate", "gate", gate.len, len)?;
        check("sigmoid_gate", "x", x.len, len)?;
        let (gp, xp) = (gate.ptr, x.ptr);
        self.op(&[opc::SIG, gp, xp, len as u64], |dev| {
            let mut a = KArgs::new();
            a.p(gp).p(xp).i(len);
            self.ew(dev, dev.f.sigmoid_gate, len, &mut a)
        })
    }

    fn gated_act(&self, act: Activation, gate: &CudaBuf, up: &CudaBuf, len: usize, out: &mut CudaBuf) -> Result<()> {
        check("gated_act", "gate", gate.len, len)?;
        check("gated_act", "up", up.len, len)?;
        check("gated_act", "out", out.len, len)?;
        let (gp, upp, op) = (gate.ptr, up.ptr, out.ptr);
        self.op(&[opc::GATED, act_code(act) as u64, gp, upp, op, len as u64], |dev| {
            let mut a = KArgs::new();
            a.i(act_code(act)).p(gp).p(upp).p(op).i(len);
            self.ew(dev, dev.f.gated_act, len, &mut a)
        })
    }

    fn scaled_add(&self, x: &mut CudaBuf, y: &CudaBuf, scale: &CudaBuf, rows: usize, width: usize) -> Result<()> {
        check("scaled_add", "x", x.len, rows * width)?;
        check("scaled_add", "y", y.len, rows * width)?;
        check("scaled_add", "scale", scale.len, width)?;
        let (xp, yp, sp) = (x.ptr, y.ptr, scale.ptr);
        self.op(&[opc::SCALED, xp, yp, sp, rows as u64, width as u64], |dev| {
            let mut a = KArgs::new();
            a.p(xp).p(yp).p(sp).i(rows).i(width);
            self.ew(dev, dev.f.scaled_add, rows * width, &mut a)
        })
    }

    fn copy_cols(&self, src: &CudaBuf, src_stride: usize, src_off: usize, dst: &mut CudaBuf, dst_stride: usize, dst_off: usize, rows: usize, width: usize) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        if src_off + width > src_stride || dst_off + width > dst_stride {
            return Err(Error::Device(format!(
                "cuda copy_cols: columns {src_off}+{width} / {dst_off}+{width} overrun row strides {src_stride} / {dst_stride}"
            )));
        }
        check("copy_cols", "src", src.len, (rows - 1) * src_stride + src_off + width)?;
        check("copy_cols", "dst", dst.len, (rows - 1) * dst_stride + dst_off + width)?;
        let (sp, dp) = (src.ptr, dst.ptr);
        let w = [opc::COLS, sp, src_stride as u64, src_off as u64, dp, dst_stride as u64, dst_off as u64, rows as u64, width as u64];
        self.op(&w, |dev| {
            let mut a = KArgs::new();
            a.p(sp).i(src_stride).i(src_off).p(dp).i(dst_stride).i(dst_off).i(rows).i(width);
            self.ew(dev, dev.f.copy_cols, rows * width, &mut a)
        })
    }

    fn headwise(&self, x: &CudaBuf, rows: usize, w: &CudaBuf, d: HeadwiseDims, bias: Option<&CudaBuf>, out: &mut CudaBuf) -> Result<()> {
        check("headwise", "x", x.len, rows * d.blocks * d.din)?;
        check("headwise", "w", w.len, d.blocks * d.dout * d.din)?;
        check("headwise", "out", out.len, rows * d.blocks * d.dout)?;
        if let Some(b) = bias {
            check("headwise", "bias", b.len, d.blocks * d.dout)?;
        }
        let (xp, wp, bp, op) = (x.ptr, w.ptr, bias.map_or(0, |b| b.ptr), out.ptr);
        self.op(&[opc::HEADWISE, xp, rows as u64, wp, d.blocks as u64, d.din as u64, d.dout as u64, bp, op], |dev| {
            let mut a = KArgs::new();
            a.p(xp).i(rows).p(wp).i(d.blocks).i(d.din).i(d.dout).p(bp).p(op);
            self.ew(dev, dev.f.headwise, rows * d.blocks * d.dout, &mut a)
        })
    }

    fn conv1d_prefill(&self, d: ConvDims, seq: usize, x: &CudaBuf, w: &CudaBuf, bias: &CudaBuf, state: &mut CudaBuf, silu: bool, out: &mut CudaBuf) -> Result<()> {
        check_conv("conv1d_prefill", d, seq, 1, x, w, bias, state, out)?;
        let (xp, wp, bp, sp, op) = (x.ptr, w.ptr, bias.ptr, state.ptr, out.ptr);
        self.op(&[opc::CONV_SEQ, d.channels as u64, d.kernel as u64, seq as u64, xp, wp, bp, sp, silu as u64, op], |dev| {
            let mut a = KArgs::new();
            a.i(d.channels).i(d.kernel).i(seq).p(xp).p(wp).p(bp).p(sp).i(silu as usize).p(op);
            self.ew(dev, dev.f.conv_seq_out, seq * d.channels, &mut a)?;
            let mut a = KArgs::new();
            a.i(d.channels).i(d.kernel).i(seq).p(xp).p(sp);
            self.ew(dev, dev.f.conv_seq_state, d.channels, &mut a)
        })
    }

    fn conv1d_step(&self, d: ConvDims, batch: usize, x: &CudaBuf, w: &CudaBuf, bias: &CudaBuf, state: &mut CudaBuf, silu: bool, out: &mut CudaBuf) -> Result<()> {
        check_conv("conv1d_step", d, batch, batch, x, w, bias, state, out)?;
        let (xp, wp, bp, sp, op) = (x.ptr, w.ptr, bias.ptr, state.ptr, out.ptr);
        self.op(&[opc::CONV_STEP, d.channels as u64, d.kernel as u64, batch as u64, xp, wp, bp, sp, silu as u64, op], |dev| {
            let mut a = KArgs::new();
            a.i(d.channels).i(d.kernel).i(batch).p(xp).p(wp).p(bp).p(sp).i(silu as usize).p(op);
            self.ew(dev, dev.f.conv_step, batch * d.channels, &mut a)
        })
    }

    fn mlstm_step(&self, d: MlstmDims, batch: usize, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, i: &CudaBuf, f: &CudaBuf, s: &mut MlstmState<CudaBuf>, eps: f32, h: &mut CudaBuf) -> Result<()> {
        Self::check_mlstm("mlstm_step", d, batch, batch, [q, k, v, i, f, h], s)?;
        let p = [q.ptr, k.ptr, v.ptr, i.ptr, f.ptr];
        let st = StatePtrs::of(s);
        let hp = h.ptr;
        let w = [opc::MSTEP, d.heads as u64, d.dk as u64, d.dv as u64, batch as u64, p[0], p[1], p[2], p[3], p[4], st.c, st.n, st.m, eps.to_bits() as u64, hp, st.c16 as u64];
        self.op(&w, |dev| {
            if batch == 0 {
                return Ok(());
            }
            self.mstep(dev, d, batch, p, None, st, eps, hp, None, true, StepLayout::packed(d))
        })
    }

    fn mlstm_prefill(&self, kernel: MlstmKernel, d: MlstmDims, seq: usize, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, i: &CudaBuf, f: &CudaBuf, s: &mut MlstmState<CudaBuf>, eps: f32, h: &mut CudaBuf) -> Result<()> {
        Self::check_mlstm("mlstm_prefill", d, seq, 1, [q, k, v, i, f, h], s)?;
        let chunk = match kernel {
            MlstmKernel::Chunkwise { chunk: 0 } => return Err(Error::Input("chunk size must be positive".into())),
            MlstmKernel::Chunkwise { chunk } => chunk,
            MlstmKernel::Sequence => 0,
        };
        let hp = h.ptr;
        let st = StatePtrs::of(s);
        let w = [opc::MPREFILL, chunk as u64, d.heads as u64, d.dk as u64, d.dv as u64, seq as u64, q.ptr, k.ptr, v.ptr, i.ptr, f.ptr, st.c, st.n, st.m, eps.to_bits() as u64, hp, st.c16 as u64];
        self.op(&w, |dev| {
            if seq == 0 {
                return Ok(());
            }
            if chunk == 0 {
                let nh = d.heads;
                for t in 0..seq {
                    let off = |base: u64, width: usize| base + (4 * t * width) as u64;
                    let p = [off(q.ptr, nh * d.dk), off(k.ptr, nh * d.dk), off(v.ptr, nh * d.dv), off(i.ptr, nh), off(f.ptr, nh)];
                    self.mstep(dev, d, 1, p, None, st, eps, off(hp, nh * d.dv), None, true, StepLayout::packed(d))?;
                }
                Ok(())
            } else {
                let (qk, vw) = (d.heads * d.dk, d.heads * d.dv);
                self.mchunk(dev, d, seq, chunk, [(q.ptr, qk), (k.ptr, qk), (v.ptr, vw)], i.ptr, f.ptr, st, eps, Some(hp), false)
            }
        })
    }

    fn slstm_step(&self, batch: usize, g: SlstmGates<'_, CudaBuf>, r: &CudaBuf, bias: &CudaBuf, s: &mut SlstmState<CudaBuf>, y: &mut CudaBuf) -> Result<()> {
        self.slstm(batch, 1, g, r, bias, s, y)
    }

    fn slstm_prefill(&self, seq: usize, g: SlstmGates<'_, CudaBuf>, r: &CudaBuf, bias: &CudaBuf, s: &mut SlstmState<CudaBuf>, y: &mut CudaBuf) -> Result<()> {
        self.slstm(1, seq, g, r, bias, s, y)
    }

    // ---- fused compositions ---------------------------------------------------------------------

    fn norm_matmuls(&self, x: &CudaBuf, rows: usize, width: usize, weight: &CudaBuf, eps: f32, xn: &mut CudaBuf, mats: &[&CudaMat], outs: &mut [&mut CudaBuf]) -> Result<()> {
        check("norm_matmuls", "x", x.len, rows * width)?;
        check("norm_matmuls", "xn", xn.len, rows * width)?;
        check("norm_matmuls", "weight", weight.len, width)?;
        if mats.len() != outs.len() {
            return Err(Error::Device("cuda norm_matmuls: as many outputs as matrices needed".into()));
        }
        let mut words = vec![opc::NORM_MM, x.ptr, rows as u64, width as u64, weight.ptr, eps.to_bits() as u64, xn.ptr];
        for (m, o) in mats.iter().zip(outs.iter()) {
            if m.cols != width {
                return Err(Error::Device(format!("cuda norm_matmuls: matrix takes {} inputs, rows are {width} wide", m.cols)));
            }
            check("norm_matmuls", "out", o.len, rows * m.rows)?;
            words.extend([m.ptr, o.ptr]);
        }
        if rows == 0 {
            return Ok(());
        }
        let (xp, wp, xnp) = (x.ptr, weight.ptr, xn.ptr);
        let outp: Vec<u64> = outs.iter().map(|o| o.ptr).collect();
        self.op(&words, |dev| {
            if mats.len() <= 8 && mats.iter().all(|m| Self::gemv_fits(rows, m)) {
                let segs: Vec<Seg> = mats.iter().zip(&outp).map(|(m, &o)| Seg { w: m, w2: None, out: o, mode: 0 }).collect();
                return self.gemv(dev, rows, width, xp, Some((wp, eps)), xnp, &segs, 0);
            }
            let hdt = mats.iter().find(|m| m.dtype != DType::F32).map(|m| m.dtype);
            let xh = match hdt {
                Some(_) => dev.half_scratch(rows * width, None)?,
                None => 0,
            };
            self.rms(dev, xp, rows, width, wp, eps, xnp, xh, hdt.unwrap_or(DType::BF16))?;
            if mats.iter().all(|m| m.dtype == DType::F32 || Some(m.dtype) == hdt) {
                return self.gemm_group(dev, rows, mats, xnp, hdt.map(|_| xh), &outp);
            }
            for (m, &o) in mats.iter().zip(&outp) {
                let h = (m.dtype != DType::F32 && Some(m.dtype) == hdt).then_some(xh);
                self.gemm(dev, rows, m, xnp, h, o, 0.0)?;
            }
            Ok(())
        })
    }

    fn matmul_add(&self, x: &CudaBuf, rows: usize, w: &CudaMat, out: usize, tmp: &mut CudaBuf, acc: &mut CudaBuf) -> Result<()> {
        check("matmul_add", "x", x.len, rows * w.cols)?;
        check("matmul_add", "acc", acc.len, rows * w.rows)?;
        let _ = tmp;
        if out != w.rows {
            return Err(Error::Device(format!("cuda matmul_add: matrix has {} rows, {out} given", w.rows)));
        }
        if rows == 0 {
            return Ok(());
        }
        let (xp, ap) = (x.ptr, acc.ptr);
        self.op(&[opc::MM_ADD, xp, rows as u64, w.ptr, ap], |dev| {
            if Self::gemv_fits(rows, w) {
                self.gemv(dev, rows, w.cols, xp, None, 0, &[Seg { w, w2: None, out: ap, mode: 1 }], 0)
            } else {
                self.gemm(dev, rows, w, xp, None, ap, 1.0)
            }
        })
    }

    fn norm_gated_up(&self, x: &CudaBuf, rows: usize, width: usize, weight: &CudaBuf, eps: f32, xn: &mut CudaBuf, gate: &CudaMat, up: &CudaMat, ff: usize, act: Activation, g: &mut CudaBuf, u: &mut CudaBuf, out: &mut CudaBuf) -> Result<()> {
        check("norm_gated_up", "x", x.len, rows * width)?;
        check("norm_gated_up", "xn", xn.len, rows * width)?;
        check("norm_gated_up", "out", out.len, rows * ff)?;
        check("norm_gated_up", "g", g.len, rows * ff)?;
        check("norm_gated_up", "u", u.len, rows * ff)?;
        if gate.rows != ff || up.rows != ff || gate.cols != width || up.cols != width || gate.dtype != up.dtype {
            return Err(Error::Device("cuda norm_gated_up: gate and up must both be [ff, width] of one dtype".into()));
        }
        if rows == 0 {
            return Ok(());
        }
        let (xp, wp, xnp, gp, upp, op) = (x.ptr, weight.ptr, xn.ptr, g.ptr, u.ptr, out.ptr);
        let words = [opc::GATED_UP, xp, rows as u64, width as u64, wp, eps.to_bits() as u64, xnp, gate.ptr, up.ptr, act_code(act) as u64, gp, upp, op];
        self.op(&words, |dev| {
            if Self::gemv_fits(rows, gate) {
                return self.gemv(dev, rows, width, xp, Some((wp, eps)), xnp, &[Seg { w: gate, w2: Some(up), out: op, mode: 2 }], act_code(act));
            }
            let hdt = (gate.dtype != DType::F32).then_some(gate.dtype);
            let xh = match hdt {
                Some(_) => dev.half_scratch(rows * width, None)?,
                None => 0,
            };
            self.rms(dev, xp, rows, width, wp, eps, xnp, xh, hdt.unwrap_or(DType::BF16))?;
            let h = hdt.map(|_| xh);
            if gate.adjacent(up) {
                return self.gated_up_adjacent(dev, rows, width, xnp, h, gate, ff, act, op).map(|_| ());
            }
            self.gemm(dev, rows, gate, xnp, h, gp, 0.0)?;
            self.gemm(dev, rows, up, xnp, h, upp, 0.0)?;
            let mut a = KArgs::new();
            a.i(act_code(act)).p(gp).p(upp).p(op).i(rows * ff);
            self.ew(dev, dev.f.gated_act, rows * ff, &mut a)
        })
    }

    fn decode_stack(&self, x: &mut CudaBuf, width: usize, d: MlstmDims, blocks: &[StackBlock<'_, Self>], states: &mut [&mut MlstmState<CudaBuf>], head: Option<StackHead<'_, Self>>) -> Result<bool> {
        self.stack_step(x, width, d, blocks, states, head)
    }

    fn norm_gated_ffn_add(&self, x: &mut CudaBuf, rows: usize, width: usize, weight: &CudaBuf, eps: f32, gate: &CudaMat, up: &CudaMat, down: &CudaMat, ff: usize, act: Activation, s: FfnScratch<'_, CudaBuf>) -> Result<()> {
        // A prompt's FFN with 16-bit weights keeps its intermediates in 16 bits only: the normalised
        // rows and act(g)·u are written once, as the operands of the products that take them (the
        // f32 copies, which nothing reads, would be 3·ff + 2·width bytes per row more traffic).
        // Decode (GEMV) and f32 weights: the two fused ops.
        let half = gate.dtype != DType::F32 && down.dtype == gate.dtype && gate.adjacent(up) && down.rows == width && down.cols == ff;
        if Self::gemv_fits(rows, gate) || !half || rows == 0 {
            return norm_gated_ffn_add_composed(self, x, rows, width, weight, eps, gate, up, down, ff, act, s);
        }
        check("norm_gated_ffn_add", "x", x.len, rows * width)?;
        check("norm_gated_ffn_add", "weight", weight.len, width)?;
        if gate.rows != ff || up.rows != ff || gate.cols != width || up.cols != width || gate.dtype != up.dtype {
            return Err(Error::Device("cuda norm_gated_ffn_add: gate and up must both be [ff, width] of one dtype".into()));
        }
        let (xp, wp, dt) = (x.ptr, weight.ptr, gate.dtype);
        let words = [opc::FFN, xp, rows as u64, width as u64, wp, eps.to_bits() as u64, gate.ptr, up.ptr, down.ptr, act_code(act) as u64];
        self.op(&words, |dev| {
            let xh = dev.half_scratch(rows * width, None)?;
            self.rms(dev, xp, rows, width, wp, eps, 0, xh, dt)?;
            let oh = self.gated_up_adjacent(dev, rows, width, 0, Some(xh), gate, ff, act, 0)?;
            self.gemm(dev, rows, down, 0, Some(oh), xp, 1.0)
        })
    }

    fn mlstm_gated_cell(&self, kernel: Option<MlstmKernel>, d: MlstmDims, rows: usize, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, o: &CudaBuf, i: &mut CudaBuf, f: &mut CudaBuf, ibias: &CudaBuf, fbias: &CudaBuf, cap: f32, state: &mut MlstmState<CudaBuf>, eps: f32, norm: &CudaBuf, norm_eps: f32, h: &mut CudaBuf, hn: &mut CudaBuf) -> Result<()> {
        let batch = if kernel.is_some() { 1 } else { rows };
        Self::check_mlstm("mlstm_gated_cell", d, rows, batch, [q, k, v, i, f, h], state)?;
        let width = d.heads * d.dv;
        check("mlstm_gated_cell", "o", o.len, rows * width)?;
        check("mlstm_gated_cell", "hn", hn.len, rows * width)?;
        check("mlstm_gated_cell", "norm", norm.len, width)?;
        check("mlstm_gated_cell", "ibias", ibias.len, d.heads)?;
        check("mlstm_gated_cell", "fbias", fbias.len, d.heads)?;
        if rows == 0 {
            return Ok(());
        }
        let Some(kernel) = kernel else {
            let p = [q.ptr, k.ptr, v.ptr, i.ptr, f.ptr];
            let st = StatePtrs::of(state);
            let (hp, op, nwp, hnp, ib, fb) = (h.ptr, o.ptr, norm.ptr, hn.ptr, ibias.ptr, fbias.ptr);
            let words = [opc::MCELL, d.heads as u64, d.dk as u64, d.dv as u64, rows as u64, p[0], p[1], p[2], p[3], p[4], ib, fb, cap.to_bits() as u64, st.c, st.n, st.m, eps.to_bits() as u64, hp, op, nwp, norm_eps.to_bits() as u64, hnp, st.c16 as u64];
            return self.op(&words, |dev| self.mstep(dev, d, rows, p, Some((ib, fb, cap)), st, eps, hp, Some((op, nwp, norm_eps, hnp)), true, StepLayout::packed(d)));
        };
        // Prefill: gates, chunkwise cell, then LayerNorm and the output gate in one kernel.
        self.bias_soft_cap(i, rows, d.heads, Some(ibias), cap)?;
        self.bias_soft_cap(f, rows, d.heads, Some(fbias), cap)?;
        self.mlstm_prefill(kernel, d, rows, q, k, v, i, f, state, eps, h)?;
        let (hp, op, nwp, hnp) = (h.ptr, o.ptr, norm.ptr, hn.ptr);
        self.op(&[opc::GN, hp, rows as u64, width as u64, d.dv as u64, nwp, op, norm_eps.to_bits() as u64, hnp, 1], |dev| {
            // with 16-bit weights, also the 16-bit copy of hn that out_proj's product will take
            let hdt = *dev.weight_dtype.lock().expect("dtype lock");
            let hh = match hdt {
                DType::F32 => 0,
                dt => dev.half_scratch(rows * width, Some((hnp, rows * width, dt)))?,
            };
            self.group_norm_rows(dev, hp, rows, width, d.dv, nwp, 0, norm_eps, (op, width, DType::F32), hnp, hh, hdt)
        })
    }

    fn norm_mlstm_add(&self, x: &mut CudaBuf, rows: usize, width: usize, d: MlstmDims, kernel: Option<MlstmKernel>, w: &MlstmHalf<'_, Self>, state: &mut MlstmState<CudaBuf>, s: MlstmScratch<'_, CudaBuf>) -> Result<()> {
        // With 16-bit weights past the GEMV's rows, a decode batch takes `norm_mlstm_add_step`; a
        // prompt the path below: one kernel normalises x into the 16-bit operand of the products
        // and computes the gate rows' products in f32 on the way (no normalised f32 copy, no
        // SGEMM); q, k, v, o stay in the merged product's output, where the chunk kernels and the
        // head LayerNorm read them (no column split); the head norm writes only the 16-bit operand
        // of out_proj. Anything else: the compositions.
        if self.merged_mlstm_step(x.ptr, rows, width, d, kernel, w, &s) {
            return self.norm_mlstm_add_step(x, rows, width, d, w, state, s);
        }
        let Some(chunk) = self.merged_mlstm_prefill(x.ptr, rows, width, d, kernel, w, &s) else {
            return norm_mlstm_add_composed(self, x, rows, width, d, kernel, w, state, s);
        };
        self.norm_mlstm_prompt(x, rows, width, d, chunk, w, state, s, true)
    }

    fn norm_mlstm_state(&self, x: &mut CudaBuf, rows: usize, width: usize, d: MlstmDims, kernel: MlstmKernel, w: &MlstmHalf<'_, Self>, state: &mut MlstmState<CudaBuf>, s: MlstmScratch<'_, CudaBuf>) -> Result<()> {
        // The merged prompt path without what only the outputs need: the product of k and v alone
        // (adjacent rows of the merged weights), the chunk states, no chunk outputs, head norm
        // or out_proj.
        match self.merged_mlstm_prefill(x.ptr, rows, width, d, Some(kernel), w, &s) {
            Some(chunk) => self.norm_mlstm_prompt(x, rows, width, d, chunk, w, state, s, false),
            None => norm_mlstm_add_composed(self, x, rows, width, d, Some(kernel), w, state, s),
        }
    }

    // ---- capture hooks ----------------------------------------------------------------------------

    fn step_begin(&self) -> Result<()> {
        self.dev.bind()?;
        self.dev.cap.lock().expect("capture lock").step_begin(self.dev.stream)
    }

    fn step_end(&self) -> Result<bool> {
        self.dev.bind()?;
        self.dev.cap.lock().expect("capture lock").step_end(self.dev.stream)
    }

    fn device_bandwidth(&self) -> Result<Option<Bandwidth>> {
        self.measure_bandwidth().map(Some)
    }
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    fn slstm(&self, batch: usize, steps: usize, g: SlstmGates<'_, CudaBuf>, r: &CudaBuf, bias: &CudaBuf, s: &mut SlstmState<CudaBuf>, y: &mut CudaBuf) -> Result<()> {
        let op = if steps == 1 && batch >= 1 { "slstm_step" } else { "slstm_prefill" };
        let (w, nh) = (s.width, s.heads);
        let rows = batch * steps;
        let gates = [g.i.len, g.f.len, g.z.len, g.o.len];
        let dh = shapes::slstm("cuda", op, rows, batch, w, nh, gates, r.len, bias.len, [s.c.len, s.n.len, s.m.len, s.h.len], y.len)?;
        if 5 * dh * 4 > 48 * 1024 {
            return Err(Error::Device(format!("cuda {op}: head width {dh} too large (≤ 2457)")));
        }
        let p = [g.i.ptr, g.f.ptr, g.z.ptr, g.o.ptr, r.ptr, bias.ptr, s.c.ptr, s.n.ptr, s.m.ptr, s.h.ptr, y.ptr];
        let mut words = vec![opc::SLSTM, w as u64, nh as u64, batch as u64, steps as u64];
        words.extend(p);
        self.op(&words, |dev| {
            if rows == 0 {
                return Ok(());
            }
            let mut a = KArgs::new();
            a.i(w).i(nh).i(steps);
            for x in p {
                a.p(x);
            }
            dev.launch(dev.f.slstm_run, (nh as u32, batch as u32, 1), 256, (5 * dh * 4) as u32, &mut a)
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn check_conv(op: &str, d: ConvDims, rows: usize, batch: usize, x: &CudaBuf, w: &CudaBuf, bias: &CudaBuf, state: &CudaBuf, out: &CudaBuf) -> Result<()> {
    if d.kernel > 17 {
        return Err(Error::Device(format!("cuda {op}: conv1d kernels of 1..=17 taps supported, got {}", d.kernel)));
    }
    shapes::conv("cuda", op, d, rows, batch, [x.len, w.len, bias.len, state.len, out.len])
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain numeric types (f32, bf16, f16) without padding; the view covers the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}
