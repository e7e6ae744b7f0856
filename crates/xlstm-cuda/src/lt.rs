//! 16-bit matrix products through cuBLASLt, with the algorithm of each shape chosen by timing.
//!
//! `cublasGemmEx` picks its algorithm from heuristics alone, and for the skinny products of batched
//! decode (5 to 256 rows against a 7B model's matrices) it picks ones that stream the weights at
//! 1–2.5 TB/s. Here the first product of each shape asks cuBLASLt for its candidates, times each
//! on the real operands (into a throw-away output), and keeps the fastest with its descriptors for
//! every later call of that shape. Only shapes that recur are timed (up to 256 rows, or a power of
//! two: decode batches, full prefill segments); others take the heuristics' first candidate. Choosing needs the stream to run, so inside a decode step being
//! recorded an unknown shape breaks the step (it runs again eagerly, chooses, then records).
//! `XLSTM_CUDA_LT=0` keeps `cublasGemmEx` (for comparisons).
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::sys as lt;
use cudarc::driver::result as dres;
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use xlstm_core::tensor::DType;
use xlstm_core::{Error, Result};

/// One product `out[m, n] = x[m, k] · w[n, k]ᵀ + beta · out` (row-major), 16-bit w and x.
#[derive(Clone, Copy)]
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
    /// out in the weights' 16-bit type (else f32).
    pub out16: bool,
    pub w: CUdeviceptr,
    pub x: CUdeviceptr,
    pub out: CUdeviceptr,
    pub beta: f32,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    bf16: bool,
    out16: bool,
    accumulate: bool,
    /// The alignment (bytes, at most 256) of w, x and out: algorithms differ in what they need.
    align: [u32; 3],
}

/// The descriptors and chosen algorithm of one shape.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain host objects, used under the cache's lock only.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `describe` and destroyed once.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.a);
            lt::cublasLtMatrixLayoutDestroy(self.b);
            lt::cublasLtMatrixLayoutDestroy(self.c);
            lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

pub(crate) struct Lt {
    handle: lt::cublasLtHandle_t,
    ws: CUdeviceptr,
    ws_bytes: usize,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle is used on the device's one stream, under the callers' serialisation (every
// op runs with the backend's locks held).
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in `new`, destroyed once.
        unsafe { lt::cublasLtDestroy(self.handle) };
    }
}

fn ok(what: &str, s: lt::cublasStatus_t) -> Result<()> {
    match s {
        lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        e => Err(Error::Device(format!("cuda cuBLASLt {what}: {e:?}"))),
    }
}

fn align_of(p: CUdeviceptr) -> u32 {
    if p == 0 {
        256
    } else {
        (1u64 << p.trailing_zeros().min(8)) as u32
    }
}

/// Candidates asked of the heuristics, and timed calls per candidate (after one untimed;
/// `XLSTM_CUDA_LT_REPS` sets another count, `XLSTM_CUDA_LT_LOG=1` prints every candidate's time).
const CANDIDATES: usize = 16;
const REPS: usize = 5;

fn reps() -> usize {
    std::env::var("XLSTM_CUDA_LT_REPS").ok().and_then(|v| v.parse().ok()).filter(|&r| r > 0).unwrap_or(REPS)
}

/// An algorithm's configuration as the log prints it: id, tile, stages, split-K, cluster shape.
fn describe_algo(algo: &lt::cublasLtMatmulAlgo_t) -> String {
    use lt::cublasLtMatmulAlgoConfigAttributes_t as C;
    let get = |attr| {
        let (mut v, mut n) = (0u32, 0usize);
        // SAFETY: a 4-byte buffer for a 4-byte attribute; the algorithm is a live value.
        let s = unsafe { lt::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, &mut v as *mut u32 as *mut c_void, 4, &mut n) };
        if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS { v as i64 } else { -1 }
    };
    format!(
        "algo {} tile {} stages {} split-k {} cluster {}",
        get(C::CUBLASLT_ALGO_CONFIG_ID),
        get(C::CUBLASLT_ALGO_CONFIG_TILE_ID),
        get(C::CUBLASLT_ALGO_CONFIG_STAGES_ID),
        get(C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        get(C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)
    )
}

