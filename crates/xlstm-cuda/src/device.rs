//! The device: driver checks, context, stream, loaded kernels, cuBLAS, memory, launches.
//!
//! Everything runs on one non-blocking stream (the context's default stream cannot be captured into
//! a CUDA graph). Device memory is plain `cuMemAlloc`; buffers free themselves on drop.
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as cbsys;
use cudarc::driver::sys::{self, CUdeviceptr, CUfunction, CUstream};
use cudarc::driver::{result as dres, CudaContext, CudaModule};
use xlstm_core::tensor::DType;
use xlstm_core::{Error, Result};

use crate::capture::Capture;
use crate::kernels;

/// What a usable CUDA device needs, checked in order; the first failure names what is missing.
pub fn probe() -> std::result::Result<(), String> {
    // SAFETY (all is_culib_present): only dlopen attempts.
    if !unsafe { sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) was not found: this machine has no NVIDIA driver".into());
    }
    if let Err(e) = dres::init() {
        return Err(format!("the CUDA driver is installed but failed to initialise ({e}): no usable GPU"));
    }
    let mut ver = 0i32;
    // SAFETY: out-parameter.
    unsafe { sys::cuDriverGetVersion(&mut ver) };
    if ver < 13000 {
        return Err(format!(
            "the NVIDIA driver supports CUDA {}.{}, this build needs CUDA 13.0 or newer (driver 580+)",
            ver / 1000,
            (ver % 1000) / 10
        ));
    }
    match dres::device::get_count() {
        Ok(0) => return Err("the CUDA driver sees no GPU (device count 0)".into()),
        Err(e) => return Err(format!("the CUDA driver could not count GPUs ({e})")),
        Ok(_) => {}
    }
    if !kernels::nvrtc_available() {
        return Err("libnvrtc (the CUDA run-time compiler) was not found: install the CUDA toolkit or \
                    `pip install nvidia-cuda-nvrtc==13.0.88` and put its lib folder (…/nvidia/cu13/lib) on LD_LIBRARY_PATH"
            .into());
    }
    if !unsafe { cbsys::is_culib_present() } {
        return Err("libcublas was not found: put the CUDA libraries on LD_LIBRARY_PATH (e.g. /usr/local/cuda/lib64, or \
                    `pip install nvidia-cublas` and its …/nvidia/cu13/lib)"
            .into());
    }
    Ok(())
}

pub(crate) fn drv(op: &str, e: dres::DriverError) -> Error {
    Error::Device(format!("cuda {op}: {e}"))
}

pub(crate) fn blas_ok(op: &str, s: cbsys::cublasStatus_t) -> Result<()> {
    if s == cbsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device(format!("cuda {op}: cuBLAS returned {s:?}")))
    }
}

/// Kernel handles, one field per entry point.
pub(crate) struct Funcs {
    pub embed: CUfunction,
    pub bias_soft_cap: CUfunction,
    pub add: CUfunction,
    pub sigmoid_gate: CUfunction,
    pub gated_act: CUfunction,
    pub gated_act_split: CUfunction,
    pub split_cols: CUfunction,
    pub scaled_add: CUfunction,
    pub copy_cols: CUfunction,
    pub to_half: CUfunction,
    pub from_half: CUfunction,
    pub read_sum: CUfunction,
    pub rms_norm: CUfunction,
    pub group_norm: CUfunction,
    pub group_norm_warp: CUfunction,
    pub group_norm_warp4: CUfunction,
    pub group_norm_warp4h: CUfunction,
    pub rms_gate_dots: CUfunction,
    pub gemv: [CUfunction; 4],
    pub dots_f32: CUfunction,
    /// A decode batch's bf16 products on Hopper's tensor cores, 3–16 rows (kernels/gemv.cu).
    pub skinny_mma: CUfunction,
    /// The step kernels (kernels/mlstm.cu): [C in bf16][narrow, pair, wide].
    pub mlstm_step: [[CUfunction; 3]; 2],
    /// With deferred updates of C (f32 C): narrow, wide.
    pub mlstm_step_pend: [CUfunction; 2],
    /// Folds a state's deferred updates into C.
    pub mlstm_settle: CUfunction,
    pub chunk_states: CUfunction,
    pub chunk_out: CUfunction,
    /// Tensor-core chunk kernels: [TF32, exact (split TF32)].
    pub chunk_states_tc: [CUfunction; 2],
    pub chunk_out_tc: [CUfunction; 2],
    /// The gate terms of every chunk, for the tensor-core chunk kernels.
    pub chunk_gates: CUfunction,
    /// bf16 tensor-core chunk kernels (a bf16 model's merged prompt path): states, outputs.
    pub chunk_states_bf16: CUfunction,
    pub chunk_out_bf16: CUfunction,
    pub headwise: CUfunction,
    pub conv_seq_out: CUfunction,
    pub conv_seq_state: CUfunction,
    pub conv_step: CUfunction,
    pub slstm_run: CUfunction,
    pub topk_rows: CUfunction,
    /// A whole xlstm-large stack's decode step for one sequence in one persistent launch (kernels/stack.cu).
    pub stack_step1: CUfunction,
}

