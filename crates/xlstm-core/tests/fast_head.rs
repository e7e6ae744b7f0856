//! The fused LM head and the speed knobs change speed, never results.
mod common;

use common::*;
use xlstm_core::backend::cpu::{matmul, mlstm};
use xlstm_core::backend::top_k_of;
use xlstm_core::generate::{generate, GenerateParams};
use xlstm_core::sampling::SamplingParams;
use xlstm_core::tokenizer::Tokenizer;
use xlstm_core::{CpuBackend, DType, LogitRows, MlstmKernel, Model};

fn model(dtype: DType) -> Model<CpuBackend> {
    Model::load(CpuBackend::new(), &case_dir("large_tiny"), dtype).unwrap()
}

#[test]
fn fused_head_top_k_equals_plain_logits_then_selection() {
    for dtype in [DType::F32, DType::BF16] {
        for batch in [1usize, 3, 6] {
            for k in [1usize, 7] {
                let mut a = model(dtype);
                let mut b = model(dtype);
                let mut sa = a.new_state(batch).unwrap();
                let mut sb = b.new_state(batch).unwrap();
                for t in 0..4u32 {
                    let ids: Vec<u32> = (0..batch as u32).map(|r| (t * 31 + r * 7) % 512).collect();
                    let logits = a.step(&ids, &mut sa).unwrap();
                    let fused = b.step_top_k(&ids, &mut sb, k).unwrap();
                    for r in 0..batch {
                        let want = top_k_of(&logits[r * 512..(r + 1) * 512], k);
                        let ids_w: Vec<u32> = want.iter().map(|x| x.0).collect();
                        let ids_f: Vec<u32> = fused[r].iter().map(|x| x.0).collect();
                        assert_eq!(ids_f, ids_w, "{dtype} batch {batch} k {k} row {r}");
                        for (x, y) in fused[r].iter().zip(&want) {
                            assert!((x.1 - y.1).abs() <= 1e-5 * y.1.abs().max(1.0), "{x:?} vs {y:?}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn generation_is_identical_with_and_without_the_fused_head() {
    for sampling in [
        SamplingParams::default(),
        SamplingParams { temperature: 0.9, top_k: 12, top_p: 0.95, repetition_penalty: 1.0, seed: 4 },
        SamplingParams { temperature: 0.9, top_k: 0, top_p: 0.9, repetition_penalty: 1.3, seed: 4 },
    ] {
        let run = |fast: bool| {
            let mut m = model(DType::F32);
            let p = GenerateParams { max_new_tokens: 24, sampling: sampling.clone(), stop_on_eos: false, fast_head: fast, ..Default::default() };
            generate(&mut m, &Tokenizer::Bytes, "The quick brown fox", &p, |_| {}).unwrap().tokens
        };
        assert_eq!(run(true), run(false), "{sampling:?}");
    }
}

#[test]
fn tile_and_band_knobs_do_not_change_results() {
    let ids: Vec<u32> = (0..70).map(|i| (i * 13 % 512) as u32).collect();
    let run = || {
        let mut m = model(DType::BF16);
        let mut st = m.new_state(1).unwrap();
        let mut out = m.prefill(&ids, &mut st, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::All).unwrap();
        out.extend(m.step(&[5], &mut st).unwrap());
        out
    };
    let base = run();
    matmul::set_tile(7, 24);
    mlstm::set_heads_per_band(2);
    let tuned = run();
    matmul::set_tile(32, 0);
    mlstm::set_heads_per_band(1);
    let e = rel_err32(&tuned, &base);
    assert!(e < 1e-6, "knobs changed results: {e:e}");
}

/// The CPU keeps no chosen token on the device: greedy generation steps from the host there, and
/// asking for the device path is a clear error, not a panic.
#[test]
fn pipelined_greedy_is_refused_where_the_backend_lacks_it() {
    let mut m = model(DType::F32);
    assert!(!m.can_pipe_greedy());
    let mut st = m.new_state(1).unwrap();
    let err = m.pipe_step(Some(1), &mut st).unwrap_err().to_string();
    assert!(err.contains("keep the chosen token"), "{err}");
    assert_eq!(st.position, 0, "nothing ran");
}