impl Lt {
    /// None when cuBLASLt cannot be loaded or `XLSTM_CUDA_LT=0`; `ws`: the workspace it may use
    /// (shared with cuBLAS: both run on the one stream).
    pub fn new(ws: CUdeviceptr, ws_bytes: usize) -> Option<Lt> {
        if std::env::var("XLSTM_CUDA_LT").is_ok_and(|v| v == "0") {
            return None;
        }
        // SAFETY: dlopen attempt only.
        if !unsafe { lt::is_culib_present() } {
            return None;
        }
        let handle = cudarc::cublaslt::result::create_handle().ok()?;
        Some(Lt { handle, ws, ws_bytes, plans: Mutex::new(HashMap::new()) })
    }

    /// Whether a plan for `p`'s shape is there (else the next `run` chooses one, which needs the
    /// stream to execute: not while a graph is being captured).
    pub fn knows(&self, p: &Product) -> bool {
        self.plans.lock().expect("plans lock").contains_key(&key(p))
    }

    /// Runs `p` on `stream`, choosing the shape's algorithm first if it is new.
    pub fn run(&self, stream: CUstream, p: &Product) -> Result<()> {
        let k = key(p);
        let mut plans = self.plans.lock().expect("plans lock");
        if !plans.contains_key(&k) {
            let plan = self.choose(stream, p, &k)?;
            plans.insert(k, plan);
        }
        let plan = &plans[&k];
        self.launch(stream, plan, &plan.algo, p, p.out)
    }