/// A grow-only device allocation owned by the device (scratch the ops need internally).
#[derive(Default)]
pub(crate) struct Scratch {
    pub ptr: CUdeviceptr,
    pub bytes: usize,
}

/// The scratch set of ops inside decode steps, and of all others.
pub(crate) const STEP: usize = 0;
pub(crate) const SEQUENCE: usize = 1;

#[derive(Default)]
pub(crate) struct Scratches {
    /// 16-bit copy of a matmul's activations (cuBLAS operand).
    pub half: Scratch,
    /// One product over several adjacent matrices, before it is split into their outputs.
    pub wide: Scratch,
    /// mLSTM step: one u32 counter per unit (zeroed).
    pub counters: Scratch,
    /// skinny_mma with split K: a counter per column tile (zeroed), and the splits' partial sums.
    pub sk_counters: Scratch,
    pub sk_parts: Scratch,
    /// Chunkwise prefill: states entering each chunk, and each chunk's gate terms.
    pub cs: Scratch,
    /// Chunkwise prefill of a bf16 state: its C widened to f32 for the chunk kernels.
    pub c32: Scratch,
    pub gates: Scratch,
    pub ns: Scratch,
    pub ms: Scratch,
    /// Token ids on the device.
    pub ids: Scratch,
    /// stack_step1: its intermediates, its counters (zero between launches), its layer table.
    pub stack_io: Scratch,
    pub stack_sync: Scratch,
    pub stack_table: Scratch,
    /// Pinned host staging for token ids.
    pub ids_host: usize,
    pub ids_host_ptr: usize,
}

impl Scratches {
    /// Every device allocation of the set.
    fn device_buffers(&mut self) -> [&mut Scratch; 13] {
        [&mut self.half, &mut self.wide, &mut self.counters, &mut self.sk_counters, &mut self.sk_parts, &mut self.cs, &mut self.gates, &mut self.ns, &mut self.ms, &mut self.ids, &mut self.stack_io, &mut self.stack_sync, &mut self.stack_table]
    }
}

/// What the `half` scratch holds: a 16-bit copy of an f32 buffer (pointer, elements, dtype) left by
/// the op that ran last, so that the next op's cuBLAS product need not convert that buffer again.
#[derive(Default)]
pub(crate) struct HalfTag {
    /// Left by the running op.
    next: Option<(CUdeviceptr, usize, DType)>,
    /// Left by the previous op; usable by the running op until it writes the scratch itself.
    prev: Option<(CUdeviceptr, usize, DType)>,
}

