//! xlstm-lm (mLSTM + sLSTM blocks: conv1d, headwise projections, sLSTM cell, group norms, gated FFN)
//! on CUDA against the golden case tests/data/lm_tiny (NX-AI `xlstm` 2.0.6, float64): prefill and
//! step logits within 1e-4 relative (Frobenius), f32 weights (3e-2 with the mLSTM C in bf16); decode
//! steps through the captured graph equal eager steps at batch 3. Without a usable GPU every test
//! prints SKIP.
mod common;

use common::*;
use xlstm_core::testing::{golden_prefill, golden_prefill_pruned, golden_steps, Expected};
use xlstm_core::LogitRows;
use xlstm_core::{DType, MlstmKernel, Model};

/// lm_tiny's prompt through `kernels` and step by step, every logit within `tol` of the reference;
/// and the prompt asking for its last row's logits only (the last block pruned to that row).
fn prefill_and_steps(model: &mut Model<xlstm_cuda::CudaBackend>, kernels: &[MlstmKernel], tol: f64, what: &str) {
    for &kernel in kernels {
        let (_, e, _) = golden_prefill(model, "lm_tiny", kernel);
        eprintln!("lm_tiny prefill {kernel:?}{what}: rel err {e:.2e}");
        assert!(e < tol, "lm_tiny prefill {kernel:?}{what}: rel err {e:e}");
        let (e, _) = golden_prefill_pruned(model, "lm_tiny", kernel, LogitRows::Last);
        assert!(e < tol, "lm_tiny prefill {kernel:?}{what}, last row only: rel err {e:e}");
    }
    let (_, e) = golden_steps(model, "lm_tiny");
    eprintln!("lm_tiny step{what}: rel err {e:.2e}");
    assert!(e < tol, "lm_tiny step{what}: rel err {e:e}");
}

#[test]
fn lm_tiny_prefill_and_step() {
    let Some((g, _l)) = gpu("lm_tiny_prefill_and_step") else { return };
    let mut model = Model::load(g.clone(), &case_dir("lm_tiny"), DType::F32).expect("lm_tiny loads on CUDA");
    let kernels = [MlstmKernel::Chunkwise { chunk: model.chunk_size }, MlstmKernel::Chunkwise { chunk: 16 }, MlstmKernel::Sequence];
    prefill_and_steps(&mut model, &kernels, 1e-4, "");
}

/// The mLSTM blocks' C in bf16 (`--state-dtype bf16`; the sLSTM state stays f32): prefill and
/// steps within the bound of a bfloat16 model (3e-2; each step rounds C to bf16).
#[test]
fn lm_tiny_bf16_state() {
    let Some((g, _l)) = gpu("lm_tiny_bf16_state") else { return };
    let mut model = Model::load(g.clone(), &case_dir("lm_tiny"), DType::F32).expect("lm_tiny loads on CUDA");
    model.set_state_dtype(DType::BF16).unwrap();
    let kernels = [MlstmKernel::Chunkwise { chunk: model.chunk_size }, MlstmKernel::Sequence];
    prefill_and_steps(&mut model, &kernels, 3e-2, ", bf16 C");
}

#[test]
fn lm_tiny_decode_graph_matches_eager() {
    let Some((g, _l)) = gpu("lm_tiny_decode_graph_matches_eager") else { return };
    let ids = Expected::load("lm_tiny").ids("input_ids");
    let batch = 3;
    let run = |graphs: bool| {
        g.set_graphs(graphs);
        let mut model = Model::load(g.clone(), &case_dir("lm_tiny"), DType::F32).unwrap();
        let mut st = model.new_state(batch).unwrap();
        let mut out = Vec::new();
        for t in 0..10 {
            let step: Vec<u32> = (0..batch).map(|b| ids[(t + 7 * b) % ids.len()]).collect();
            out.extend(model.step(&step, &mut st).unwrap());
        }
        out
    };
    let (r0, _, _) = g.graph_stats();
    let eager = run(false);
    let graphed = run(true);
    let (r1, _, _) = g.graph_stats();
    g.set_graphs(true);
    assert!(r1 - r0 >= 6, "the lm decode graph was replayed only {} times", r1 - r0);
    assert_eq!(graphed, eager, "graph replay differs from eager steps");
}
