//! The CPU backend: the reference every other backend is tested against, and the default.
//! Weights stay in their 16-bit dtype (bf16/f16) and are widened in registers; all math is f32.
pub mod act;
pub mod conv;
pub mod matmul;
pub mod mlstm;
pub mod slstm;

use rayon::prelude::*;

use super::{shapes, Activation, Backend, ConvDims, HeadwiseDims, MlstmDims, MlstmKernel, MlstmState, SlstmGates, SlstmState};
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
    shapes::len("cpu", op, what, have, need)
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

    fn head_top_k(&self, x: &Vec<f32>, rows: usize, w: &CpuMat, n: usize, cap: f32, k: usize, scratch: &mut Vec<f32>) -> Result<Vec<Vec<(u32, f32)>>> {
        check_len("head_top_k", "x", x.len(), rows * w.cols)?;
        if rows > matmul::GEMV_MAX_ROWS || n != w.rows || k == 0 {
            // many rows: the plain path (the fused kernel's gain is in the streaming GEMV)
            self.matmul(x, rows, w, scratch)?;
            self.bias_soft_cap(scratch, rows, n, None, cap)?;
            return Ok(scratch[..rows * n].chunks(n).map(|r| super::top_k_of(r, k)).collect());
        }
        Ok(matmul::head_top_k(x, rows, w, cap, k))
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

    fn gated_act(&self, act: Activation, gate: &Vec<f32>, up: &Vec<f32>, len: usize, out: &mut Vec<f32>) -> Result<()> {
        check_len("gated_act", "gate", gate.len(), len)?;
        check_len("gated_act", "up", up.len(), len)?;
        check_len("gated_act", "out", out.len(), len)?;
        out[..len].par_chunks_mut(4096).zip(gate[..len].par_chunks(4096)).zip(up[..len].par_chunks(4096)).for_each(
            |((o, g), u)| o.iter_mut().zip(g).zip(u).for_each(|((o, &g), &u)| *o = act::apply(act, g) * u),
        );
        Ok(())
    }

    fn scaled_add(&self, x: &mut Vec<f32>, y: &Vec<f32>, scale: &Vec<f32>, rows: usize, width: usize) -> Result<()> {
        check_len("scaled_add", "x", x.len(), rows * width)?;
        check_len("scaled_add", "y", y.len(), rows * width)?;
        check_len("scaled_add", "scale", scale.len(), width)?;
        x[..rows * width].chunks_mut(width).zip(y[..rows * width].chunks(width)).for_each(|(x, y)| {
            x.iter_mut().zip(y).zip(&scale[..width]).for_each(|((x, &y), &s)| *x += s * y);
        });
        Ok(())
    }

    fn copy_cols(&self, src: &Vec<f32>, src_stride: usize, src_off: usize, dst: &mut Vec<f32>, dst_stride: usize, dst_off: usize, rows: usize, width: usize) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        if src_off + width > src_stride || dst_off + width > dst_stride {
            return Err(Error::Device(format!(
                "cpu copy_cols: columns {src_off}+{width} / {dst_off}+{width} overrun row strides {src_stride} / {dst_stride}"
            )));
        }
        check_len("copy_cols", "src", src.len(), (rows - 1) * src_stride + src_off + width)?;
        check_len("copy_cols", "dst", dst.len(), (rows - 1) * dst_stride + dst_off + width)?;
        for r in 0..rows {
            let (s, d) = (r * src_stride + src_off, r * dst_stride + dst_off);
            dst[d..d + width].copy_from_slice(&src[s..s + width]);
        }
        Ok(())
    }

    fn headwise(&self, x: &Vec<f32>, rows: usize, w: &Vec<f32>, d: HeadwiseDims, bias: Option<&Vec<f32>>, out: &mut Vec<f32>) -> Result<()> {
        check_len("headwise", "x", x.len(), rows * d.blocks * d.din)?;
        check_len("headwise", "w", w.len(), d.blocks * d.dout * d.din)?;
        check_len("headwise", "out", out.len(), rows * d.blocks * d.dout)?;
        if let Some(b) = bias {
            check_len("headwise", "bias", b.len(), d.blocks * d.dout)?;
        }
        conv::headwise(x, rows, w, d.blocks, d.din, d.dout, bias.map(|b| b.as_slice()), out);
        Ok(())
    }

    fn conv1d_prefill(&self, d: ConvDims, seq: usize, x: &Vec<f32>, w: &Vec<f32>, bias: &Vec<f32>, state: &mut Vec<f32>, silu: bool, out: &mut Vec<f32>) -> Result<()> {
        check_conv("conv1d_prefill", d, seq, 1, x, w, bias, state, out)?;
        conv::conv_seq(d.channels, d.kernel, seq, x, w, bias, state, silu, out);
        Ok(())
    }

    fn conv1d_step(&self, d: ConvDims, batch: usize, x: &Vec<f32>, w: &Vec<f32>, bias: &Vec<f32>, state: &mut Vec<f32>, silu: bool, out: &mut Vec<f32>) -> Result<()> {
        check_conv("conv1d_step", d, batch, batch, x, w, bias, state, out)?;
        conv::conv_step(d.channels, d.kernel, batch, x, w, bias, state, silu, out);
        Ok(())
    }

    fn slstm_step(&self, batch: usize, g: SlstmGates<'_, Vec<f32>>, r: &Vec<f32>, bias: &Vec<f32>, s: &mut SlstmState<Vec<f32>>, y: &mut Vec<f32>) -> Result<()> {
        let p = check_slstm("slstm_step", batch, batch, &g, r, bias, s, y)?;
        slstm::step(&p, batch, s.heads, &mut s.c, &mut s.n, &mut s.m, &mut s.h, y);
        Ok(())
    }

    fn slstm_prefill(&self, seq: usize, g: SlstmGates<'_, Vec<f32>>, r: &Vec<f32>, bias: &Vec<f32>, s: &mut SlstmState<Vec<f32>>, y: &mut Vec<f32>) -> Result<()> {
        let p = check_slstm("slstm_prefill", seq, 1, &g, r, bias, s, y)?;
        slstm::prefill(&p, seq, &mut s.c, &mut s.n, &mut s.m, &mut s.h, y);
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
    shapes::mlstm("cpu", op, d, rows, batch, [q.len(), k.len(), v.len(), i.len(), f.len(), h.len()], [s.c.len(), s.n.len(), s.m.len()], s.c_dtype, &[DType::F32])
}

#[allow(clippy::too_many_arguments)]
fn check_conv(op: &str, d: ConvDims, rows: usize, batch: usize, x: &[f32], w: &[f32], bias: &[f32], state: &[f32], out: &[f32]) -> Result<()> {
    shapes::conv("cpu", op, d, rows, batch, [x.len(), w.len(), bias.len(), state.len(), out.len()])
}

#[allow(clippy::too_many_arguments)]
fn check_slstm<'a>(op: &str, rows: usize, batch: usize, g: &SlstmGates<'a, Vec<f32>>, r: &'a [f32], bias: &'a [f32], s: &SlstmState<Vec<f32>>, y: &[f32]) -> Result<slstm::HeadParams<'a>> {
    let gates = [g.i.len(), g.f.len(), g.z.len(), g.o.len()];
    let state = [s.c.len(), s.n.len(), s.m.len(), s.h.len()];
    let dh = shapes::slstm("cpu", op, rows, batch, s.width, s.heads, gates, r.len(), bias.len(), state, y.len())?;
    Ok(slstm::HeadParams { gates: [g.i, g.f, g.z, g.o], r, bias, width: s.width, dh })
}
