//! Recurrent state as a first-class value: everything a sequence carries from one token to the next
//! (every layer's mLSTM C, n, m; sLSTM c, n, m, h; rolling conv inputs). Fixed-size whatever the
//! context length. It can be created, advanced (by the model), cloned, saved to a file and restored.
use std::collections::HashMap;
use std::path::Path;

use crate::backend::{Backend, MlstmState, SlstmState};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// A causal conv1d's last `taps` inputs per sequence: [B, taps, channels].
pub struct ConvState<Buf> {
    pub buf: Buf,
    pub taps: usize,
    pub channels: usize,
}

pub enum LayerState<Buf> {
    Mlstm { cell: MlstmState<Buf>, conv: Option<ConvState<Buf>> },
    Slstm { cell: SlstmState<Buf>, conv: ConvState<Buf> },
}

/// One named state tensor: name, shape, buffer, the element type the buffer holds.
pub type StateTensor<'a, Buf> = (&'static str, Vec<usize>, &'a Buf, DType);

impl<Buf> LayerState<Buf> {
    /// The tensors of this layer at batch size `b`, in a fixed order.
    pub fn tensors(&self, b: usize) -> Vec<StateTensor<'_, Buf>> {
        let mut out = Vec::new();
        let f32 = DType::F32;
        let conv = match self {
            LayerState::Mlstm { cell, conv } => {
                let d = cell.dims;
                out.push(("C", vec![b, d.heads, d.dk, d.dv], &cell.c, cell.c_dtype));
                out.push(("n", vec![b, d.heads, d.dk], &cell.n, f32));
                out.push(("m", vec![b, d.heads, 1], &cell.m, f32));
                conv.as_ref()
            }
            LayerState::Slstm { cell, conv } => {
                let w = cell.width;
                out.push(("c", vec![b, w], &cell.c, f32));
                out.push(("n", vec![b, w], &cell.n, f32));
                out.push(("m", vec![b, w], &cell.m, f32));
                out.push(("h", vec![b, w], &cell.h, f32));
                Some(conv)
            }
        };
        if let Some(c) = conv {
            out.push(("conv", vec![b, c.taps, c.channels], &c.buf, f32));
        }
        out
    }

    fn tensors_mut(&mut self) -> Vec<&mut Buf> {
        match self {
            LayerState::Mlstm { cell, conv } => {
                let mut v = vec![&mut cell.c, &mut cell.n, &mut cell.m];
                if let Some(c) = conv {
                    v.push(&mut c.buf);
                }
                v
            }
            LayerState::Slstm { cell, conv } => vec![&mut cell.c, &mut cell.n, &mut cell.m, &mut cell.h, &mut conv.buf],
        }
    }
}

/// The recurrent state of `batch` sequences of one model.
pub struct State<B: Backend> {
    pub batch: usize,
    /// Tokens consumed so far (the same for every sequence of the batch).
    pub position: usize,
    /// Identifies the model shape this state belongs to; checked on restore.
    pub fingerprint: String,
    pub layers: Vec<LayerState<B::Buf>>,
}

const STATE_FORMAT: &str = "xlstm-state/1";

