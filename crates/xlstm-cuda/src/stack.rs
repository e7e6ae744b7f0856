//! Batch-1 decode of a whole xlstm-large stack in one persistent launch (kernels/stack.cu): where it
//! applies, the per-layer table it reads, and its launch.
use cudarc::driver::result as dres;
use cudarc::driver::sys::CUdeviceptr;
use xlstm_core::backend::{Activation, MlstmDims, MlstmState, StackBlock, StackHead};
use xlstm_core::tensor::DType;
use xlstm_core::Result;
use std::sync::atomic::Ordering::Relaxed;

use crate::device::{drv, Dev, STACK_PART_ROWS, STACK_SMEM, STACK_THREADS};
use crate::{act_code, opc, CudaBackend, CudaBuf, StatePtrs};

/// One layer of the kernel's table (`StackLayer` in kernels/stack.cu): device pointers in its order.
const LAYER_WORDS: usize = 13;

/// `StackArgs` in kernels/stack.cu.
#[repr(C)]
struct StackArgs {
    layers: u64,
    nlayers: i32,
    width: i32,
    heads: i32,
    dk: i32,
    dv: i32,
    ff: i32,
    act: i32,
    eps: f32,
    cap: f32,
    cell_eps: f32,
    neps: f32,
    x: u64,
    qkvo: u64,
    gates: u64,
    h: u64,
    hst: u64,
    a: u64,
    bar: u64,
    done: u64,
    best: u64,
    fnorm: u64,
    head: u64,
    vocab: i32,
    hcap: f32,
    heps: f32,
    picked: u64,
}

/// The kernel's limits (kernels/stack.cu's header): inputs of at most 3 chunks of 8 values per
/// consumer thread, f32 gate rows and gate/up pairs that fit a 32 KiB stage, the cell's q, k, n'
/// in shared memory, one unit per block, each block's rows of a phase within its partial sums.
fn dims_fit(dev: &Dev, width: usize, d: MlstmDims, ff: usize) -> bool {
    let vw = d.heads * d.dv;
    let small = |k: usize| k > 0 && k % 8 == 0 && k <= 3 * 512 * 8;
    let nb = dev.sms.max(1) as usize;
    let fits = small(width) && width <= 8192 && small(vw) && small(ff) && d.dk > 0 && d.dk <= 512 && d.dv % 8 == 0 && d.dv <= 1024 && d.heads <= 64 && d.heads * d.dv.div_ceil(32) <= nb;
    if !fits {
        return false;
    }
    // items of whole rows a stage (Shape in the kernel) and the local rows they leave a block
    const STAGE: usize = 32768;
    let rows16 = |k: usize| (STAGE / (2 * k)).min(16);
    let rows32 = |k: usize| (STAGE / (4 * k)).min(16);
    let pairs16 = |k: usize| (STAGE / (4 * k)).min(8);
    let nqkvo = 2 * d.heads * (d.dk + d.dv);
    let items0 = nqkvo.div_ceil(rows16(width)) + (2 * d.heads).div_ceil(rows32(width));
    let local = [
        items0.div_ceil(nb) * rows16(width),
        width.div_ceil(rows16(vw)).div_ceil(nb) * rows16(vw),
        ff.div_ceil(pairs16(width)).div_ceil(nb) * 2 * pairs16(width),
        width.div_ceil(rows16(ff)).div_ceil(nb) * rows16(ff),
    ];
    local.iter().all(|&r| r <= STACK_PART_ROWS)
}