pub(crate) struct Dev {
    pub ctx: Arc<CudaContext>,
    pub stream: CUstream,
    pub f: Funcs,
    pub blas: cbsys::cublasHandle_t,
    pub blas_ws: CUdeviceptr,
    /// 16-bit products with per-shape timed algorithms (None: cublasGemmEx; see lt.rs).
    pub lt: Option<crate::lt::Lt>,
    /// Two sets: [`STEP`] for ops inside decode steps (recorded graphs point into it) and
    /// [`SEQUENCE`] for the rest (prompts), which a long prompt's end frees.
    pub scratch: Mutex<[Scratches; 2]>,
    pub cap: Mutex<Capture>,
    pub name: String,
    pub cc: (i32, i32),
    pub sms: i32,
    /// Stages of the chunk-states kernels' ring: the most (up to 3) a block's shared memory takes
    /// here, and the number in use (`CudaBackend::set_chunk_states_stages`).
    pub max_chunk_stages: usize,
    pub chunk_stages: Mutex<usize>,
    /// Programmatic dependent launch for the decode kernels (sm_90+, `XLSTM_CUDA_PDL=0` turns it off).
    pub pdl: bool,
    /// A decode batch's bf16 products of 3–16 rows through skinny_mma rather than cuBLASLt
    /// (`XLSTM_CUDA_SKINNY=0` keeps cuBLASLt).
    pub skinny: bool,
    /// Batch-1 decode of an xlstm-large stack through `stack_step1` (sm_90+ with the shared memory
    /// it needs; `XLSTM_CUDA_STACK=0` keeps the per-op kernels).
    pub stack: std::sync::atomic::AtomicBool,
    /// Whether this device can run stack_step1 at all.
    pub stack_avail: bool,
    /// Greedy decoding's LM head in the same launch (`XLSTM_CUDA_STACK_HEAD=0`: its own kernels).
    pub stack_head: bool,
    /// Decode steps run through stack_step1 (`CudaBackend::stack_steps`).
    pub stack_steps: std::sync::atomic::AtomicU64,
    /// Of those, steps that also chose the next token (the LM head in the same launch).
    pub stack_heads: std::sync::atomic::AtomicU64,
    /// The layer table last uploaded for stack_step1: (where, its words).
    pub stack_table: Mutex<(CUdeviceptr, Vec<u64>)>,
    /// The model's weight dtype (`Backend::set_weight_dtype`). For 16-bit weights the chunkwise
    /// prefill rounds its operands to TF32 (otherwise its tensor-core products are exact, split
    /// TF32) and ops may leave 16-bit copies of their outputs for the next product.
    pub weight_dtype: Mutex<DType>,
    pub half_tag: Mutex<HalfTag>,
    /// Which chunkwise-prefill kernels run (`CudaBackend::set_chunk_kernels`).
    pub chunk_kernels: Mutex<ChunkKernels>,
    /// Per-op (calls, seconds) by op code while op timing is on (`CudaBackend::set_op_timing`).
    pub op_times: Mutex<Option<std::collections::BTreeMap<u64, (u64, f64)>>>,
    /// mLSTM states written since the last ordinary launch, by it or by the programmatic-dependent
    /// launches after it: any of them may still be running when the next kernel of the chain starts
    /// (`state_settled`). An ordinary launch waits for everything before it.
    pdl_state_writes: Mutex<Vec<CUdeviceptr>>,
    /// Bytes of every live allocation made through `alloc` (`Backend::allocated_bytes`).
    live: Mutex<std::collections::HashMap<CUdeviceptr, usize>>,
    /// The timing trace's buffer when kernels were built with it (`XLSTM_CUDA_TRACE=1`).
    trace: Option<CUdeviceptr>,
    _modules: Vec<Arc<CudaModule>>,
}

/// Records the timing trace's ring holds (common.cuh: 8 u64 each, after an 8-word header).
pub(crate) const TRACE_CAP: usize = 1 << 18;

// SAFETY: the raw handles (stream, functions, cuBLAS handle) are used only with the context bound and
// behind the device's locks where state is shared; CUDA handles may be used from any thread.
unsafe impl Send for Dev {}
unsafe impl Sync for Dev {}

/// stack_step1's dynamic shared memory: its ring (ST_STAGES × ST_STAGE_BYTES), the cell's q, k, n'
/// (ST_DK_MAX floats each) and a phase's partial sums (ST_PART_ROWS × 17 floats).
pub(crate) const STACK_SMEM: usize = 6 * 32768 + 3 * 512 * 4 + STACK_PART_ROWS * 17 * 4;
/// ST_PART_ROWS in kernels/stack.cu.
pub(crate) const STACK_PART_ROWS: usize = 320;
/// stack_step1's threads: 16 consumer warps and the producer.
pub(crate) const STACK_THREADS: u32 = 544;

/// Largest dynamic shared memory the GEMV kernels are allowed (x staged as f32: rows·K·4 bytes).
pub(crate) const GEMV_SMEM: usize = 96 * 1024;
/// skinny_mma's ring: SK_STAGES (4) stages of 64 weight rows and 16 rows of x, 64 values of K each,
/// bf16, from a 1,024-byte boundary (its 128-byte swizzle's atoms).
pub(crate) const SKINNY_SMEM: usize = 4 * (64 + 16) * 64 * 2 + 1024;
/// One stage of the tensor-core chunk-states kernels' shared-memory ring (kernels/mlstm_chunk.cu's
/// CS_STAGE: 64 × 72 keys, as many values, 68 gate terms; f32).
pub(crate) const CHUNK_STATE_STAGE: usize = (2 * 64 * 72 + 68) * 4;
/// The same for the bf16 chunk-states kernel (`CB_STAGE`: keys and values in bf16).
pub(crate) const CHUNK_BF16_STAGE: usize = 2 * 64 * 72 * 2 + 68 * 4;
const BLAS_WS: usize = 64 << 20;

