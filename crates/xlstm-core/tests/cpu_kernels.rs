//! CPU kernels on fresh random inputs, against naive float64 implementations written here from the
//! equations (shared/NOTES.md §2), and against each other: chunkwise == sequence == step.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xlstm_core::backend::cpu::matmul::{self, CpuMat, MatData, Simd};
use xlstm_core::backend::{Backend, MlstmDims, MlstmKernel, MlstmState};
use xlstm_core::tensor::HostTensor;
use xlstm_core::{CpuBackend, DType};

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The parallel (quadratic) mLSTM form in f64 for one head, from state C=0, n=0, m=0, with the
/// initial m = 0 treated as a real stabiliser (as the recurrent reference does).
fn mlstm_f64(q: &[f64], k: &[f64], v: &[f64], ig: &[f64], fg: &[f64], s: usize, dk: usize, dv: usize, eps: f64) -> Vec<f64> {
    let ls = |x: f64| x.min(0.0) - (-x.abs()).exp().ln_1p();
    let mut bcum = vec![0.0; s + 1];
    for t in 0..s {
        bcum[t + 1] = bcum[t] + ls(fg[t]);
    }
    let mut h = vec![0.0; s * dv];
    for t in 0..s {
        // log weights of each source s' ≤ t, plus the initial state's (log 0 contribution, stabiliser b_t + 0)
        let logd: Vec<f64> = (0..=t).map(|u| bcum[t + 1] - bcum[u + 1] + ig[u]).collect();
        let m = logd.iter().cloned().fold(bcum[t + 1], f64::max);
        let mut num = vec![0.0; dv];
        let mut den = 0.0;
        for u in 0..=t {
            let qk: f64 = (0..dk).map(|a| q[t * dk + a] * k[u * dk + a]).sum::<f64>() / (dk as f64).sqrt();
            let w = (logd[u] - m).exp() * qk;
            den += w;
            for j in 0..dv {
                num[j] += w * v[u * dv + j];
            }
        }
        let d = den.abs().max((-m).exp()) + eps;
        for j in 0..dv {
            h[t * dv + j] = num[j] / d;
        }
    }
    h
}

struct Case {
    d: MlstmDims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    i: Vec<f32>,
    f: Vec<f32>,
}

fn case(seed: u64, seq: usize, d: MlstmDims) -> Case {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    Case {
        d,
        q: rand_vec(&mut r, seq * d.heads * d.dk, 1.0),
        k: rand_vec(&mut r, seq * d.heads * d.dk, 1.0),
        v: rand_vec(&mut r, seq * d.heads * d.dv, 1.0),
        // input gates around -2..4 and forget gates around 1..6, like trained models
        i: (0..seq * d.heads).map(|_| r.random_range(-2.0f32..4.0)).collect(),
        f: (0..seq * d.heads).map(|_| r.random_range(1.0f32..6.0)).collect(),
    }
}

fn zeros(d: MlstmDims) -> MlstmState<Vec<f32>> {
    MlstmState { c: vec![0.0; d.heads * d.dk * d.dv], n: vec![0.0; d.heads * d.dk], m: vec![0.0; d.heads], dims: d, c_dtype: DType::F32, pending: None }
}

fn run(c: &Case, seq: usize, kernel: Option<MlstmKernel>) -> (Vec<f32>, MlstmState<Vec<f32>>) {
    let be = CpuBackend::new();
    let d = c.d;
    let mut st = zeros(d);
    let mut h = vec![0.0; seq * d.heads * d.dv];
    match kernel {
        Some(k) => be.mlstm_prefill(k, d, seq, &c.q, &c.k, &c.v, &c.i, &c.f, &mut st, 1e-6, &mut h).unwrap(),
        None => {
            let (qk, vv) = (d.heads * d.dk, d.heads * d.dv);
            for t in 0..seq {
                let mut ht = vec![0.0; vv];
                be.mlstm_step(d, 1, &c.q[t * qk..].to_vec(), &c.k[t * qk..].to_vec(), &c.v[t * vv..].to_vec(), &c.i[t * d.heads..].to_vec(), &c.f[t * d.heads..].to_vec(), &mut st, 1e-6, &mut ht).unwrap();
                h[t * vv..(t + 1) * vv].copy_from_slice(&ht);
            }
        }
    }
    (h, st)
}

