//! The CPU backend: the reference every other backend is tested against, and the default.
//! Weights stay in their 16-bit dtype (bf16/f16) and are widened in registers; all math is f32.
pub mod matmul;
pub mod mlstm;

use rayon::prelude::*;

use super::{Backend, MlstmDims, MlstmKernel, MlstmState};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostTensor};
pub use matmul::{CpuMat, MatData};

/// A raw pointer that parallel tasks may share when each writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

fn check_len(op: &str, what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Device(format!("cpu {op}: buffer `{what}` holds {have} values, {need} needed")));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Mat = CpuMat;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn download(&self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        check_len("download", "buf", buf.len(), len)?;
        Ok(buf[..len].to_vec())
    }
    fn copy(&self, src: &Vec<f32>, src_off: usize, dst: &mut Vec<f32>, dst_off: usize, len: usize) -> Result<()> {
        check_len("copy", "src", src.len(), src_off + len)?;
        check_len("copy", "dst", dst.len(), dst_off + len)?;
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        Ok(())
    }

    fn matrix(&self, w: HostTensor, dtype: DType) -> Result<CpuMat> {
        if w.shape.len() != 2 {
            return Err(Error::Weights(format!("expected a 2-D weight matrix, got shape {:?}", w.shape)));
        }
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let data = match w.to_dtype(dtype).data {
            HostData::F32(v) => MatData::F32(v),
            HostData::BF16(v) => MatData::BF16(bytemuck::cast_vec(v)),
            HostData::F16(v) => MatData::F16(bytemuck::cast_vec(v)),
        };
        Ok(CpuMat { rows, cols, data })
    }
    fn matrix_bytes(&self, w: &CpuMat) -> usize {
        w.bytes()
    }

    fn embed(&self, table: &CpuMat, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let d = table.cols;
        check_len("embed", "out", out.len(), ids.len() * d)?;
        for (r, &id) in ids.iter().enumerate() {
            if id as usize >= table.rows {
                return Err(Error::Input(format!("token id {id} is out of range: the vocabulary has {} tokens", table.rows)));
            }
            table.row_f32(id as usize, &mut out[r * d..(r + 1) * d]);
        }
        Ok(())
    }

    fn matmul(&self, x: &Vec<f32>, rows: usize, w: &CpuMat, out: &mut Vec<f32>) -> Result<()> {
        check_len("matmul", "x", x.len(), rows * w.cols)?;
        check_len("matmul", "out", out.len(), rows * w.rows)?;
        matmul::matmul(x, rows, w, out);
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, rows: usize, width: usize, weight: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        check_len("rms_norm", "x", x.len(), rows * width)?;
        check_len("rms_norm", "out", out.len(), rows * width)?;
        out[..rows * width].par_chunks_mut(width).zip(x[..rows * width].par_chunks(width)).for_each(|(o, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let r = 1.0 / (ms + eps).sqrt();
            o.iter_mut().zip(x).zip(weight).for_each(|((o, x), w)| *o = x * r * w);
        });
        Ok(())
    }

    fn group_norm(&self, x: &Vec<f32>, rows: usize, width: usize, group: usize, weight: &Vec<f32>, bias: Option<&Vec<f32>>, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        check_len("group_norm", "x", x.len(), rows * width)?;
        check_len("group_norm", "out", out.len(), rows * width)?;
        if group == 0 || width % group != 0 {
            return Err(Error::Device(format!("group_norm: width {width} is not a multiple of group {group}")));
        }
        out[..rows * width].par_chunks_mut(width).zip(x[..rows * width].par_chunks(width)).for_each(|(o, x)| {
            for g in 0..width / group {
                let xs = &x[g * group..(g + 1) * group];
                let mean = xs.iter().sum::<f32>() / group as f32;
                let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / group as f32;
                let r = 1.0 / (var + eps).sqrt();
                for j in g * group..(g + 1) * group {
                    o[j] = (x[j] - mean) * r * weight[j] + bias.map_or(0.0, |b| b[j]);
                }
            }
        });
        Ok(())
    }

    fn bias_soft_cap(&self, x: &mut Vec<f32>, rows: usize, width: usize, bias: Option<&Vec<f32>>, cap: f32) -> Result<()> {
        check_len("bias_soft_cap", "x", x.len(), rows * width)?;
        for row in x[..rows * width].chunks_mut(width) {
            for (j, v) in row.iter_mut().enumerate() {
                let y = *v + bias.map_or(0.0, |b| b[j]);
                *v = if cap > 0.0 { cap * (y / cap).tanh() } else { y };
            }
        }
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        check_len("add", "x", x.len(), len)?;
        check_len("add", "y", y.len(), len)?;
        x[..len].iter_mut().zip(&y[..len]).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, len: usize, out: &mut Vec<f32>) -> Result<()> {
        check_len("swiglu", "gate", gate.len(), len)?;
        check_len("swiglu", "up", up.len(), len)?;
        check_len("swiglu", "out", out.len(), len)?;
        out[..len].par_chunks_mut(4096).zip(gate[..len].par_chunks(4096)).zip(up[..len].par_chunks(4096)).for_each(
            |((o, g), u)| o.iter_mut().zip(g).zip(u).for_each(|((o, &g), &u)| *o = g / (1.0 + (-g).exp()) * u),
        );
        Ok(())
    }

    fn sigmoid_gate(&self, gate: &Vec<f32>, x: &mut Vec<f32>, len: usize) -> Result<()> {
        check_len("sigmoid_gate", "gate", gate.len(), len)?;
        check_len("sigmoid_gate", "x", x.len(), len)?;
        x[..len].iter_mut().zip(&gate[..len]).for_each(|(x, &g)| *x *= 1.0 / (1.0 + (-g).exp()));
        Ok(())
    }

    fn mlstm_step(&self, d: MlstmDims, batch: usize, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, i: &Vec<f32>, f: &Vec<f32>, s: &mut MlstmState<Vec<f32>>, eps: f32, h: &mut Vec<f32>) -> Result<()> {
        check_mlstm("mlstm_step", d, batch, batch, q, k, v, i, f, s, h)?;
        mlstm::step(d, batch, q, k, v, i, f, &mut s.c, &mut s.n, &mut s.m, eps, h);
        Ok(())
    }

    fn mlstm_prefill(&self, kernel: MlstmKernel, d: MlstmDims, seq: usize, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, i: &Vec<f32>, f: &Vec<f32>, s: &mut MlstmState<Vec<f32>>, eps: f32, h: &mut Vec<f32>) -> Result<()> {
        check_mlstm("mlstm_prefill", d, seq, 1, q, k, v, i, f, s, h)?;
        let chunk = match kernel {
            MlstmKernel::Chunkwise { chunk: 0 } => return Err(Error::Input("chunk size must be positive".into())),
            MlstmKernel::Chunkwise { chunk } => Some(chunk),
            MlstmKernel::Sequence => None,
        };
        mlstm::prefill(d, chunk, seq, q, k, v, i, f, &mut s.c, &mut s.n, &mut s.m, eps, h);
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn check_mlstm(op: &str, d: MlstmDims, rows: usize, batch: usize, q: &[f32], k: &[f32], v: &[f32], i: &[f32], f: &[f32], s: &MlstmState<Vec<f32>>, h: &[f32]) -> Result<()> {
    let nh = d.heads;
    check_len(op, "q", q.len(), rows * nh * d.dk)?;
    check_len(op, "k", k.len(), rows * nh * d.dk)?;
    check_len(op, "v", v.len(), rows * nh * d.dv)?;
    check_len(op, "i", i.len(), rows * nh)?;
    check_len(op, "f", f.len(), rows * nh)?;
    check_len(op, "h", h.len(), rows * nh * d.dv)?;
    check_len(op, "C", s.c.len(), batch * nh * d.dk * d.dv)?;
    check_len(op, "n", s.n.len(), batch * nh * d.dk)?;
    check_len(op, "m", s.m.len(), batch * nh)
}