impl Dev {
    pub fn new(ordinal: usize) -> Result<Dev> {
        probe().map_err(|e| Error::Device(format!("cuda unavailable: {e}")))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("context", e))?;
        ctx.bind_to_thread().map_err(|e| drv("context", e))?;
        // Our own stream carries everything; no cross-stream event tracking is needed.
        // SAFETY: called before any buffer of this context exists.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "GPU".into());
        let cc = ctx.compute_capability().map_err(|e| drv("device", e))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| drv("device", e))?;
        let smem_optin = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).map_err(|e| drv("device", e))?;
        let chunk_stages = if smem_optin as usize >= 3 * CHUNK_STATE_STAGE { 3 } else { 2 };
        let stream = dres::stream::create(dres::stream::StreamKind::NonBlocking).map_err(|e| drv("stream", e))?;
        // sm_90 exactly: its arch-specific PTX (wgmma, in skinny_mma)
        let arch = if cc == (9, 0) { "compute_90a".to_string() } else { format!("compute_{}{}", cc.0, cc.1) };
        let mut modules = Vec::new();
        let mut get = |family: &str, names: &[&str]| -> Result<Vec<CUfunction>> {
            let src = kernels::SOURCES.iter().find(|(n, _)| *n == family).expect("known family").1;
            let ptx = kernels::compile(family, src, &arch, true).map_err(Error::Device)?;
            let module = ctx.load_module(ptx.into()).map_err(|e| drv(&format!("loading kernels/{family}.cu"), e))?;
            let fs = names
                .iter()
                .map(|n| module.load_function(n).map(|f| f.cu_function()).map_err(|e| drv(&format!("kernel {n}"), e)))
                .collect::<Result<Vec<_>>>()?;
            modules.push(module);
            Ok(fs)
        };
        let e = get("elementwise", &["embed", "bias_soft_cap", "add", "sigmoid_gate", "gated_act", "scaled_add", "copy_cols", "to_half", "read_sum", "gated_act_split", "split_cols", "from_half"])?;
        let n = get("norm", &["rms_norm", "group_norm", "group_norm_warp", "rms_gate_dots", "group_norm_warp4", "group_norm_warp4h"])?;
        let g = get("gemv", &["gemv_r1", "gemv_r2", "gemv_r3", "gemv_r4", "dots_f32", "skinny_mma"])?;
        let m = get(
            "mlstm",
            &[
                "mlstm_step",
                "mlstm_step_pair",
                "mlstm_step_wide",
                "mlstm_step_c16",
                "mlstm_step_pair_c16",
                "mlstm_step_wide_c16",
                "mlstm_step_pend",
                "mlstm_step_wide_pend",
                "mlstm_settle",
            ],
        )?;
        let mc = get(
            "mlstm_chunk",
            &[
                "mlstm_chunk_states",
                "mlstm_chunk_out",
                "mlstm_chunk_states_tc",
                "mlstm_chunk_states_tc_exact",
                "mlstm_chunk_out_tc",
                "mlstm_chunk_out_tc_exact",
                "mlstm_chunk_gates",
                "mlstm_chunk_states_bf16",
                "mlstm_chunk_out_bf16",
            ],
        )?;
        let c = get("conv", &["headwise", "conv_seq_out", "conv_seq_state", "conv_step"])?;
        let s = get("slstm", &["slstm_run"])?;
        let tk = get("topk", &["topk_rows"])?;
        let st = get("stack", &["stack_step1"])?;
        let f = Funcs {
            embed: e[0],
            bias_soft_cap: e[1],
            add: e[2],
            sigmoid_gate: e[3],
            gated_act: e[4],
            scaled_add: e[5],
            copy_cols: e[6],
            to_half: e[7],
            read_sum: e[8],
            gated_act_split: e[9],
            split_cols: e[10],
            from_half: e[11],
            rms_norm: n[0],
            group_norm: n[1],
            group_norm_warp: n[2],
            rms_gate_dots: n[3],
            group_norm_warp4: n[4],
            group_norm_warp4h: n[5],
            gemv: [g[0], g[1], g[2], g[3]],
            dots_f32: g[4],
            skinny_mma: g[5],
            mlstm_step: [[m[0], m[1], m[2]], [m[3], m[4], m[5]]],
            mlstm_step_pend: [m[6], m[7]],
            mlstm_settle: m[8],
            chunk_states: mc[0],
            chunk_out: mc[1],
            chunk_states_tc: [mc[2], mc[3]],
            chunk_out_tc: [mc[4], mc[5]],
            chunk_gates: mc[6],
            chunk_states_bf16: mc[7],
            chunk_out_bf16: mc[8],
            headwise: c[0],
            conv_seq_out: c[1],
            conv_seq_state: c[2],
            conv_step: c[3],
            slstm_run: s[0],
            topk_rows: tk[0],
            stack_step1: st[0],
        };
        let big_smem = f.gemv.iter().map(|&gf| (gf, GEMV_SMEM)).chain(f.chunk_states_tc.iter().map(|&cf| (cf, chunk_stages * CHUNK_STATE_STAGE)));
        let big_smem = big_smem.chain([(f.chunk_states_bf16, chunk_stages * CHUNK_BF16_STAGE), (f.skinny_mma, SKINNY_SMEM)]);
        let stack_avail = cc.0 >= 9 && smem_optin as usize >= STACK_SMEM;
        let stack = stack_avail && std::env::var("XLSTM_CUDA_STACK").map_or(true, |v| v != "0");
        let big_smem = big_smem.chain(stack_avail.then_some((f.stack_step1, STACK_SMEM)));
        for (func, bytes) in big_smem {
            // SAFETY: valid function handle; raises the dynamic shared-memory limit.
            unsafe {
                dres::function::set_function_attribute(
                    func,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .map_err(|e| drv("shared-memory attribute", e))?;
        }
        let trace = if kernels::trace_enabled() {
            let words = 8 + 8 * TRACE_CAP;
            // SAFETY: context bound; the buffer lives as long as the Dev (freed in Drop).
            let buf = unsafe { dres::malloc_sync(words * 8) }.map_err(|e| drv("trace buffer", e))?;
            unsafe { dres::memset_d8_sync(buf, 0, words * 8) }.map_err(|e| drv("trace buffer", e))?;
            let s = ctx.default_stream();
            for m in &modules {
                for (name, bytes) in [("xlstm_trace_buf", buf.to_le_bytes().to_vec()), ("xlstm_trace_cap", (TRACE_CAP as u32).to_le_bytes().to_vec())] {
                    let mut g = m.get_global(name, &s).map_err(|e| drv("trace global", e))?;
                    let (p, _sync) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut g, &s);
                    // SAFETY: p is the module global of exactly this size.
                    unsafe { dres::memcpy_htod_sync(p, &bytes) }.map_err(|e| drv("trace global", e))?;
                }
            }
            Some(buf)
        } else {
            None
        };
        let blas = cudarc::cublas::result::create_handle().map_err(|e| Error::Device(format!("cuda cuBLAS init: {e:?}")))?;
        // SAFETY: handle and stream are valid; the workspace lets cuBLAS run inside graph capture
        // without allocating.
        let blas_ws = unsafe { dres::malloc_sync(BLAS_WS) }.map_err(|e| drv("cuBLAS workspace", e))?;
        unsafe {
            blas_ok("set stream", cbsys::cublasSetStream_v2(blas, stream as cbsys::cudaStream_t))?;
            blas_ok("set workspace", cbsys::cublasSetWorkspace_v2(blas, blas_ws as *mut c_void, BLAS_WS))?;
        }
        Ok(Dev {
            ctx,
            stream,
            f,
            blas,
            blas_ws,
            lt: crate::lt::Lt::new(blas_ws, BLAS_WS),
            scratch: Mutex::new(Default::default()),
            cap: Mutex::new(Capture::new()),
            name,
            cc,
            sms,
            max_chunk_stages: chunk_stages,
            chunk_stages: Mutex::new(chunk_stages),
            pdl: cc.0 >= 9 && std::env::var("XLSTM_CUDA_PDL").map_or(true, |v| v != "0"),
            skinny: cc == (9, 0) && std::env::var("XLSTM_CUDA_SKINNY").map_or(true, |v| v != "0"),
            stack: stack.into(),
            stack_avail,
            stack_head: std::env::var("XLSTM_CUDA_STACK_HEAD").map_or(true, |v| v != "0"),
            stack_steps: 0.into(),
            stack_heads: 0.into(),
            stack_table: Mutex::new((0, Vec::new())),
            weight_dtype: Mutex::new(DType::F32),
            half_tag: Mutex::new(HalfTag::default()),
            chunk_kernels: Mutex::new(ChunkKernels::from_env()),
            op_times: Mutex::new(None),
            pdl_state_writes: Mutex::new(Vec::new()),
            live: Mutex::new(std::collections::HashMap::new()),
            trace,
            _modules: modules,
        })
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| drv("bind context", e))
    }

    pub fn alloc(&self, bytes: usize) -> Result<CUdeviceptr> {
        // SAFETY: context bound by the caller; the memory is owned by the returned handle's owner.
        let ptr = unsafe { dres::malloc_sync(bytes.max(16)) }.map_err(|e| {
            let (free, total) = dres::mem_get_info().unwrap_or((0, 0));
            Error::Device(format!(
                "cuda: allocating {:.1} MiB failed ({e}); {:.1} of {:.1} GiB free",
                bytes as f64 / (1 << 20) as f64,
                free as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            ))
        })?;
        self.live.lock().expect("live lock").insert(ptr, bytes.max(16));
        Ok(ptr)
    }

    /// Device memory allocated through `alloc` and still live, plus the cuBLAS workspace: what
    /// this backend holds (weights, states, activations, workspace), not the CUDA runtime's own.
    pub fn allocated(&self) -> usize {
        self.live.lock().expect("live lock").values().sum::<usize>() + BLAS_WS
    }

    pub fn free(&self, ptr: CUdeviceptr) {
        if ptr != 0 {
            self.live.lock().expect("live lock").remove(&ptr);
        }
        if ptr != 0 && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: ptr came from alloc and is freed once; the stream is synchronised first so no
            // queued work still uses it.
            unsafe {
                let _ = dres::stream::synchronize(self.stream);
                let _ = dres::free_sync(ptr);
            }
        }
    }

    /// The timing trace's records since the last call (oldest first; at most [`TRACE_CAP`]), then
    /// clears it; None when kernels were built without it.
    pub fn trace_take(&self) -> Result<Option<Vec<[u64; 8]>>> {
        let Some(buf) = self.trace else { return Ok(None) };
        self.sync()?;
        let mut n = [0u64; 1];
        // SAFETY: buf holds 8 + 8·TRACE_CAP words; the stream is idle.
        unsafe { dres::memcpy_dtoh_sync(&mut n, buf) }.map_err(|e| drv("trace read", e))?;
        // The ring holds the last TRACE_CAP records; once it has wrapped, the oldest is at n % cap.
        let count = (n[0] as usize).min(TRACE_CAP);
        let mut words = vec![0u64; 8 * count];
        if count > 0 {
            // SAFETY: as above; count ≤ TRACE_CAP records are read.
            unsafe { dres::memcpy_dtoh_sync(&mut words, buf + 64) }.map_err(|e| drv("trace read", e))?;
        }
        unsafe { dres::memset_d8_sync(buf, 0, 8) }.map_err(|e| drv("trace clear", e))?;
        let start = if n[0] as usize > TRACE_CAP { n[0] as usize % TRACE_CAP } else { 0 };
        Ok(Some((0..count).map(|i| std::array::from_fn(|w| words[8 * ((start + i) % TRACE_CAP) + w])).collect()))
    }

    pub fn sync(&self) -> Result<()> {
        // SAFETY: valid stream.
        unsafe { dres::stream::synchronize(self.stream) }.map_err(|e| drv("synchronize", e))
    }

    /// Launches `f` on the stream with 8-byte argument slots (`KArgs`).
    pub fn launch(&self, f: CUfunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &mut KArgs) -> Result<()> {
        let mut params = args.params();
        self.launch_ex(f, grid, block, smem, &mut params, false)
    }

    /// Launches a kernel whose single parameter is a `#[repr(C)]` struct, with programmatic
    /// dependent launch when `pdl` and the device has it (the kernel calls pdl_wait() before touching
    /// what the previous kernel wrote).
    pub fn launch_struct<T>(&self, f: CUfunction, grid: (u32, u32, u32), block: u32, smem: u32, arg: &mut T, pdl: bool) -> Result<()> {
        let mut params = [arg as *mut T as *mut c_void];
        self.launch_ex(f, grid, block, smem, &mut params, pdl)
    }

    /// `launch` with programmatic dependent launch when `pdl` (see `launch_struct`).
    pub fn launch_pdl(&self, f: CUfunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &mut KArgs, pdl: bool) -> Result<()> {
        let mut params = args.params();
        self.launch_ex(f, grid, block, smem, &mut params, pdl)
    }

    /// Whether the state at `c` is complete before the next launch starts: neither the last ordinary
    /// launch (which waits for everything before it) nor a programmatic-dependent launch after it
    /// wrote it. Then a kernel may read it before waiting for its predecessor.
    pub fn state_settled(&self, c: CUdeviceptr) -> bool {
        !self.state_writes().contains(&c)
    }

    /// Records that the launch just queued (ordinary or programmatic) writes the state at `c` (see
    /// `state_settled`).
    pub fn note_state_write(&self, c: CUdeviceptr) {
        self.state_writes().push(c);
    }

    fn state_writes(&self) -> std::sync::MutexGuard<'_, Vec<CUdeviceptr>> {
        self.pdl_state_writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn launch_ex(&self, f: CUfunction, grid: (u32, u32, u32), block: u32, smem: u32, params: &mut [*mut c_void], pdl: bool) -> Result<()> {
        if !(pdl && self.pdl) {
            self.state_writes().clear();
            // SAFETY: the argument slots match the kernel's parameter list (each kernel's caller
            // builds them in order); pointers are live device allocations.
            return unsafe { dres::launch_kernel(f, grid, (block, 1, 1), smem, self.stream, params) }.map_err(|e| drv("launch", e));
        }
        // SAFETY: a zeroed attribute value is valid for every member; the config points at one live
        // attribute for the duration of the call; params as in the ordinary launch above.
        unsafe {
            let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: self.stream,
                attrs: &mut attr,
                numAttrs: 1,
            };
            sys::cuLaunchKernelEx(&cfg, f, params.as_mut_ptr(), std::ptr::null_mut()).result().map_err(|e| drv("launch (PDL)", e))
        }
    }

    /// The scratch set the running op uses.
    fn scratch_set(&self) -> usize {
        if self.cap.lock().expect("capture lock").in_step() {
            STEP
        } else {
            SEQUENCE
        }
    }

    /// Makes sure the named scratch (of the running op's set) holds `bytes`; returns its pointer.
    /// Growing the step set drops any recorded decode graph (it may point at the old allocation).
    pub fn scratch(&self, which: fn(&mut Scratches) -> &mut Scratch, bytes: usize, zero: bool) -> Result<CUdeviceptr> {
        let set = self.scratch_set();
        let mut s = self.scratch.lock().expect("scratch lock");
        let sc = which(&mut s[set]);
        if sc.bytes >= bytes && sc.ptr != 0 {
            return Ok(sc.ptr);
        }
        if set == STEP {
            self.cap.lock().expect("capture lock").scratch_moved()?;
        }
        let old = sc.ptr;
        let new_bytes = bytes.max(sc.bytes * 3 / 2).max(256);
        let p = self.alloc(new_bytes)?;
        if zero {
            // SAFETY: fresh allocation of new_bytes.
            unsafe { dres::memset_d8_async(p, 0, new_bytes, self.stream) }.map_err(|e| drv("memset", e))?;
        }
        self.free(old);
        sc.ptr = p;
        sc.bytes = new_bytes;
        Ok(p)
    }

    /// Pinned host staging for `n` token ids, and the device copy's pointer.
    pub fn ids_buffers(&self, n: usize) -> Result<(*mut u32, CUdeviceptr)> {
        let dptr = self.scratch(|s| &mut s.ids, n * 4, false)?;
        let set = self.scratch_set();
        let mut guard = self.scratch.lock().expect("scratch lock");
        let s = &mut guard[set];
        if s.ids_host < n * 4 {
            if set == STEP {
                self.cap.lock().expect("capture lock").scratch_moved()?;
            }
            let bytes = (n * 4).max(16 << 10);
            self.sync()?;
            if s.ids_host_ptr != 0 {
                // SAFETY: allocated by malloc_host below, no queued copy reads it (synchronised).
                unsafe { dres::free_host(s.ids_host_ptr as *mut c_void) }.map_err(|e| drv("free pinned", e))?;
            }
            // SAFETY: plain pinned allocation.
            let p = unsafe { dres::malloc_host(bytes, 0) }.map_err(|e| drv("pinned alloc", e))?;
            s.ids_host_ptr = p as usize;
            s.ids_host = bytes;
        }
        Ok((s.ids_host_ptr as *mut u32, dptr))
    }

    /// Called between ops: what the op that ran left in the `half` scratch becomes the previous
    /// op's copy.
    pub fn next_op(&self) {
        let mut t = self.half_tag.lock().expect("half tag lock");
        t.prev = t.next.take();
    }

    /// The `half` scratch for `n` 16-bit values about to be written; `copy_of`: the f32 buffer they
    /// copy (pointer, elements, dtype), offered to the next op.
    pub fn half_scratch(&self, n: usize, copy_of: Option<(CUdeviceptr, usize, DType)>) -> Result<CUdeviceptr> {
        {
            let mut t = self.half_tag.lock().expect("half tag lock");
            t.prev = None;
            t.next = copy_of;
        }
        self.scratch(|s| &mut s.half, n * 2, false)
    }

    /// The `half` scratch if it holds the previous op's 16-bit copy of `x` (n values of `dt`).
    pub fn half_copy_of(&self, x: CUdeviceptr, n: usize, dt: DType) -> Option<CUdeviceptr> {
        let held = self.half_tag.lock().expect("half tag lock").prev == Some((x, n, dt));
        held.then(|| self.scratch(|s| &mut s.half, n * 2, false).ok()).flatten()
    }

    /// Frees the cached working memory of both sets (the step set's graphs go with it).
    pub fn release_scratch(&self) -> Result<()> {
        self.sync()?;
        *self.half_tag.lock().expect("half tag lock") = HalfTag::default();
        let mut guard = self.scratch.lock().expect("scratch lock");
        self.cap.lock().expect("capture lock").scratch_moved()?;
        for s in guard.iter_mut() {
            for sc in [&mut s.half, &mut s.wide, &mut s.cs, &mut s.gates, &mut s.ns, &mut s.ms] {
                self.free(sc.ptr);
                *sc = Scratch::default();
            }
        }
        Ok(())
    }

    /// Frees the device memory of the sequence set (no recorded graph points into it).
    pub fn release_sequence_scratch(&self) -> Result<()> {
        self.sync()?;
        *self.half_tag.lock().expect("half tag lock") = HalfTag::default();
        let mut guard = self.scratch.lock().expect("scratch lock");
        for sc in guard[SEQUENCE].device_buffers() {
            self.free(sc.ptr);
            *sc = Scratch::default();
        }
        Ok(())
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: every handle below was created by this Dev and is released once.
        unsafe {
            let _ = dres::stream::synchronize(self.stream);
            self.cap.lock().map(|mut c| c.clear()).ok();
            let _ = cbsys::cublasDestroy_v2(self.blas);
            drop(self.lt.take());
            let _ = dres::free_sync(self.blas_ws);
            if let Ok(mut guard) = self.scratch.lock() {
                for s in guard.iter_mut() {
                    for sc in s.device_buffers() {
                        if sc.ptr != 0 {
                            let _ = dres::free_sync(sc.ptr);
                        }
                    }
                    if s.ids_host_ptr != 0 {
                        let _ = dres::free_host(s.ids_host_ptr as *mut c_void);
                    }
                }
            }
            if let Some(t) = self.trace {
                let _ = dres::free_sync(t);
            }
            let _ = dres::stream::destroy(self.stream);
        }
    }
}

