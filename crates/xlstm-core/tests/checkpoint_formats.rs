//! Checkpoint variants a user meets: "fused" weight mode, NX-AI's native `embedding.weight`, float16
//! storage. Each is written by the test from the golden case and must give the golden logits.
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use xlstm_core::{CpuBackend, DType, MlstmKernel, Model};

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

/// The model in `dir` on `case`'s prompt: every position's logits.
fn logits(case: &str, dir: &Path) -> Vec<f32> {
    let mut m = Model::load(CpuBackend::new(), dir, DType::F32).unwrap();
    golden_prefill(&mut m, case, MlstmKernel::Chunkwise { chunk: 16 }).0
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
    let e = rel_err(&logits("large_tiny", tmp.path()), &Expected::load("large_tiny").f64("logits_f64"));
    assert!(e < 1e-4, "fused mode: rel err {e:e}");
}

#[test]
fn float16_checkpoint_loads_and_stays_close() {
    let src = case_dir("large_tiny");
    let t = read_f32(&src.join("model.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), &t, true);
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let e = rel_err(&logits("large_tiny", tmp.path()), &Expected::load("large_tiny").f64("logits_f64"));
    assert!(e < 1e-2, "f16 weights: rel err {e:e} (f16 rounding of the weights, ~1e-3 expected)");
    assert!(e > 1e-7, "the weights really were rounded to f16");
}

/// An xlstm-lm checkpoint saved by the `xlstm` package's CUDA sLSTM cell (`slstm.backend: "cuda"`):
/// its recurrent kernel is [NH, DH (in), 4·DH (gate, out)] and its bias in (head, gate, dim) order,
/// where the vanilla cell keeps [NH, 4·DH (gate, out), DH (in)] and (gate, head, dim). Written here
/// from the golden case (vanilla) by those layouts' definitions, it must give the same logits.
#[test]
fn slstm_cuda_backend_layout_gives_the_golden_logits() {
    let src = case_dir("lm_tiny");
    let mut t = read_f32(&src.join("model.safetensors"));
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let nh = cfg["slstm_block"]["slstm"]["num_heads"].as_u64().unwrap() as usize;
    cfg["slstm_block"]["slstm"]["backend"] = serde_json::json!("cuda");
    let mut converted = 0;
    for (name, (shape, v)) in t.iter_mut() {
        if name.ends_with("slstm_cell._recurrent_kernel_") {
            let dh = shape[2];
            assert_eq!(shape, &vec![nh, 4 * dh, dh]);
            let mut c = vec![0f32; v.len()];
            for h in 0..nh {
                for go in 0..4 * dh {
                    for i in 0..dh {
                        c[(h * dh + i) * 4 * dh + go] = v[(h * 4 * dh + go) * dh + i];
                    }
                }
            }
            *shape = vec![nh, dh, 4 * dh];
            *v = c;
            converted += 1;
        } else if name.ends_with("slstm_cell._bias_") {
            let dh = v.len() / (4 * nh);
            let mut c = vec![0f32; v.len()];
            for g in 0..4 {
                for h in 0..nh {
                    c[(h * 4 + g) * dh..(h * 4 + g + 1) * dh].copy_from_slice(&v[(g * nh + h) * dh..(g * nh + h + 1) * dh]);
                }
            }
            *v = c;
            converted += 1;
        }
    }
    assert!(converted >= 2, "lm_tiny has sLSTM blocks");
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), &t, false);
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let (vanilla, cuda) = (logits("lm_tiny", &src), logits("lm_tiny", tmp.path()));
    assert_eq!(vanilla, cuda, "the same weights in the CUDA cell's layout give the same logits");
    let err = rel_err(&cuda, &Expected::load("lm_tiny").f64("logits_f64"));
    assert!(err < 1e-4, "rel err vs the float64 reference {err:e}");
}