fn head_f64(c: &Case, seq: usize, head: usize) -> Vec<f64> {
    let d = c.d;
    let pick = |x: &[f32], w: usize| -> Vec<f64> {
        (0..seq).flat_map(|t| x[t * d.heads * w + head * w..t * d.heads * w + (head + 1) * w].iter().map(|&v| v as f64)).collect()
    };
    let g = |x: &[f32]| -> Vec<f64> { (0..seq).map(|t| x[t * d.heads + head] as f64).collect() };
    mlstm_f64(&pick(&c.q, d.dk), &pick(&c.k, d.dk), &pick(&c.v, d.dv), &g(&c.i), &g(&c.f), seq, d.dk, d.dv, 1e-6)
}

fn head_of(h: &[f32], d: MlstmDims, seq: usize, head: usize) -> Vec<f32> {
    (0..seq).flat_map(|t| h[t * d.heads * d.dv + head * d.dv..t * d.heads * d.dv + (head + 1) * d.dv].to_vec()).collect()
}

#[test]
fn mlstm_kernels_match_f64_and_each_other() {
    let d = MlstmDims { heads: 3, dk: 16, dv: 24 };
    for chunk in [4usize, 16, 64] {
        for seq in [1, chunk - 1, chunk, 3 * chunk + 5] {
            if seq == 0 {
                continue;
            }
            let c = case(seq as u64 * 31 + chunk as u64, seq, d);
            let (h_chunk, s_chunk) = run(&c, seq, Some(MlstmKernel::Chunkwise { chunk }));
            let (h_seq, s_seq) = run(&c, seq, Some(MlstmKernel::Sequence));
            let (h_step, s_step) = run(&c, seq, None);
            for head in 0..d.heads {
                let want = head_f64(&c, seq, head);
                for (name, h) in [("chunkwise", &h_chunk), ("sequence", &h_seq), ("step", &h_step)] {
                    let e = rel(&head_of(h, d, seq, head), &want);
                    assert!(e < 1e-5, "{name} chunk={chunk} seq={seq} head={head}: rel err {e:e}");
                }
            }
            let to64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
            // States agree once put on a common stabiliser: C·e^m is invariant.
            for (name, s) in [("chunkwise", &s_chunk), ("sequence", &s_seq)] {
                for hd in 0..d.heads {
                    let sc = |st: &MlstmState<Vec<f32>>| -> Vec<f32> {
                        let e = st.m[hd].exp();
                        st.c[hd * d.dk * d.dv..(hd + 1) * d.dk * d.dv].iter().map(|x| x * e).collect()
                    };
                    let err = rel(&sc(s), &to64(&sc(&s_step)));
                    assert!(err < 1e-4, "{name} state C chunk={chunk} seq={seq}: rel err {err:e}");
                }
            }
        }
    }
}