impl<B: Backend> State<B> {
    /// A deep copy (e.g. to branch a conversation from a cached prompt).
    pub fn try_clone(&self, backend: &B) -> Result<Self> {
        self.settle(backend)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(clone_layer(backend, l, self.batch)?);
        }
        Ok(State { batch: self.batch, position: self.position, fingerprint: self.fingerprint.clone(), layers })
    }

    /// Named host copies of every tensor as f32 (a bf16 C widened): `state_{layer}_{name}`.
    pub fn to_host(&self, backend: &B) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        let mut out = Vec::new();
        self.settle(backend)?;
        for (li, l) in self.layers.iter().enumerate() {
            for (name, shape, buf, dtype) in l.tensors(self.batch) {
                let len = shape.iter().product();
                out.push((format!("state_{li}_{name}"), shape, download_values(backend, buf, len, dtype)?));
            }
        }
        Ok(out)
    }

    /// Bytes the state's tensors take on the device (C in its element type; not the room for
    /// deferred updates).
    pub fn bytes(&self) -> usize {
        self.layers.iter().flat_map(|l| l.tensors(self.batch)).map(|(_, shape, _, dt)| shape.iter().product::<usize>() * dt.size()).sum()
    }

    /// Bytes a decode step moves to and from the state: every tensor read and written, except that
    /// with deferred updates a C is written once in `Backend::mlstm_steps_per_write` steps.
    pub fn step_traffic(&self, backend: &B) -> f64 {
        let mut saved = 0.0;
        for l in &self.layers {
            if let LayerState::Mlstm { cell, .. } = l {
                let c_bytes = (self.batch * cell.dims.heads * cell.dims.dk * cell.dims.dv * cell.c_dtype.size()) as f64;
                saved += c_bytes * (1.0 - 1.0 / backend.mlstm_steps_per_write(cell).max(1) as f64);
            }
        }
        2.0 * self.bytes() as f64 - saved
    }

    /// Folds every mLSTM layer's deferred updates into its C (`Backend::mlstm_settle`).
    pub fn settle(&self, backend: &B) -> Result<()> {
        for l in &self.layers {
            if let LayerState::Mlstm { cell, .. } = l {
                backend.mlstm_settle(cell)?;
            }
        }
        Ok(())
    }

    pub fn save(&self, backend: &B, path: &Path) -> Result<()> {
        let host = self.to_host(backend)?;
        let views: Vec<(String, safetensors::tensor::TensorView)> = host
            .iter()
            .map(|(n, shape, data)| {
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                    .expect("shape matches data");
                (n.clone(), view)
            })
            .collect();
        let meta: HashMap<String, String> = [
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("fingerprint".to_string(), self.fingerprint.clone()),
            ("position".to_string(), self.position.to_string()),
            ("batch".to_string(), self.batch.to_string()),
        ]
        .into();
        safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| Error::file(path, e))
    }

    /// Overwrites this state (created by the same model) with one saved by [`State::save`].
    pub fn load_into(&mut self, backend: &B, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::file(path, format!("not a saved state ({e})")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, e))?;
        let md = meta.metadata().clone().unwrap_or_default();
        if md.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(Error::file(path, "not a state file written by `xlstm` (format tag missing)"));
        }
        if md.get("fingerprint") != Some(&self.fingerprint) {
            return Err(Error::file(path, format!(
                "state belongs to a different model ({}), this model is {}",
                md.get("fingerprint").map(String::as_str).unwrap_or("?"),
                self.fingerprint
            )));
        }
        let batch: usize = md.get("batch").and_then(|b| b.parse().ok()).unwrap_or(0);
        if batch != self.batch {
            return Err(Error::file(path, format!("state has batch {batch}, expected {}", self.batch)));
        }
        let mut uploads = Vec::new();
        for (li, l) in self.layers.iter().enumerate() {
            for (name, shape, _, dtype) in l.tensors(self.batch) {
                let key = format!("state_{li}_{name}");
                let t = st.tensor(&key).map_err(|_| Error::file(path, format!("tensor `{key}` missing")))?;
                if t.shape() != shape.as_slice() || t.dtype() != safetensors::Dtype::F32 {
                    return Err(Error::file(path, format!("tensor `{key}` has the wrong shape or dtype")));
                }
                let data: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                uploads.push(upload_values(backend, &data, dtype)?);
            }
        }
        let mut it = uploads.into_iter();
        for l in &mut self.layers {
            for slot in l.tensors_mut() {
                *slot = it.next().expect("one upload per tensor");
            }
            // the new C is whole: nothing deferred stays
            if let LayerState::Mlstm { cell, .. } = l {
                cell.pending = pending_room(backend, cell.dims, self.batch, cell.c_dtype)?;
            }
        }
        self.position = md.get("position").and_then(|p| p.parse().ok()).unwrap_or(0);
        Ok(())
    }
}

