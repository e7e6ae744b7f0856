//! Argument checks every backend runs before an op: the buffers' lengths (in values) against what
//! the op's dimensions need, so that a wrong shape is the same clear error on every device.
//! `device` names the backend in the message ("cpu", "cuda", "wgpu").
use super::{ConvDims, MlstmDims};
use crate::tensor::DType;
use crate::error::{Error, Result};

/// A buffer `what` holding `have` values where the op needs `need`.
pub fn len(device: &str, op: &str, what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Device(format!("{device} {op}: buffer `{what}` holds {have} values, {need} needed")));
    }
    Ok(())
}

/// The mLSTM cell over `rows` rows of `batch` sequences: `io` = q, k, v, i, f, h; `state` = C, n, m.
/// `state`: the lengths of C, n, m in 4-byte words; C holds `c_dtype` (bf16: two values a word),
/// which must be one the backend keeps C in (`offered`: its `Backend::state_dtypes`).
#[allow(clippy::too_many_arguments)]
pub fn mlstm(device: &str, op: &str, d: MlstmDims, rows: usize, batch: usize, io: [usize; 6], mut state: [usize; 3], c_dtype: DType, offered: &[DType]) -> Result<()> {
    if !offered.contains(&c_dtype) {
        return Err(Error::Device(format!("{device} {op}: this backend does not keep the mLSTM state's C in {c_dtype}")));
    }
    state[0] = state[0] * 4 / c_dtype.size();
    let nh = d.heads;
    let need_io = [rows * nh * d.dk, rows * nh * d.dk, rows * nh * d.dv, rows * nh, rows * nh, rows * nh * d.dv];
    for ((what, have), need) in ["q", "k", "v", "i", "f", "h"].into_iter().zip(io).zip(need_io) {
        len(device, op, what, have, need)?;
    }
    let need_state = [batch * nh * d.dk * d.dv, batch * nh * d.dk, batch * nh];
    for ((what, have), need) in ["C", "n", "m"].into_iter().zip(state).zip(need_state) {
        len(device, op, what, have, need)?;
    }
    Ok(())
}

/// A causal conv1d over `rows` rows of `batch` sequences: `bufs` = x, w, bias, state, out.
pub fn conv(device: &str, op: &str, d: ConvDims, rows: usize, batch: usize, bufs: [usize; 5]) -> Result<()> {
    if d.kernel == 0 {
        return Err(Error::Device(format!("{device} {op}: a conv1d needs at least one tap")));
    }
    let ch = d.channels;
    let need = [rows * ch, d.kernel * ch, ch, batch * d.taps() * ch, rows * ch];
    for ((what, have), need) in ["x", "w", "bias", "state", "out"].into_iter().zip(bufs).zip(need) {
        len(device, op, what, have, need)?;
    }
    Ok(())
}

/// The sLSTM over `rows` rows of `batch` sequences of `width` values in `heads` heads: `gates` = i,
/// f, z, o; `r` the recurrent kernel; `state` = c, n, m, h; `y` the output. Returns the head width.
#[allow(clippy::too_many_arguments)]
pub fn slstm(device: &str, op: &str, rows: usize, batch: usize, width: usize, heads: usize, gates: [usize; 4], r: usize, bias: usize, state: [usize; 4], y: usize) -> Result<usize> {
    if heads == 0 || width % heads != 0 {
        return Err(Error::Device(format!("{device} {op}: width {width} does not split into {heads} heads")));
    }
    let dh = width / heads;
    for (what, have) in ["i", "f", "z", "o"].into_iter().zip(gates) {
        len(device, op, what, have, rows * width)?;
    }
    len(device, op, "r", r, heads * 4 * dh * dh)?;
    len(device, op, "bias", bias, 4 * width)?;
    for (what, have) in ["c", "n", "m", "h"].into_iter().zip(state) {
        len(device, op, what, have, batch * width)?;
    }
    len(device, op, "y", y, rows * width)?;
    Ok(dh)
}