/// A prompt split in two prefill calls equals one call (state carried).
#[test]
fn mlstm_split_prefill_equals_whole() {
    let d = MlstmDims { heads: 2, dk: 8, dv: 8 };
    let seq = 45;
    let c = case(5, seq, d);
    let (whole, _) = run(&c, seq, Some(MlstmKernel::Chunkwise { chunk: 8 }));
    let be = CpuBackend::new();
    let mut st = zeros(d);
    let cut = 21;
    let (qk, vv) = (d.heads * d.dk, d.heads * d.dv);
    let mut h1 = vec![0.0; cut * vv];
    be.mlstm_prefill(MlstmKernel::Chunkwise { chunk: 8 }, d, cut, &c.q, &c.k, &c.v, &c.i, &c.f, &mut st, 1e-6, &mut h1).unwrap();
    let mut h2 = vec![0.0; (seq - cut) * vv];
    be.mlstm_prefill(MlstmKernel::Chunkwise { chunk: 8 }, d, seq - cut, &c.q[cut * qk..].to_vec(), &c.k[cut * qk..].to_vec(), &c.v[cut * vv..].to_vec(), &c.i[cut * 2..].to_vec(), &c.f[cut * 2..].to_vec(), &mut st, 1e-6, &mut h2).unwrap();
    h1.extend(h2);
    let e = rel(&h1, &whole.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(e < 1e-5, "split prefill rel err {e:e}");
}

#[test]
fn mlstm_step_is_batch_invariant() {
    let d = MlstmDims { heads: 2, dk: 8, dv: 12 };
    let be = CpuBackend::new();
    let b = 3;
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let q = rand_vec(&mut r, b * 16, 1.0);
    let k = rand_vec(&mut r, b * 16, 1.0);
    let v = rand_vec(&mut r, b * 24, 1.0);
    let i = rand_vec(&mut r, b * 2, 3.0);
    let f = rand_vec(&mut r, b * 2, 3.0);
    let mut st = MlstmState { c: rand_vec(&mut r, b * 2 * 96, 0.5), n: rand_vec(&mut r, b * 16, 0.5), m: rand_vec(&mut r, b * 2, 1.0), dims: d, c_dtype: DType::F32, pending: None };
    let mut singles = Vec::new();
    for s in 0..b {
        let mut one = MlstmState { c: st.c[s * 192..(s + 1) * 192].to_vec(), n: st.n[s * 16..(s + 1) * 16].to_vec(), m: st.m[s * 2..(s + 1) * 2].to_vec(), dims: d, c_dtype: DType::F32, pending: None };
        let mut h = vec![0.0; 24];
        be.mlstm_step(d, 1, &q[s * 16..].to_vec(), &k[s * 16..].to_vec(), &v[s * 24..].to_vec(), &i[s * 2..].to_vec(), &f[s * 2..].to_vec(), &mut one, 1e-6, &mut h).unwrap();
        singles.extend(h);
    }
    let mut h = vec![0.0; b * 24];
    be.mlstm_step(d, b, &q, &k, &v, &i, &f, &mut st, 1e-6, &mut h).unwrap();
    assert_eq!(h, singles, "batched step must equal single steps exactly");
}

fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for r in 0..m {
        for j in 0..n {
            y[r * n + j] = (0..k).map(|a| x[r * k + a] as f64 * w[j * k + a] as f64).sum();
        }
    }
    y
}

#[test]
fn matmul_all_dtypes_paths_and_shapes() {
    let be = CpuBackend::new();
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for &(m, n, k) in &[(1usize, 37usize, 19usize), (1, 300, 1000), (3, 129, 64), (4, 64, 4096), (5, 77, 33), (70, 300, 130)] {
        let x = rand_vec(&mut r, m * k, 1.0);
        let w = rand_vec(&mut r, n * k, 1.0);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let mat: CpuMat = be.matrix(HostTensor::f32(vec![n, k], w.clone()), dt).unwrap();
            // the reference uses the weights as rounded to the dtype, so only f32 accumulation error remains
            let mut wr = vec![0.0; k];
            let wq: Vec<f32> = (0..n).flat_map(|j| { mat.row_f32(j, &mut wr); wr.clone() }).collect();
            let want = naive(&x, m, &wq, n, k);
            let mut y = vec![0.0; m * n];
            be.matmul(&x, m, &mat, &mut y).unwrap();
            let e = rel(&y, &want);
            assert!(e < 1e-6, "matmul {m}x{n}x{k} {dt}: rel err {e:e}");
            if m <= matmul::GEMV_MAX_ROWS {
                let mut ys = vec![0.0; m * n];
                matmul::gemv(&x, m, &mat, &mut ys, Simd::Scalar);
                let e = rel(&ys, &want);
                assert!(e < 1e-6, "scalar gemv {m}x{n}x{k} {dt}: rel err {e:e}");
            } else {
                let mut yb = vec![0.0; m * n];
                matmul::gemm_blocked(&x, m, &mat, &mut yb);
                assert!(rel(&yb, &want) < 1e-6);
            }
            assert!(matches!((&mat.data, dt), (MatData::F32(_), DType::F32) | (MatData::BF16(_), DType::BF16) | (MatData::F16(_), DType::F16)));
        }
    }
}

#[test]
fn ops_report_bad_shapes_as_errors() {
    let be = CpuBackend::new();
    let mat = be.matrix(HostTensor::f32(vec![4, 8], vec![0.0; 32]), DType::F32).unwrap();
    let mut out = vec![0.0; 3];
    let err = be.matmul(&vec![0.0; 8], 1, &mat, &mut out).unwrap_err().to_string();
    assert!(err.contains("matmul") && err.contains("out"), "{err}");
    let err = be.embed(&mat, &[9], &mut vec![0.0; 8]).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
}
