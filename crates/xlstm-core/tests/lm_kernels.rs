//! The backend ops the xlstm-lm family added, on the CPU backend, against naive f64 versions written
//! here: causal depthwise conv1d (segment and batched step, state carried), the block-diagonal
//! projection, gated activations (exact GELU), scaled add, strided column copy.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xlstm_core::backend::{Activation, Backend, ConvDims, HeadwiseDims};
use xlstm_core::CpuBackend;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// y[t, c] = b[c] + Σ_k w[c, k]·x[t − (K−1) + k, c], zero before t = 0 (torch weight layout [C, 1, K]).
fn naive_conv(x: &[f32], seq: usize, ch: usize, w_ck: &[f32], k: usize, bias: &[f32]) -> Vec<f64> {
    let mut y = vec![0f64; seq * ch];
    for t in 0..seq {
        for c in 0..ch {
            let mut acc = bias[c] as f64;
            for tap in 0..k {
                let tau = t as isize - (k as isize - 1) + tap as isize;
                if tau >= 0 {
                    acc += w_ck[c * k + tap] as f64 * x[tau as usize * ch + c] as f64;
                }
            }
            y[t * ch + c] = silu(acc);
        }
    }
    y
}

fn tap_major(w_ck: &[f32], ch: usize, k: usize) -> Vec<f32> {
    let mut t = vec![0f32; ch * k];
    for c in 0..ch {
        for tap in 0..k {
            t[tap * ch + c] = w_ck[c * k + tap];
        }
    }
    t
}

#[test]
fn conv1d_segments_and_steps_match_naive() {
    let b = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for k in [1usize, 2, 4, 5] {
        let (ch, seq) = (24usize, 13usize);
        let x = rand_vec(&mut rng, seq * ch);
        let w_ck = rand_vec(&mut rng, ch * k);
        let bias = rand_vec(&mut rng, ch);
        let w = tap_major(&w_ck, ch, k);
        let want = naive_conv(&x, seq, ch, &w_ck, k, &bias);
        let dims = ConvDims { channels: ch, kernel: k };
        // segments of different lengths (shorter and longer than the history), state carried
        for cuts in [vec![0, seq], vec![0, 1, 2, 3, seq], vec![0, 2, 9, seq], vec![0, 5, 6, seq]] {
            let mut state = b.zeros(dims.taps() * ch).unwrap();
            let mut got = Vec::new();
            for win in cuts.windows(2) {
                let n = win[1] - win[0];
                let xs = x[win[0] * ch..win[1] * ch].to_vec();
                let mut out = vec![0f32; n * ch];
                b.conv1d_prefill(dims, n, &xs, &w, &bias, &mut state, true, &mut out).unwrap();
                got.extend(out);
            }
            let e = max_abs_diff(&got, &want);
            assert!(e < 1e-5, "K={k} cuts {cuts:?}: max abs err {e:e}");
            // the state is the last K−1 inputs
            let taps = dims.taps();
            assert_eq!(&state[..], &x[(seq - taps) * ch..seq * ch], "K={k}: final state");
        }
        // batched steps: row b runs the sequence shifted by b tokens
        let batch = 3;
        let mut state = b.zeros(batch * dims.taps() * ch).unwrap();
        for t in 0..seq {
            let mut xb = Vec::new();
            for r in 0..batch {
                let tt = (t + r) % seq;
                xb.extend_from_slice(&if tt == t + r { x[tt * ch..(tt + 1) * ch].to_vec() } else { vec![0.0; ch] });
            }
            let mut out = vec![0f32; batch * ch];
            b.conv1d_step(dims, batch, &xb, &w, &bias, &mut state, true, &mut out).unwrap();
            // row 0 is the plain sequence
            let e = max_abs_diff(&out[..ch], &want[t * ch..(t + 1) * ch]);
            assert!(e < 1e-5, "K={k} step {t}: max abs err {e:e}");
        }
        // row 1 saw x[1..], so its output at step t is the conv of the sequence starting at x[1]
        let x1 = x[ch..].to_vec();
        let want1 = naive_conv(&x1, seq - 1, ch, &w_ck, k, &bias);
        let mut st = b.zeros(batch * dims.taps() * ch).unwrap();
        let mut last_row1 = Vec::new();
        for t in 0..seq - 1 {
            let mut xb = vec![0f32; batch * ch];
            xb[ch..2 * ch].copy_from_slice(&x1[t * ch..(t + 1) * ch]);
            let mut out = vec![0f32; batch * ch];
            b.conv1d_step(dims, batch, &xb, &w, &bias, &mut st, true, &mut out).unwrap();
            last_row1 = out[ch..2 * ch].to_vec();
        }
        let e = max_abs_diff(&last_row1, &want1[(seq - 2) * ch..(seq - 1) * ch]);
        assert!(e < 1e-5, "K={k} batch row 1: max abs err {e:e}");
    }
}