fn clone_layer<B: Backend>(backend: &B, l: &LayerState<B::Buf>, batch: usize) -> Result<LayerState<B::Buf>> {
    let dup = |buf: &B::Buf, len: usize| -> Result<B::Buf> {
        let mut out = backend.zeros(len)?;
        backend.copy(buf, 0, &mut out, 0, len)?;
        Ok(out)
    };
    let lens: Vec<usize> = l.tensors(batch).iter().map(|(_, s, _, dt)| words(s.iter().product(), *dt)).collect();
    Ok(match l {
        LayerState::Mlstm { cell, conv } => LayerState::Mlstm {
            cell: MlstmState {
                c: dup(&cell.c, lens[0])?,
                n: dup(&cell.n, lens[1])?,
                m: dup(&cell.m, lens[2])?,
                dims: cell.dims,
                c_dtype: cell.c_dtype,
                pending: pending_room(backend, cell.dims, batch, cell.c_dtype)?,
            },
            conv: match conv {
                Some(c) => Some(ConvState { buf: dup(&c.buf, lens[3])?, taps: c.taps, channels: c.channels }),
                None => None,
            },
        },
        LayerState::Slstm { cell, conv } => LayerState::Slstm {
            cell: SlstmState {
                c: dup(&cell.c, lens[0])?,
                n: dup(&cell.n, lens[1])?,
                m: dup(&cell.m, lens[2])?,
                h: dup(&cell.h, lens[3])?,
                width: cell.width,
                heads: cell.heads,
            },
            conv: ConvState { buf: dup(&conv.buf, lens[4])?, taps: conv.taps, channels: conv.channels },
        },
    })
}

/// A zeroed mLSTM layer state for `batch` sequences, C in `c_dtype`.
pub fn mlstm_zeros<B: Backend>(backend: &B, dims: crate::backend::MlstmDims, batch: usize, c_dtype: DType) -> Result<MlstmState<B::Buf>> {
    let u = batch * dims.heads;
    let c = backend.zeros(words(u * dims.dk * dims.dv, c_dtype))?;
    Ok(MlstmState { c, n: backend.zeros(u * dims.dk)?, m: backend.zeros(u)?, dims, c_dtype, pending: pending_room(backend, dims, batch, c_dtype)? })
}

/// Empty room for the deferred updates of C the backend keeps (`Backend::mlstm_pending_words`).
fn pending_room<B: Backend>(backend: &B, dims: crate::backend::MlstmDims, batch: usize, c_dtype: DType) -> Result<Option<B::Buf>> {
    match backend.mlstm_pending_words(dims, batch, c_dtype) {
        0 => Ok(None),
        w => backend.zeros(w).map(Some),
    }
}

/// The 4-byte buffer words `values` values of `dtype` take (16-bit ones two to a word).
pub fn words(values: usize, dtype: DType) -> usize {
    (values * dtype.size()).div_ceil(4)
}

/// `values` values of a buffer holding `dtype`, as f32 on the host.
pub fn download_values<B: Backend>(backend: &B, buf: &B::Buf, values: usize, dtype: DType) -> Result<Vec<f32>> {
    let w = backend.download(buf, words(values, dtype))?;
    if dtype == DType::F32 {
        return Ok(w);
    }
    let halves = w.iter().flat_map(|x| {
        let b = x.to_bits();
        [(b & 0xffff) as u16, (b >> 16) as u16]
    });
    Ok(halves.take(values).map(|h| half_value(h, dtype)).collect())
}

/// A new buffer holding `values` as `dtype` (16-bit: rounded to nearest even, two to a word).
pub fn upload_values<B: Backend>(backend: &B, values: &[f32], dtype: DType) -> Result<B::Buf> {
    if dtype == DType::F32 {
        return backend.upload(values);
    }
    let packed: Vec<f32> = values
        .chunks(2)
        .map(|p| {
            let lo = half_bits(p[0], dtype) as u32;
            let hi = p.get(1).map_or(0, |&v| half_bits(v, dtype) as u32);
            f32::from_bits(lo | (hi << 16))
        })
        .collect();
    backend.upload(&packed)
}

fn half_value(h: u16, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_bits(h).to_f32(),
        _ => half::bf16::from_bits(h).to_f32(),
    }
}

fn half_bits(v: f32, dtype: DType) -> u16 {
    match dtype {
        DType::F16 => half::f16::from_f32(v).to_bits(),
        _ => half::bf16::from_f32(v).to_bits(),
    }
}
