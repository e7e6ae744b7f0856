//! mLSTM cell on the CPU: recurrent step, sequence (a loop of steps) and chunkwise-parallel forms.
//!
//! Math: shared/NOTES.md §2 (after Beck et al. 2024, "xLSTM", eqs. for the stabilised mLSTM, and the
//! chunkwise form of `mlstm_kernels`). Per head, with gate pre-activations ĩ, f̃ and state (C, n, m),
//! m starting at 0. All arithmetic in f32. Heads run in parallel (rayon); one head is one task.
use gemm::Parallelism;
use rayon::prelude::*;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::SyncPtr;
use crate::backend::MlstmDims;

/// Heads one parallel task takes (`XLSTM_HEADS_PER_BAND`; 1 = every head its own task).
static HEADS_PER_BAND: AtomicUsize = AtomicUsize::new(1);

/// Sets how many heads one CPU task takes (speed only; results are identical).
pub fn set_heads_per_band(n: usize) {
    HEADS_PER_BAND.store(n.max(1), Ordering::Relaxed);
}

fn band() -> usize {
    HEADS_PER_BAND.load(Ordering::Relaxed)
}

#[inline]
pub fn log_sigmoid(x: f32) -> f32 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// One head, one token. `c` [DK·DV], `n` [DK]; writes `h` [DV].
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn step_head(q: &[f32], k: &[f32], v: &[f32], i_pre: f32, f_pre: f32, c: &mut [f32], n: &mut [f32], m: &mut f32, eps: f32, h: &mut [f32]) {
    let (dk, dv) = (k.len(), v.len());
    let lf = log_sigmoid(f_pre);
    let m_new = (lf + *m).max(i_pre);
    let fa = (lf + *m - m_new).exp();
    let ia = (i_pre - m_new).exp();
    let scale = 1.0 / (dk as f32).sqrt();
    h.fill(0.0);
    let mut qn = 0f32;
    for a in 0..dk {
        let ka = ia * k[a];
        let qa = q[a] * scale;
        let row = &mut c[a * dv..(a + 1) * dv];
        for ((cj, &vj), hj) in row.iter_mut().zip(v).zip(h.iter_mut()) {
            *cj = fa * *cj + ka * vj;
            *hj += qa * *cj;
        }
        n[a] = fa * n[a] + ka;
        qn += qa * n[a];
    }
    let den = qn.abs().max((-m_new).exp()) + eps;
    h.iter_mut().for_each(|x| *x /= den);
    *m = m_new;
}

/// Views of one head inside row-major [rows, NH·D] buffers.
struct HeadIo<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    i: &'a [f32],
    f: &'a [f32],
    d: MlstmDims,
    head: usize,
}

impl HeadIo<'_> {
    fn q(&self, t: usize) -> &[f32] {
        let o = t * self.d.heads * self.d.dk + self.head * self.d.dk;
        &self.q[o..o + self.d.dk]
    }
    fn k(&self, t: usize) -> &[f32] {
        let o = t * self.d.heads * self.d.dk + self.head * self.d.dk;
        &self.k[o..o + self.d.dk]
    }
    fn v(&self, t: usize) -> &[f32] {
        let o = t * self.d.heads * self.d.dv + self.head * self.d.dv;
        &self.v[o..o + self.d.dv]
    }
    fn gates(&self, t: usize) -> (f32, f32) {
        (self.i[t * self.d.heads + self.head], self.f[t * self.d.heads + self.head])
    }
}

