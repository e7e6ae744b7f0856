//! Checkpoint variants a user meets: "fused" weight mode, NX-AI's native `embedding.weight`, float16
//! storage. Each is written by the test from the golden case and must give the golden logits.
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use xlstm_core::{CpuBackend, DType, LogitRows, MlstmKernel, Model};

fn read_f32(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), Dtype::F32);
            (n, (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        })
        .collect()
}

fn write(dir: &Path, tensors: &HashMap<String, (Vec<usize>, Vec<f32>)>, f16: bool) {
    let bytes: HashMap<&String, Vec<u8>> = tensors
        .iter()
        .map(|(n, (_, v))| {
            let b = if f16 { v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect() } else { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
            (n, b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (shape, _))| (n.clone(), TensorView::new(if f16 { Dtype::F16 } else { Dtype::F32 }, shape.clone(), &bytes[n]).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn logits(dir: &Path) -> Vec<f32> {
    let exp = Expected::load("large_tiny");
    let mut m = Model::load(CpuBackend::new(), dir, DType::F32).unwrap();
    let mut st = m.new_state(1).unwrap();
    m.prefill(&exp.ids("input_ids"), &mut st, MlstmKernel::Chunkwise { chunk: 16 }, LogitRows::All).unwrap()
}

fn cat_rows(parts: &[&(Vec<usize>, Vec<f32>)]) -> (Vec<usize>, Vec<f32>) {
    let mut shape = parts[0].0.clone();
    shape[0] = parts.iter().map(|p| p.0[0]).sum();
    (shape, parts.iter().flat_map(|p| p.1.iter().copied()).collect())
}

#[test]
fn fused_mode_and_native_embedding_name_give_the_golden_logits() {
    let src = case_dir("large_tiny");
    let mut t = read_f32(&src.join("model.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let emb = t.remove("backbone.embeddings.weight").unwrap();
    t.insert("embedding.weight".into(), emb);
    for i in 0..2 {
        let ml = format!("backbone.blocks.{i}.mlstm_layer");
        let take = |t: &mut HashMap<_, _>, n: &str| t.remove(&format!("{ml}.{n}")).unwrap();
        let (q, k, v, o) = (take(&mut t, "q.weight"), take(&mut t, "k.weight"), take(&mut t, "v.weight"), take(&mut t, "ogate_preact.weight"));
        t.insert(format!("{ml}.qkv_opreact.weight"), cat_rows(&[&q, &k, &v, &o]));
        let (iw, fw) = (take(&mut t, "igate_preact.weight"), take(&mut t, "fgate_preact.weight"));
        t.insert(format!("{ml}.ifgate_preact.weight"), cat_rows(&[&iw, &fw]));
        let (ib, fb) = (take(&mut t, "igate_preact.bias"), take(&mut t, "fgate_preact.bias"));
        t.insert(format!("{ml}.ifgate_preact.bias"), cat_rows(&[&ib, &fb]));
        let ffn = format!("backbone.blocks.{i}.ffn");
        let g = t.remove(&format!("{ffn}.proj_up_gate.weight")).unwrap();
        let u = t.remove(&format!("{ffn}.proj_up.weight")).unwrap();
        t.insert(format!("{ffn}.proj_up_gate_z.weight"), cat_rows(&[&g, &u]));
    }
    write(tmp.path(), &t, false);
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap().replace("\"weight_mode\": \"single\"", "\"weight_mode\": \"fused\"");
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    let e = rel_err(&logits(tmp.path()), &Expected::load("large_tiny").f64("logits_f64"));
    assert!(e < 1e-4, "fused mode: rel err {e:e}");
}

#[test]
fn float16_checkpoint_loads_and_stays_close() {
    let src = case_dir("large_tiny");
    let t = read_f32(&src.join("model.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), &t, true);
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let e = rel_err(&logits(tmp.path()), &Expected::load("large_tiny").f64("logits_f64"));
    assert!(e < 1e-2, "f16 weights: rel err {e:e} (f16 rounding of the weights, ~1e-3 expected)");
    assert!(e > 1e-7, "the weights really were rounded to f16");
}
