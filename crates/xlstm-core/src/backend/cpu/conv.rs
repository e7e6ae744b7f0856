//! Causal depthwise conv1d with a rolling input state (the `xlstm` package's `CausalConv1d`, spec §3.4),
//! and the block-diagonal ("headwise") projection (`LinearHeadwiseExpand`, spec §3.3), on the CPU.
use gemm::Parallelism;
use rayon::prelude::*;

use super::SyncPtr;

/// Dot product with 8 independent accumulators, so the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// One segment of `seq` inputs of one sequence: `x [seq, ch]`, `w [k, ch]`, `bias [ch]`,
/// `state [k − 1, ch]` (previous inputs, oldest first; advanced past the segment), `out [seq, ch]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_seq(ch: usize, k: usize, seq: usize, x: &[f32], w: &[f32], bias: &[f32], state: &mut [f32], act: bool, out: &mut [f32]) {
    let taps = k - 1;
    {
        let state: &[f32] = state;
        // input row τ of the extended sequence [state; x], τ ∈ [−taps, seq)
        let src = |tau: isize| -> &[f32] {
            if tau >= 0 {
                &x[tau as usize * ch..(tau as usize + 1) * ch]
            } else {
                let r = (taps as isize + tau) as usize;
                &state[r * ch..(r + 1) * ch]
            }
        };
        let rows_per_task = (4096 / ch.max(1)).max(1);
        out[..seq * ch].par_chunks_mut(rows_per_task * ch).enumerate().for_each(|(blk, o)| {
            for (i, orow) in o.chunks_mut(ch).enumerate() {
                let t = (blk * rows_per_task + i) as isize;
                orow.copy_from_slice(&bias[..ch]);
                for tap in 0..k {
                    let xs = src(t - taps as isize + tap as isize);
                    let ws = &w[tap * ch..(tap + 1) * ch];
                    orow.iter_mut().zip(ws).zip(xs).for_each(|((o, &w), &x)| *o += w * x);
                }
                if act {
                    orow.iter_mut().for_each(|v| *v = silu(*v));
                }
            }
        });
    }
    if taps == 0 {
        return;
    }
    // New state: the last `taps` rows of [state; x].
    let mut next = vec![0f32; taps * ch];
    for j in 0..taps {
        let tau = seq as isize - taps as isize + j as isize;
        let row = if tau >= 0 {
            &x[tau as usize * ch..(tau as usize + 1) * ch]
        } else {
            let r = (taps as isize + tau) as usize;
            &state[r * ch..(r + 1) * ch]
        };
        next[j * ch..(j + 1) * ch].copy_from_slice(row);
    }
    state[..taps * ch].copy_from_slice(&next);
}

/// One input for each of `batch` sequences: `x [B, ch]`, `state [B, k − 1, ch]`, `out [B, ch]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_step(ch: usize, k: usize, batch: usize, x: &[f32], w: &[f32], bias: &[f32], state: &mut [f32], act: bool, out: &mut [f32]) {
    let taps = k - 1;
    for b in 0..batch {
        conv_seq(
            ch, k, 1, &x[b * ch..(b + 1) * ch], w, bias, &mut state[b * taps * ch..(b + 1) * taps * ch], act, &mut out[b * ch..(b + 1) * ch],
        );
    }
}

/// `out[r, b·dout + o] = Σ_j w[b, o, j]·x[r, b·din + j] (+ bias)`. Wide blocks over several rows go
/// through one gemm per block (blocks in parallel); small blocks (e.g. the mLSTM's 4×4 q/k/v blocks)
/// and single rows through dot products.
#[allow(clippy::too_many_arguments)]
pub fn headwise(x: &[f32], rows: usize, w: &[f32], blocks: usize, din: usize, dout: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    let (win, wout) = (blocks * din, blocks * dout);
    if rows >= 4 && din * dout >= 1024 {
        let op = SyncPtr(out.as_mut_ptr());
        (0..blocks).into_par_iter().for_each(|b| {
            // SAFETY: block b writes only columns b·dout..(b+1)·dout of each of the `rows` rows of out
            // (checked by the caller to hold rows·wout values); x and w views are in bounds likewise.
            unsafe {
                gemm::gemm(
                    rows, dout, din,
                    op.get().add(b * dout), 1, wout as isize, false,
                    x.as_ptr().add(b * din), 1, win as isize,
                    w.as_ptr().add(b * dout * din), din as isize, 1,
                    0.0, 1.0, false, false, false, Parallelism::None,
                );
            }
        });
        if let Some(bias) = bias {
            out[..rows * wout].par_chunks_mut(wout).for_each(|o| o.iter_mut().zip(&bias[..wout]).for_each(|(o, b)| *o += b));
        }
        return;
    }
    // One task per (row, block), batched so each task does at least ~4k multiply-adds.
    let op = SyncPtr(out.as_mut_ptr());
    let min_len = (4096 / (din * dout).max(1)).max(1);
    (0..rows * blocks).into_par_iter().with_min_len(min_len).for_each(|u| {
        let (r, b) = (u / blocks, u % blocks);
        let xb = &x[r * win + b * din..r * win + (b + 1) * din];
        // SAFETY: unit (r, b) writes only out[r·wout + b·dout ..][..dout], disjoint across units.
        let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(r * wout + b * dout), dout) };
        for (j, o) in o.iter_mut().enumerate() {
            let mut acc = dot(&w[(b * dout + j) * din..(b * dout + j + 1) * din], xb);
            if let Some(bias) = bias {
                acc += bias[b * dout + j];
            }
            *o = acc;
        }
    });
}