/// Batched step: row b of q/k/v/i/f is sequence b; state laid out [B, NH, ...].
#[allow(clippy::too_many_arguments)]
pub fn step(d: MlstmDims, batch: usize, q: &[f32], k: &[f32], v: &[f32], i: &[f32], f: &[f32], c: &mut [f32], n: &mut [f32], m: &mut [f32], eps: f32, h: &mut [f32]) {
    let (dk, dv) = (d.dk, d.dv);
    let units = batch * d.heads;
    c[..units * dk * dv]
        .par_chunks_mut(dk * dv)
        .zip(n[..units * dk].par_chunks_mut(dk))
        .zip(m[..units].par_iter_mut())
        .zip(h[..units * dv].par_chunks_mut(dv))
        .enumerate()
        .with_min_len(band())
        .for_each(|(u, (((c, n), m), h))| {
            step_head(
                &q[u * dk..(u + 1) * dk], &k[u * dk..(u + 1) * dk], &v[u * dv..(u + 1) * dv], i[u], f[u], c, n, m, eps, h,
            );
        });
}

/// A segment of `seq` tokens of one sequence. `chunk = None` runs every token as a step (the
/// sequence kernel); `Some(L)` runs whole chunks of L chunkwise and the remainder as steps.
#[allow(clippy::too_many_arguments)]
pub fn prefill(d: MlstmDims, chunk: Option<usize>, seq: usize, q: &[f32], k: &[f32], v: &[f32], i: &[f32], f: &[f32], c: &mut [f32], n: &mut [f32], m: &mut [f32], eps: f32, h: &mut [f32]) {
    let (dk, dv) = (d.dk, d.dv);
    let hp = SyncPtr(h.as_mut_ptr());
    let row = d.heads * dv;
    c[..d.heads * dk * dv]
        .par_chunks_mut(dk * dv)
        .zip(n[..d.heads * dk].par_chunks_mut(dk))
        .zip(m[..d.heads].par_iter_mut())
        .enumerate()
        .with_min_len(band())
        .for_each(|(head, ((c, n), m))| {
            let io = HeadIo { q, k, v, i, f, d, head };
            // SAFETY: head `head` writes only columns head·DV..(head+1)·DV of each row of h.
            let h_of = |t: usize| unsafe { std::slice::from_raw_parts_mut(hp.get().add(t * row + head * dv), dv) };
            let whole = chunk.map_or(0, |l| seq / l * l);
            if let Some(l) = chunk {
                let mut scratch = ChunkScratch::new(l, dk);
                for t0 in (0..whole).step_by(l) {
                    chunk_head(&io, t0, l, c, n, m, eps, hp, row, &mut scratch);
                }
            }
            for t in whole..seq {
                let (ip, fp) = io.gates(t);
                step_head(io.q(t), io.k(t), io.v(t), ip, fp, c, n, m, eps, h_of(t));
            }
        });
}

struct ChunkScratch {
    b: Vec<f32>,
    mc: Vec<f32>,
    w: Vec<f32>,
    qn: Vec<f32>,
    kw: Vec<f32>,
}

impl ChunkScratch {
    fn new(l: usize, dk: usize) -> Self {
        ChunkScratch { b: vec![0.0; l], mc: vec![0.0; l], w: vec![0.0; l * l], qn: vec![0.0; l], kw: vec![0.0; l * dk] }
    }
}

