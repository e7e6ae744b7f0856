//! Recurrent state as a value: clone, save to a file, restore, and continue exactly where it was.
mod common;

use common::*;
use xlstm_core::config::{LargeConfig, ModelConfig};
use xlstm_core::{CpuBackend, DType, LogitRows, MlstmKernel, Model};

#[test]
fn state_clone_save_restore_continue_identically() {
    let mut model = Model::load(CpuBackend::new(), &case_dir("large_tiny"), DType::F32).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 512) as u32).collect();
    let mut st = model.new_state(1).unwrap();
    model.prefill(&ids[..30], &mut st, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::None).unwrap();
    let branch = st.try_clone(&model.backend).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("state.safetensors");
    st.save(&model.backend, &path).unwrap();

    let cont = model.prefill(&ids[30..], &mut st, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::All).unwrap();
    let mut b = branch;
    let from_clone = model.prefill(&ids[30..], &mut b, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::All).unwrap();
    assert_eq!(cont, from_clone, "a clone continues exactly like the original");

    let mut restored = model.new_state(1).unwrap();
    restored.load_into(&model.backend, &path).unwrap();
    assert_eq!(restored.position, 30);
    let from_file = model.prefill(&ids[30..], &mut restored, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::All).unwrap();
    assert_eq!(cont, from_file, "a restored state continues exactly like the original");

    // and equals running the whole sequence at once, within f32 rounding
    let mut whole = model.new_state(1).unwrap();
    let all = model.prefill(&ids, &mut whole, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::All).unwrap();
    let e = rel_err32(&cont, &all[30 * 512..]);
    assert!(e < 1e-5, "split vs whole: {e:e}");
}

#[test]
fn state_of_another_model_is_refused() {
    let model = Model::load(CpuBackend::new(), &case_dir("large_tiny"), DType::F32).unwrap();
    let other = Model::random(CpuBackend::new(), ModelConfig::Large(LargeConfig::with_shape(3, 128, 2, 512)), DType::F32, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("s.safetensors");
    other.new_state(1).unwrap().save(&other.backend, &path).unwrap();
    let err = model.new_state(1).unwrap().load_into(&model.backend, &path).err().unwrap().to_string();
    assert!(err.contains("different model"), "{err}");
    std::fs::write(&path, b"garbage").unwrap();
    assert!(model.new_state(1).unwrap().load_into(&model.backend, &path).is_err());
}

/// A batch of sequences stepped together equals each stepped alone (decode batching).
#[test]
fn batched_decode_equals_single_sequences() {
    let mut model = Model::load(CpuBackend::new(), &case_dir("large_tiny"), DType::F32).unwrap();
    let seqs: Vec<Vec<u32>> = (0..5).map(|s| (0..9).map(|t| ((s * 101 + t * 13) % 512) as u32).collect()).collect();
    let mut batch = model.new_state(seqs.len()).unwrap();
    let mut batched = Vec::new();
    for t in 0..9 {
        let col: Vec<u32> = seqs.iter().map(|s| s[t]).collect();
        batched = model.step(&col, &mut batch).unwrap();
    }
    for (b, s) in seqs.iter().enumerate() {
        let mut one = model.new_state(1).unwrap();
        let mut l = Vec::new();
        for &t in s {
            l = model.step(&[t], &mut one).unwrap();
        }
        let e = rel_err32(&batched[b * 512..(b + 1) * 512], &l);
        // batches above the GEMV width take the GEMM path: same math, another summation order
        assert!(e < 1e-5, "sequence {b}: batched vs single {e:e}");
    }
}

/// A prompt longer than `keep_prompt_rows` frees its activation buffers when done; what follows
/// (steps, another prompt) gives exactly what a model that kept them gives. Both families.
#[test]
fn freeing_prompt_buffers_changes_no_result() {
    for case in ["large_tiny", "lm_tiny"] {
        let run = |keep: usize| {
            let mut model = Model::load(CpuBackend::new(), &case_dir(case), DType::F32).unwrap();
            model.keep_prompt_rows = keep;
            let v = model.vocab_size() as u32;
            let ids: Vec<u32> = (0..48).map(|i| (i * 37 + 5) % v).collect();
            let mut st = model.new_state(1).unwrap();
            let mut out = model.prefill(&ids[..40], &mut st, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::Last).unwrap();
            for &t in &ids[40..44] {
                out.extend(model.step(&[t], &mut st).unwrap());
            }
            out.extend(model.prefill(&ids[44..], &mut st, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::All).unwrap());
            out.extend(model.step(&[ids[0]], &mut st).unwrap());
            out
        };
        assert_eq!(run(8), run(1000), "{case}: freeing the prompt buffers changed the logits");
    }
}
