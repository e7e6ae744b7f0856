//! The GEMV launch's arguments, and decode products chained into one persistent launch.
//!
//! At 1–4 rows every product of a decode step is one GEMV launch (kernels/gemv.cu, with the RMSNorm,
//! residual add or gated pair fused in). Consecutive ones (out_proj, the FFN's gate/up and down, the
//! next layer's q/k/v/o/gates) depend on each other only through small activation vectors, so they
//! need not be separate kernels. With chaining on, a GEMV launch is queued as a *phase* instead of
//! launched; the queue runs as one `gemv_chain_r*` launch (up to [`CHAIN_MAX`] phases, a grid barrier
//! between them) as soon as anything else is submitted to the stream: another kernel, a cuBLAS
//! product, a copy, a read-back, a synchronisation. Model code and graph capture see the same ops.
//!
//! The chain is a cooperative launch: all its blocks (2 per SM, the GEMV's occupancy) must be resident
//! at once for the barrier; the driver refuses the launch otherwise, and the phases then run as
//! separate launches (chaining switches itself off). `XLSTM_CUDA_CHAIN=0` switches it off from the
//! start; it is on by default on sm_90 and newer, where it was measured.
use cudarc::driver::sys::CUdeviceptr;

/// Phases per chain launch (`CHAIN_MAX` in kernels/gemv.cu).
pub(crate) const CHAIN_MAX: usize = 4;

/// One output matrix of a GEMV launch (`GemvSeg` in kernels/gemv.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct GemvSeg {
    pub w: u64,
    pub w2: u64,
    pub out: u64,
    pub n: i32,
    pub dt: i32,
    pub mode: i32,
    pub ld: i32,
    pub block0: i32,
    pub rpw: i32,
}

/// A GEMV launch (`GemvArgs` in kernels/gemv.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct GemvArgs {
    pub seg: [GemvSeg; 8],
    pub x: u64,
    pub norm_w: u64,
    pub xn_out: u64,
    pub nseg: i32,
    pub k: i32,
    pub eps: f32,
    pub act: i32,
    pub nblocks: i32,
}

/// A chain launch's parameter (`GemvChain` in kernels/gemv.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct GemvChain {
    pub ph: [GemvArgs; CHAIN_MAX],
    pub bar: u64,
    pub nph: i32,
}

/// The queued phases (all of one row count) of the running chain.
pub(crate) struct Chain {
    pub enabled: bool,
    pub rows: usize,
    /// Largest dynamic shared memory of the queued phases.
    pub smem: usize,
    pub phases: Vec<GemvArgs>,
    /// The grid barrier's word (zeroed at start; the kernel leaves it as it found it).
    pub bar: CUdeviceptr,
    /// Chain launches so far (tests).
    pub launches: u64,
}

impl Chain {
    pub fn new(enabled: bool, bar: CUdeviceptr) -> Self {
        Chain { enabled, rows: 0, smem: 0, phases: Vec::with_capacity(CHAIN_MAX), bar, launches: 0 }
    }

    /// Takes the queue as one launch's parameter: (rows, grid, shared memory, parameter).
    pub fn take(&mut self) -> Option<(usize, u32, u32, GemvChain)> {
        if self.phases.is_empty() {
            return None;
        }
        let mut c = GemvChain { ph: [GemvArgs::default(); CHAIN_MAX], bar: self.bar, nph: self.phases.len() as i32 };
        let grid = self.phases.iter().map(|p| p.nblocks).max().unwrap_or(1).max(1) as u32;
        for (slot, p) in c.ph.iter_mut().zip(self.phases.drain(..)) {
            *slot = p;
        }
        Some((self.rows, grid, self.smem as u32, c))
    }
}