    fn launch(&self, stream: CUstream, plan: &Plan, algo: &lt::cublasLtMatmulAlgo_t, p: &Product, out: CUdeviceptr) -> Result<()> {
        let alpha = 1f32;
        // SAFETY: pointers are live device buffers of the shapes the layouts describe (checked by
        // the callers); alpha/beta are host scalars (the default pointer mode).
        ok("matmul", unsafe {
            lt::cublasLtMatmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                p.w as *const c_void,
                plan.a,
                p.x as *const c_void,
                plan.b,
                &p.beta as *const f32 as *const c_void,
                out as *const c_void,
                plan.c,
                out as *mut c_void,
                plan.c,
                algo,
                self.ws as *mut c_void,
                self.ws_bytes,
                stream as lt::cudaStream_t,
            )
        })
    }

    /// Descriptors for `p` (column-major as cuBLASLt sees it: D[n, m] = Aᵀ[n, k] · B[k, m]).
    fn describe(&self, p: &Product) -> Result<Plan> {
        let ty = if p.dtype == DType::BF16 { lt::cudaDataType::CUDA_R_16BF } else { lt::cudaDataType::CUDA_R_16F };
        let out_ty = if p.out16 { ty } else { lt::cudaDataType::CUDA_R_32F };
        let (n, m, k) = (p.n as u64, p.m as u64, p.k as u64);
        let r = |e: cudarc::cublaslt::result::CublasError| Error::Device(format!("cuda cuBLASLt descriptors: {e:?}"));
        use cudarc::cublaslt::result as res;
        let desc = res::create_matmul_desc(lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType::CUDA_R_32F).map_err(r)?;
        let plan = Plan {
            desc,
            a: res::create_matrix_layout(ty, k, n, k as i64).map_err(r)?,
            b: res::create_matrix_layout(ty, k, m, k as i64).map_err(r)?,
            c: res::create_matrix_layout(out_ty, n, m, n as i64).map_err(r)?,
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let trans = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: the attribute buffer is a live value of the attribute's type.
        unsafe {
            ok(
                "transpose",
                lt::cublasLtMatmulDescSetAttribute(
                    plan.desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &trans as *const _ as *const c_void,
                    std::mem::size_of_val(&trans),
                ),
            )?;
        }
        Ok(plan)
    }

    /// Times the heuristics' candidates for `p` and returns the plan with the fastest.
    fn choose(&self, stream: CUstream, p: &Product, key: &Key) -> Result<Plan> {
        let mut plan = self.describe(p)?;
        let pref = cudarc::cublaslt::result::create_matmul_pref().map_err(|e| Error::Device(format!("cuda cuBLASLt preference: {e:?}")))?;
        let mut found = vec![lt::cublasLtMatmulHeuristicResult_t { algo: plan.algo, workspaceSize: 0, state: lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS, wavesCount: 0.0, reserved: [0; 4] }; CANDIDATES];
        let mut count = 0i32;
        // SAFETY: attribute buffers are live values of their types; `found` holds CANDIDATES.
        let asked = unsafe {
            let ws = self.ws_bytes as u64;
            let set = |attr, v: &u64| lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, v as *const u64 as *const c_void, 8);
            use lt::cublasLtMatmulPreferenceAttributes_t as A;
            let aligns = key.align;
            let set32 = |attr, v: &u32| lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, v as *const u32 as *const c_void, 4);
            ok("preference", set(A::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws))
                .and_then(|_| ok("preference", set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aligns[0])))
                .and_then(|_| ok("preference", set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &aligns[1])))
                .and_then(|_| ok("preference", set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &aligns[2])))
                .and_then(|_| ok("preference", set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &aligns[2])))
                .and_then(|_| {
                    ok(
                        "heuristics",
                        lt::cublasLtMatmulAlgoGetHeuristic(self.handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, CANDIDATES as i32, found.as_mut_ptr(), &mut count),
                    )
                })
        };
        // SAFETY: created above, destroyed once.
        unsafe { lt::cublasLtMatmulPreferenceDestroy(pref) };
        asked?;
        let found: Vec<_> = found[..count.max(0) as usize].iter().filter(|h| h.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS).map(|h| h.algo).collect();
        if found.is_empty() {
            return Err(Error::Device(format!("cuda cuBLASLt has no algorithm for a {}×{}×{} product", p.m, p.n, p.k)));
        }
        // Timing costs a few ms per shape: spent on the shapes that recur (decode batches, full
        // prefill segments), not on every prompt's odd-length tail, which takes the heuristics' first.
        if found.len() == 1 || !(p.m <= 256 || p.m.is_power_of_two()) {
            plan.algo = found[0];
            return Ok(plan);
        }
        // Time each on the real operands into a throw-away output of the same shape.
        let bytes = p.m * p.n * if p.out16 { 2 } else { 4 };
        // SAFETY: plain allocation, freed below; events created and destroyed here.
        let scratch = unsafe { dres::malloc_sync(bytes.max(16)) }.map_err(|e| Error::Device(format!("cuda: allocating the tuning output: {e}")))?;
        let timed = (|| -> Result<lt::cublasLtMatmulAlgo_t> {
            let ev = |_| dres::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| Error::Device(format!("cuda event: {e}")));
            let (start, end) = (ev(0)?, ev(1)?);
            let mut best = (f32::MAX, found[0]);
            let (reps, log) = (reps(), std::env::var("XLSTM_CUDA_LT_LOG").is_ok_and(|v| v == "1"));
            for algo in &found {
                // An algorithm that refuses these operands is skipped.
                if self.launch(stream, &plan, algo, p, scratch).is_err() {
                    continue;
                }
                // SAFETY: events and stream are valid; the elapsed time is read after the end event.
                let ms = unsafe {
                    dres::event::record(start, stream).ok();
                    for _ in 0..reps {
                        self.launch(stream, &plan, algo, p, scratch)?;
                    }
                    dres::event::record(end, stream).ok();
                    dres::event::synchronize(end).ok();
                    dres::event::elapsed(start, end).unwrap_or(f32::MAX)
                };
                if log {
                    eprintln!("cuBLASLt {}x{}x{} out16 {} beta {}: {} {:.1} us", p.m, p.n, p.k, p.out16, p.beta, describe_algo(algo), 1000.0 * ms / reps as f32);
                }
                if ms < best.0 {
                    best = (ms, *algo);
                }
            }
            // SAFETY: created above; nothing queued uses them after the synchronisations.
            unsafe {
                dres::event::destroy(start).ok();
                dres::event::destroy(end).ok();
            }
            Ok(best.1)
        })();
        // SAFETY: the stream is drained before the tuning output goes.
        unsafe {
            dres::stream::synchronize(stream).ok();
            dres::free_sync(scratch).ok();
        }
        plan.algo = timed?;
        Ok(plan)
    }
}

fn key(p: &Product) -> Key {
    Key {
        m: p.m,
        n: p.n,
        k: p.k,
        bf16: p.dtype == DType::BF16,
        out16: p.out16,
        accumulate: p.beta != 0.0,
        align: [align_of(p.w), align_of(p.x), align_of(p.out)],
    }
}