#[test]
fn conv1d_without_silu_and_zero_taps_error() {
    let b = CpuBackend::new();
    let dims = ConvDims { channels: 2, kernel: 2 };
    let (x, w, bias) = (vec![1.0, 2.0, 3.0, 4.0], vec![0.5, 0.25, 1.0, 2.0], vec![0.1, 0.2]);
    let mut state = vec![10.0, 20.0];
    let mut out = vec![0f32; 4];
    b.conv1d_prefill(dims, 2, &x, &w, &bias, &mut state, false, &mut out).unwrap();
    // y[0] = b + w0·state + w1·x0; y[1] = b + w0·x0 + w1·x1
    assert_eq!(out, vec![0.1 + 5.0 + 1.0, 0.2 + 5.0 + 4.0, 0.1 + 0.5 + 3.0, 0.2 + 0.5 + 8.0]);
    assert_eq!(state, vec![3.0, 4.0]);
    let err = b.conv1d_prefill(ConvDims { channels: 2, kernel: 0 }, 2, &x, &w, &bias, &mut state, false, &mut out);
    assert!(err.is_err());
}

#[test]
fn headwise_matches_naive() {
    let b = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (blocks, din, dout) in [(4usize, 8usize, 8usize), (16, 4, 4), (3, 5, 7), (2, 32, 40), (3, 48, 32)] {
        // the last two take the gemm path (blocks of ≥ 1024 weights over ≥ 4 rows)
        let rows = 5;
        let x = rand_vec(&mut rng, rows * blocks * din);
        let w = rand_vec(&mut rng, blocks * dout * din);
        let bias = rand_vec(&mut rng, blocks * dout);
        let mut out = vec![0f32; rows * blocks * dout];
        let dims = HeadwiseDims { blocks, din, dout };
        b.headwise(&x, rows, &w, dims, Some(&bias), &mut out).unwrap();
        let mut want = vec![0f64; rows * blocks * dout];
        for r in 0..rows {
            for bl in 0..blocks {
                for o in 0..dout {
                    let mut acc = bias[bl * dout + o] as f64;
                    for j in 0..din {
                        acc += w[(bl * dout + o) * din + j] as f64 * x[r * blocks * din + bl * din + j] as f64;
                    }
                    want[r * blocks * dout + bl * dout + o] = acc;
                }
            }
        }
        let e = max_abs_diff(&out, &want);
        assert!(e < 1e-5, "headwise {blocks}x{dout}x{din}: max abs err {e:e}");
    }
}

#[test]
fn gated_activations() {
    let b = CpuBackend::new();
    // exact GELU (torch approximate='none'), values from math.erf
    let xs = vec![-5.0f32, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0];
    let want = [
        -1.4332578593401202e-06, -0.00404969409489031, -0.15865525393145707, -0.15426876936299344, 0.0,
        0.34573123063700656, 0.8413447460685429, 1.9544997361036416, 3.9998733150326675,
    ];
    let ones = vec![1.0f32; xs.len()];
    let mut out = vec![0f32; xs.len()];
    b.gated_act(Activation::Gelu, &xs, &ones, xs.len(), &mut out).unwrap();
    for ((&o, &w), &x) in out.iter().zip(&want).zip(&xs) {
        assert!((o as f64 - w).abs() <= 1e-7 + 2e-7 * w.abs(), "gelu({x}) = {o}, want {w}");
    }
    // the others, times a non-trivial up
    let up: Vec<f32> = xs.iter().map(|x| 0.5 + x * 0.1).collect();
    let naive = |a: Activation, x: f64| -> f64 {
        match a {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Relu => x.max(0.0),
            Activation::ReluSquared => x.max(0.0).powi(2),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Selu => 1.0507009873554805 * if x > 0.0 { x } else { 1.6732632423543772 * (x.exp() - 1.0) },
            Activation::Gelu => unreachable!(),
        }
    };
    for a in [Activation::Silu, Activation::Relu, Activation::ReluSquared, Activation::Sigmoid, Activation::Selu] {
        b.gated_act(a, &xs, &up, xs.len(), &mut out).unwrap();
        for i in 0..xs.len() {
            let w = naive(a, xs[i] as f64) * up[i] as f64;
            assert!((out[i] as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "{a:?}({}): {} vs {w}", xs[i], out[i]);
        }
    }
}

#[test]
fn scaled_add_and_copy_cols() {
    let b = CpuBackend::new();
    let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    b.scaled_add(&mut x, &vec![1.0; 6], &vec![0.5, 1.0, 2.0], 2, 3).unwrap();
    assert_eq!(x, vec![1.5, 3.0, 5.0, 4.5, 6.0, 8.0]);
    let src = vec![1.0f32, 2.0, 3.0, 4.0];
    let mut dst = vec![0f32; 2 * 5];
    b.copy_cols(&src, 2, 0, &mut dst, 5, 3, 2, 2).unwrap();
    assert_eq!(dst, vec![0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]);
    assert!(b.copy_cols(&src, 2, 0, &mut dst, 5, 4, 2, 2).is_err(), "overrunning the row is refused");
}