/// Kernel arguments as 8-byte slots (ints and floats in the low bytes; the kernel reads its
/// parameter's size from the slot's start, which is right on little-endian machines).
pub(crate) struct KArgs {
    slots: [u64; 32],
    n: usize,
}

impl KArgs {
    pub fn new() -> Self {
        KArgs { slots: [0; 32], n: 0 }
    }
    pub fn p(&mut self, v: CUdeviceptr) -> &mut Self {
        self.slots[self.n] = v;
        self.n += 1;
        self
    }
    pub fn i(&mut self, v: usize) -> &mut Self {
        self.slots[self.n] = v as i32 as u32 as u64;
        self.n += 1;
        self
    }
    pub fn f(&mut self, v: f32) -> &mut Self {
        self.slots[self.n] = v.to_bits() as u64;
        self.n += 1;
        self
    }
    fn params(&mut self) -> Vec<*mut c_void> {
        (0..self.n).map(|i| &mut self.slots[i] as *mut u64 as *mut c_void).collect()
    }
}

/// The chunkwise prefill's kernel choice: tensor cores where the shape allows
/// (`XLSTM_CUDA_CHUNK_TC=0`: the CUDA-core kernels, for comparisons), bf16 products for a bf16
/// model's merged prompt path (`XLSTM_CUDA_CHUNK_BF16=0`: TF32 ones on f32 operands, for
/// comparisons), and for profiling one of its two phases alone (`XLSTM_CUDA_CHUNK_ONLY=states|out`:
/// wrong results). Read once, at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkKernels {
    pub tensor_cores: bool,
    pub bf16: bool,
    pub only: Option<ChunkPhase>,
}

/// One of the chunkwise prefill's two kernels: the chunk states, or the outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkPhase {
    States,
    Out,
}

impl ChunkKernels {
    fn from_env() -> Self {
        let only = match std::env::var("XLSTM_CUDA_CHUNK_ONLY").as_deref() {
            Ok("states") => Some(ChunkPhase::States),
            Ok("out") => Some(ChunkPhase::Out),
            _ => None,
        };
        let on = |name: &str| std::env::var(name).map_or(true, |v| v != "0");
        ChunkKernels { tensor_cores: on("XLSTM_CUDA_CHUNK_TC"), bf16: on("XLSTM_CUDA_CHUNK_BF16"), only }
    }
}