/// One chunk of L tokens of one head, starting at token t0: writes h for those tokens and advances
/// (C, n, m) past the chunk.
#[allow(clippy::too_many_arguments)]
fn chunk_head(io: &HeadIo, t0: usize, l: usize, c: &mut [f32], n: &mut [f32], m: &mut f32, eps: f32, hp: SyncPtr<f32>, h_row: usize, s: &mut ChunkScratch) {
    let MlstmDims { heads, dk, dv } = io.d;
    let scale = 1.0 / (dk as f32).sqrt();
    let (qk_row, v_row) = (heads * dk, heads * dv);
    let m_prev = *m;
    // b_t: inclusive cumulative log forget gate inside the chunk.
    let mut acc = 0f32;
    for t in 0..l {
        acc += log_sigmoid(io.gates(t0 + t).1);
        s.b[t] = acc;
    }
    let q0 = io.q(t0).as_ptr();
    let k0 = io.k(t0).as_ptr();
    let v0 = io.v(t0).as_ptr();
    // SAFETY (all gemm calls): pointers and strides describe in-bounds strided views of this head.
    // w = scale · Q Kᵀ   [L, L]
    unsafe {
        gemm::gemm(l, l, dk, s.w.as_mut_ptr(), 1, l as isize, false, q0, 1, qk_row as isize, k0, qk_row as isize, 1, 0.0, scale, false, false, false, Parallelism::None);
    }
    // Stabiliser per row and decayed weights: w[t,s] = exp(b_t − b_s + ĩ_s − mc_t) (q̂·k_s), s ≤ t.
    for t in 0..l {
        let mut mc = s.b[t] + m_prev;
        for u in 0..=t {
            mc = mc.max(s.b[t] - s.b[u] + io.gates(t0 + u).0);
        }
        s.mc[t] = mc;
        let wr = &mut s.w[t * l..(t + 1) * l];
        for u in 0..l {
            wr[u] = if u <= t { (s.b[t] - s.b[u] + io.gates(t0 + u).0 - mc).exp() * wr[u] } else { 0.0 };
        }
    }
    // Inter-chunk part into h: h_t = e^{b_t + m_prev − mc_t} q̂_t C_prev.
    let h0 = unsafe { hp.get().add(t0 * h_row + io.head * dv) };
    unsafe {
        gemm::gemm(l, dv, dk, h0, 1, h_row as isize, false, q0, 1, qk_row as isize, c.as_ptr(), 1, dv as isize, 0.0, scale, false, false, false, Parallelism::None);
    }
    for t in 0..l {
        let decay = (s.b[t] + m_prev - s.mc[t]).exp();
        let qt = io.q(t0 + t);
        let qn: f32 = qt.iter().zip(n.iter()).map(|(a, b)| a * b).sum::<f32>() * scale;
        let wsum: f32 = s.w[t * l..(t + 1) * l].iter().sum();
        s.qn[t] = decay * qn + wsum; // the denominator before the max
        let ht = unsafe { std::slice::from_raw_parts_mut(h0.add(t * h_row), dv) };
        ht.iter_mut().for_each(|x| *x *= decay);
    }
    // Intra-chunk part: h += w V.
    unsafe {
        gemm::gemm(l, dv, l, h0, 1, h_row as isize, true, s.w.as_ptr(), 1, l as isize, v0, 1, v_row as isize, 1.0, 1.0, false, false, false, Parallelism::None);
    }
    for t in 0..l {
        let den = s.qn[t].abs().max((-s.mc[t]).exp()) + eps;
        let ht = unsafe { std::slice::from_raw_parts_mut(h0.add(t * h_row), dv) };
        ht.iter_mut().for_each(|x| *x /= den);
    }
    // State past the chunk: a_t = g − b_t + ĩ_t; m' = max(g + m_prev, max a_t);
    // C' = e^{g + m_prev − m'} C + Σ_t e^{a_t − m'} k_t v_tᵀ, n likewise.
    let g = s.b[l - 1];
    let mut m_new = g + m_prev;
    for t in 0..l {
        m_new = m_new.max(g - s.b[t] + io.gates(t0 + t).0);
    }
    let decay = (g + m_prev - m_new).exp();
    c.iter_mut().for_each(|x| *x *= decay);
    n.iter_mut().for_each(|x| *x *= decay);
    for t in 0..l {
        let wt = (g - s.b[t] + io.gates(t0 + t).0 - m_new).exp();
        let kt = io.k(t0 + t);
        for a in 0..dk {
            s.kw[t * dk + a] = wt * kt[a];
            n[a] += wt * kt[a];
        }
    }
    // C += Kwᵀ V   [DK, DV]
    unsafe {
        gemm::gemm(dk, dv, l, c.as_mut_ptr(), 1, dv as isize, true, s.kw.as_ptr(), dk as isize, 1, v0, 1, v_row as isize, 1.0, 1.0, false, false, false, Parallelism::None);
    }
    *m = m_new;
}