impl CudaBackend {
    /// The kernel's table for `blocks` and `states` (LAYER_WORDS pointers a layer), or None where
    /// the kernel does not take them: bf16 products with q/k/v/o, ĩ/f̃ and gate/up each adjacent,
    /// f32 gate rows, f32 C without deferred updates, one sequence, one eps, cap and cell eps.
    fn stack_table(&self, x: &CudaBuf, width: usize, d: MlstmDims, blocks: &[StackBlock<'_, Self>], states: &[&mut MlstmState<CudaBuf>]) -> Option<Vec<u64>> {
        let dev = &self.dev;
        let first = blocks.first()?;
        let ff = first.ff;
        if !dev.stack.load(Relaxed) || blocks.len() != states.len() || !dims_fit(dev, width, d, ff) || x.len < width || x.ptr % 16 != 0 {
            return None;
        }
        let (qk, vw) = (d.heads * d.dk, d.heads * d.dv);
        let mut words = Vec::with_capacity(blocks.len() * LAYER_WORDS);
        for (b, s) in blocks.iter().zip(states) {
            let w = &b.mlstm;
            let [q, k, v, o, ig, fg] = w.proj;
            let bf16 = |m: &crate::CudaMat, rows: usize, cols: usize| m.dtype == DType::BF16 && m.rows == rows && m.cols == cols;
            let mats = bf16(q, qk, width) && bf16(k, qk, width) && bf16(v, vw, width) && bf16(o, vw, width) && q.adjacent(k) && k.adjacent(v) && v.adjacent(o);
            let gates = ig.dtype == DType::F32 && ig.rows == d.heads && ig.cols == width && ig.adjacent(fg) && fg.rows == d.heads;
            let ffn = bf16(b.gate, ff, width) && b.gate.adjacent(b.up) && b.up.rows == ff && bf16(b.down, width, ff) && bf16(w.out_proj, width, vw);
            let same = b.ff == ff && w.eps == first.mlstm.eps && w.gate_cap == first.mlstm.gate_cap && w.cell_eps == first.mlstm.cell_eps;
            let lens = w.norm.len == width && b.norm_ffn.len == width && w.head_norm.len == vw && w.ibias.len == d.heads && w.fbias.len == d.heads;
            let state = s.dims == d && s.c_dtype == DType::F32 && s.pending.is_none() && s.m.len == d.heads && s.n.len == qk && s.c.len == qk * d.dv;
            if !(mats && gates && ffn && same && lens && state) {
                return None;
            }
            let st = StatePtrs::of(s);
            let layer = [w.norm.ptr, q.ptr, ig.ptr, w.ibias.ptr, w.fbias.ptr, w.head_norm.ptr, w.out_proj.ptr, b.norm_ffn.ptr, b.gate.ptr, b.down.ptr, st.c, st.n, st.m];
            if layer.iter().any(|p| p % 16 != 0) {
                return None;
            }
            words.extend(layer);
        }
        Some(words)
    }

    /// `Backend::decode_stack` on the device (see there); Ok(false) where the kernel does not apply.
    pub(crate) fn stack_step(&self, x: &mut CudaBuf, width: usize, d: MlstmDims, blocks: &[StackBlock<'_, Self>], states: &mut [&mut MlstmState<CudaBuf>], head: Option<StackHead<'_, Self>>) -> Result<bool> {
        let Some(table) = self.stack_table(x, width, d, blocks, states) else {
            return Ok(false);
        };
        // the head: bf16 rows of `width`, the norm's weight as wide (the kernel's P5)
        let head = match head {
            None => None,
            Some(_) if !self.dev.stack_head => return Ok(false),
            Some(h) if h.w.dtype == DType::BF16 && h.w.rows == h.n && h.n > 0 && h.n < u32::MAX as usize && h.w.cols == width && h.w.ptr % 16 == 0 && h.norm.is_none_or(|w| w.len == width && w.ptr % 16 == 0) => Some(h),
            Some(_) => return Ok(false),
        };
        // where the pick goes (ids, then logits: greedy.rs's buffer, which the next embed reads)
        let picked = match &head {
            Some(_) => self.chosen.lock().expect("chosen ids lock").picked_for(1)?,
            None => 0,
        };
        let (fnorm, hw, vocab, hcap, heps) = head.as_ref().map_or((0, 0, 0, 0.0, 0.0), |h| (h.norm.map_or(0, |w| w.ptr), h.w.ptr, h.n, h.cap, h.eps));
        let w0 = &blocks[0].mlstm;
        let ff = blocks[0].ff;
        let mut words = vec![opc::STACK, x.ptr, width as u64, d.heads as u64, d.dk as u64, d.dv as u64, ff as u64, w0.eps.to_bits() as u64, w0.gate_cap.to_bits() as u64, w0.cell_eps.to_bits() as u64];
        words.extend([fnorm, hw, vocab as u64, hcap.to_bits() as u64, heps.to_bits() as u64, picked]);
        words.extend(&table);
        let xp = x.ptr;
        self.op(&words, |dev| {
            let nq = 2 * d.heads * (d.dk + d.dv);
            // q, k, v, o; ĩ, f̃; h; act(g)·u; the units' h statistics
            let units = d.heads * d.dv.div_ceil(32);
            let floats = nq + 2 * d.heads + d.heads * d.dv + ff + 2 * units;
            let io = dev.scratch(|s| &mut s.stack_io, 4 * floats, false)?;
            // the barrier's count, the blocks done, the head's best key: zeroed once, and left zero
            // by every launch's last block
            let sync = dev.scratch(|s| &mut s.stack_sync, 16, true)?;
            let tbl = self.stack_upload(dev, &table)?;
            let at = |n: usize| io + 4 * n as u64;
            let mut a = StackArgs {
                layers: tbl,
                nlayers: blocks.len() as i32,
                width: width as i32,
                heads: d.heads as i32,
                dk: d.dk as i32,
                dv: d.dv as i32,
                ff: ff as i32,
                act: act_code(Activation::Silu) as i32,
                eps: w0.eps,
                cap: w0.gate_cap,
                cell_eps: w0.cell_eps,
                neps: w0.eps,
                x: xp,
                qkvo: at(0),
                gates: at(nq),
                h: at(nq + 2 * d.heads),
                a: at(nq + 2 * d.heads + d.heads * d.dv),
                hst: at(nq + 2 * d.heads + d.heads * d.dv + ff),
                bar: sync,
                done: sync + 4,
                best: sync + 8,
                fnorm,
                head: hw,
                vocab: vocab as i32,
                hcap,
                heps,
                picked,
            };
            dev.launch_struct(dev.f.stack_step1, (dev.sms as u32, 1, 1), STACK_THREADS, STACK_SMEM as u32, &mut a, false)
        })?;
        self.dev.stack_steps.fetch_add(1, Relaxed);
        if hw != 0 {
            self.dev.stack_heads.fetch_add(1, Relaxed);
        }
        Ok(true)
    }

    /// Batch-1 decode steps through the one persistent kernel when `on` and the device has it (the
    /// default; `XLSTM_CUDA_STACK=0` starts with it off); returns whether it is on. States made
    /// while it is on have no room for deferred updates at batch 1 (their steps write C).
    pub fn set_stack_decode(&self, on: bool) -> bool {
        let on = on && self.dev.stack_avail;
        self.dev.stack.store(on, Relaxed);
        on
    }

    /// How many decode steps ran through the persistent kernel (graph replays included).
    pub fn stack_steps(&self) -> u64 {
        self.dev.stack_steps.load(Relaxed)
    }

    /// How many of those also chose the next token (greedy decoding's LM head in the same launch).
    pub fn stack_heads(&self) -> u64 {
        self.dev.stack_heads.load(Relaxed)
    }

    /// The layer table on the device: uploaded when it differs from the one there (outside graph
    /// capture only: the upload is no stream operation).
    fn stack_upload(&self, dev: &Dev, table: &[u64]) -> Result<CUdeviceptr> {
        let bytes = table.len() * 8;
        let ptr = dev.scratch(|s| &mut s.stack_table, bytes, false)?;
        let mut known = dev.stack_table.lock().expect("stack table lock");
        if known.0 != ptr || known.1 != table {
            dev.cap.lock().expect("capture lock").unrecordable()?;
            // the launch before may still read the old table
            dev.sync()?;
            let raw: Vec<u8> = table.iter().flat_map(|w| w.to_le_bytes()).collect();
            // SAFETY: ptr holds `bytes` (the scratch above); a synchronous copy of live host memory.
            unsafe { dres::memcpy_htod_sync(ptr, &raw) }.map_err(|e| drv("stack table", e))?;
            *known = (ptr, table.to_vec());
        }
        Ok(ptr)
    }
}
