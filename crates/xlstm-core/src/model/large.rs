//! xlstm-large: the xLSTM-7B architecture (NX-AI, 2025; Hugging Face `modeling_xlstm.py`).
//!
//! x = Embedding(ids); per block: x += mLSTMLayer(RMSNorm(x)); x += SwiGLU-FFN(RMSNorm(x));
//! logits = 30·tanh(lm_head(RMSNorm(x)) / 30). The mLSTM layer: q, k, v, o, ĩ, f̃ projections,
//! gates soft-capped at 15, the mLSTM cell per head, per-head LayerNorm, sigmoid(o) gate, out_proj.
use crate::backend::{Activation, Backend, FfnScratch, MlstmDims, MlstmHalf, MlstmKernel, MlstmScratch, StackBlock, StackHead};
use crate::config::LargeConfig;
use crate::error::Result;
use crate::model::{ActivationCache, GrowBuf, LogitRows, Network, Rows};
use crate::state::{mlstm_zeros, LayerState};
use crate::tensor::{DType, HostTensor};
use crate::weights::Weights;

struct Block<B: Backend> {
    norm_mlstm: B::Buf,
    q: B::Mat,
    k: B::Mat,
    v: B::Mat,
    o: B::Mat,
    igate: B::Mat,
    fgate: B::Mat,
    igate_bias: B::Buf,
    fgate_bias: B::Buf,
    head_norm: B::Buf,
    out_proj: B::Mat,
    norm_ffn: B::Buf,
    up_gate: B::Mat,
    up: B::Mat,
    down: B::Mat,
}

/// Activation buffers for a number of rows (see `ActivationCache`).
struct Scratch<B: Backend> {
    x: B::Buf,
    xn: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    o: B::Buf,
    i: B::Buf,
    f: B::Buf,
    h: B::Buf,
    hn: B::Buf,
    y: B::Buf,
    g: B::Buf,
    u: B::Buf,
    /// silu(g) ⊙ u
    a: B::Buf,
    last: B::Buf,
}

impl<B: Backend> Scratch<B> {
    /// The residual rows and the mLSTM half's scratch, borrowed together.
    fn mlstm(&mut self) -> (&mut B::Buf, MlstmScratch<'_, B::Buf>) {
        (&mut self.x, MlstmScratch { xn: &mut self.xn, q: &mut self.q, k: &mut self.k, v: &mut self.v, o: &mut self.o, i: &mut self.i, f: &mut self.f, h: &mut self.h, hn: &mut self.hn, y: &mut self.y })
    }
}

pub struct LargeNet<B: Backend> {
    cfg: LargeConfig,
    dims: MlstmDims,
    embedding: B::Mat,
    blocks: Vec<Block<B>>,
    out_norm: Option<B::Buf>,
    lm_head: B::Mat,
    scratch: ActivationCache<Scratch<B>>,
    logits: GrowBuf<B::Buf>,
    /// The last forward's decode stack also chose the next token (`head_top1_chosen` only starts
    /// its copy back).
    chosen_in_stack: bool,
}

fn vector<B: Backend>(b: &B, t: HostTensor) -> Result<B::Buf> {
    b.upload(&t.to_f32())
}

/// The gate rows are tiny ([NH, D]); f32 keeps their dot products exact at no cost.
const GATE_DTYPE: DType = DType::F32;

impl<B: Backend> LargeNet<B> {
    pub fn new(backend: &B, cfg: &LargeConfig, mut w: Weights) -> Result<Self> {
        let dt: DType = w.dtype;
        // The gate rows go in GATE_DTYPE (below); a fused [ĩ; f̃] tensor becomes two matrices,
        // hence 256 bytes of rounding per layer on top.
        let gate_rows = |n: &str| n.ends_with("igate_preact.weight") || n.ends_with("fgate_preact.weight");
        backend.expect_matrix_bytes(w.matrix_bytes(|n| if gate_rows(n) { GATE_DTYPE } else { dt }) + 256 * cfg.num_hidden_layers);
        let (d, qk, vd, nh, ff, voc) = (cfg.hidden_size, cfg.qk_dim(), cfg.v_dim(), cfg.num_heads, cfg.ffn_dim(), cfg.vocab_size);
        let mat = |t: HostTensor| backend.matrix(t, dt);
        let fused = cfg.weight_mode == "fused";
        let emb = w.take_any(&["backbone.embeddings.weight", "embedding.weight"], &[voc, d])?;
        let lm_head = if cfg.tie_word_embeddings { emb.clone() } else { w.take("lm_head.weight", &[voc, d])? };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("backbone.blocks.{i}");
            let ml = format!("{p}.mlstm_layer");
            let (q, k, v, o, ig, fg, ib, fb);
            if fused {
                let qkvo = w.take(&format!("{ml}.qkv_opreact.weight"), &[2 * qk + 2 * vd, d])?;
                q = qkvo.rows(0, qk);
                k = qkvo.rows(qk, 2 * qk);
                v = qkvo.rows(2 * qk, 2 * qk + vd);
                o = qkvo.rows(2 * qk + vd, 2 * qk + 2 * vd);
                let ifw = w.take(&format!("{ml}.ifgate_preact.weight"), &[2 * nh, d])?;
                let ifb = w.take(&format!("{ml}.ifgate_preact.bias"), &[2 * nh])?;
                (ig, fg) = (ifw.rows(0, nh), ifw.rows(nh, 2 * nh));
                (ib, fb) = (ifb.rows(0, nh), ifb.rows(nh, 2 * nh));
            } else {
                q = w.take(&format!("{ml}.q.weight"), &[qk, d])?;
                k = w.take(&format!("{ml}.k.weight"), &[qk, d])?;
                v = w.take(&format!("{ml}.v.weight"), &[vd, d])?;
                o = w.take(&format!("{ml}.ogate_preact.weight"), &[vd, d])?;
                ig = w.take(&format!("{ml}.igate_preact.weight"), &[nh, d])?;
                fg = w.take(&format!("{ml}.fgate_preact.weight"), &[nh, d])?;
                ib = w.take(&format!("{ml}.igate_preact.bias"), &[nh])?;
                fb = w.take(&format!("{ml}.fgate_preact.bias"), &[nh])?;
            }
            let (up_gate, up) = if fused {
                let z = w.take(&format!("{p}.ffn.proj_up_gate_z.weight"), &[2 * ff, d])?;
                (z.rows(0, ff), z.rows(ff, 2 * ff))
            } else {
                (w.take(&format!("{p}.ffn.proj_up_gate.weight"), &[ff, d])?, w.take(&format!("{p}.ffn.proj_up.weight"), &[ff, d])?)
            };
            blocks.push(Block {
                norm_mlstm: vector(backend, w.take(&format!("{p}.norm_mlstm.weight"), &[d])?)?,
                q: mat(q)?,
                k: mat(k)?,
                v: mat(v)?,
                o: mat(o)?,
                igate: backend.matrix(ig, GATE_DTYPE)?,
                fgate: backend.matrix(fg, GATE_DTYPE)?,
                igate_bias: vector(backend, ib)?,
                fgate_bias: vector(backend, fb)?,
                head_norm: vector(backend, w.take(&format!("{ml}.multihead_norm.weight"), &[vd])?)?,
                out_proj: mat(w.take(&format!("{ml}.out_proj.weight"), &[d, vd])?)?,
                norm_ffn: vector(backend, w.take(&format!("{p}.norm_ffn.weight"), &[d])?)?,
                up_gate: mat(up_gate)?,
                up: mat(up)?,
                down: mat(w.take(&format!("{p}.ffn.proj_down.weight"), &[d, ff])?)?,
            });
        }
        let out_norm = if cfg.add_out_norm { Some(vector(backend, w.take("backbone.out_norm.weight", &[d])?)?) } else { None };
        let net = LargeNet {
            cfg: cfg.clone(),
            dims: MlstmDims { heads: nh, dk: cfg.qk_head_dim(), dv: cfg.v_head_dim() },
            embedding: mat(emb)?,
            blocks,
            out_norm,
            lm_head: mat(lm_head)?,
            scratch: ActivationCache::new(),
            logits: GrowBuf::new(),
            chosen_in_stack: false,
        };
        w.finish()?;
        Ok(net)
    }

    fn make_scratch(b: &B, c: &LargeConfig, rows: usize) -> Result<Scratch<B>> {
        let (d, qk, v, nh, ff) = (c.hidden_size, c.qk_dim(), c.v_dim(), c.num_heads, c.ffn_dim());
        Ok(Scratch {
            x: b.scratch(rows * d)?,
            xn: b.scratch(rows * d)?,
            q: b.scratch(rows * qk)?,
            k: b.scratch(rows * qk)?,
            v: b.scratch(rows * v)?,
            o: b.scratch(rows * v)?,
            i: b.scratch(rows * nh)?,
            f: b.scratch(rows * nh)?,
            h: b.scratch(rows * v)?,
            hn: b.scratch(rows * v)?,
            y: b.scratch(rows * d)?,
            g: b.scratch(rows * ff)?,
            u: b.scratch(rows * ff)?,
            a: b.scratch(rows * ff)?,
            last: b.scratch(rows * d)?,
        })
    }
}

impl<B: Backend> Network<B> for LargeNet<B> {
    fn new_state(&self, backend: &B, batch: usize, c_dtype: DType) -> Result<Vec<LayerState<B::Buf>>> {
        (0..self.blocks.len())
            .map(|_| Ok(LayerState::Mlstm { cell: mlstm_zeros(backend, self.dims, batch, c_dtype)?, conv: None }))
            .collect()
    }


    fn release_cache(&mut self) {
        self.scratch.clear();
        self.logits.clear();
    }

    fn release_sequence_cache(&mut self, keep_rows: usize) -> bool {
        let freed = self.scratch.release_sequence(keep_rows);
        self.logits.shrink_to(keep_rows * self.cfg.vocab_size);
        freed
    }

    fn weight_bytes_per_token(&self, b: &B) -> usize {
        let per_block: usize = self
            .blocks
            .iter()
            .map(|k| [&k.q, &k.k, &k.v, &k.o, &k.igate, &k.fgate, &k.out_proj, &k.up_gate, &k.up, &k.down].iter().map(|m| b.matrix_bytes(m)).sum::<usize>())
            .sum();
        per_block + b.matrix_bytes(&self.lm_head)
    }

    fn forward(&mut self, b: &B, ids: &[u32], rows: Rows, state: &mut [LayerState<B::Buf>], logits: LogitRows) -> Result<Vec<f32>> {
        let n = ids.len();
        let c = &self.cfg;
        let (d, ff, eps) = (c.hidden_size, c.ffn_dim(), c.norm_eps);
        let s = self.scratch.get(rows, n, |n| Self::make_scratch(b, c, n))?;
        b.embed(&self.embedding, ids, &mut s.x)?;
        self.chosen_in_stack = false;
        // One sequence's decode step: the whole stack at once where the backend can, with the
        // greedy head that follows where it can take that too.
        let whole = matches!(rows, Rows::Step) && n == 1 && {
            let blocks: Vec<StackBlock<'_, B>> = self
                .blocks
                .iter()
                .map(|blk| StackBlock { mlstm: mlstm_half(blk, c), norm_ffn: &blk.norm_ffn, gate: &blk.up_gate, up: &blk.up, down: &blk.down, ff })
                .collect();
            let mut cells: Vec<_> = state
                .iter_mut()
                .map(|l| match l {
                    LayerState::Mlstm { cell, .. } => cell,
                    _ => unreachable!("xlstm-large state holds mLSTM layers only"),
                })
                .collect();
            let head = StackHead { norm: self.out_norm.as_ref(), eps, w: &self.lm_head, n: c.vocab_size, cap: c.output_logit_soft_cap };
            self.chosen_in_stack = matches!(logits, LogitRows::Chosen) && b.decode_stack(&mut s.x, d, self.dims, &blocks, &mut cells, Some(head))?;
            self.chosen_in_stack || b.decode_stack(&mut s.x, d, self.dims, &blocks, &mut cells, None)?
        };
        // A pruned prompt (`LogitRows::prunable`): the last block updates the state from the other
        // rows without forming their outputs, and runs its FFN on the last row alone.
        let pruned = logits.prunable(rows).filter(|_| !whole);
        let last_block = self.blocks.len().saturating_sub(1);
        for (l, (blk, layer)) in self.blocks.iter().zip(state.iter_mut()).enumerate().filter(|_| !whole) {
            let LayerState::Mlstm { cell, .. } = layer else { unreachable!("xlstm-large state holds mLSTM layers only") };
            // mLSTM sub-block: x += out_proj(σ(o) ⊙ LN_head(mLSTM(q, k, v, ĩ, f̃))) on RMSNorm(x).
            // The compositions below are the primitive ops in order (Backend defaults); a backend
            // may fuse each (see backend/mod.rs, "fusable compositions").
            let mut kernel = match rows {
                Rows::Sequence(kernel) => Some(kernel),
                Rows::Step => None,
            };
            let half = mlstm_half(blk, c);
            let mut rows_on = n;
            if let Some((prompt_kernel, keep_last)) = pruned.filter(|_| l == last_block) {
                let before = if keep_last { n - 1 } else { n };
                if keep_last {
                    b.copy(&s.x, before * d, &mut s.last, 0, d)?;
                }
                if before > 0 {
                    let (x, scratch) = s.mlstm();
                    b.norm_mlstm_state(x, before, d, self.dims, prompt_kernel, &half, cell, scratch)?;
                }
                if !keep_last {
                    break;
                }
                b.copy(&s.last, 0, &mut s.x, 0, d)?;
                // the last row as a recurrent step (one row: the decode step's kernels)
                (rows_on, kernel) = (1, None);
            }
            let (x, mlstm_scratch) = s.mlstm();
            b.norm_mlstm_add(x, rows_on, d, self.dims, kernel, &half, cell, mlstm_scratch)?; // x += [rows_on, D]
            // FFN sub-block (SwiGLU): x += down(silu(up_gate(RMSNorm(x))) ⊙ up(RMSNorm(x)))
            let ffn_scratch = FfnScratch { xn: &mut s.xn, g: &mut s.g, u: &mut s.u, a: &mut s.a, y: &mut s.y };
            b.norm_gated_ffn_add(&mut s.x, rows_on, d, &blk.norm_ffn, eps, &blk.up_gate, &blk.up, &blk.down, ff, Activation::Silu, ffn_scratch)?; // x += [rows_on, D]
        }
        match logits.range_pruned(n, pruned.is_some()) {
            Some((first, count)) => self.head_logits_of(b, first, count),
            None => Ok(Vec::new()),
        }
    }

    fn head_logits(&mut self, b: &B, rows: usize) -> Result<Vec<f32>> {
        self.head_logits_of(b, 0, rows)
    }

    fn has_chosen_head(&self) -> bool {
        true
    }

    fn head_top1_chosen(&mut self, b: &B, rows: usize) -> Result<u64> {
        if std::mem::take(&mut self.chosen_in_stack) && rows == 1 {
            return b.chosen_readback(rows);
        }
        self.final_norm(b, 0, rows)?;
        let (c, s) = (&self.cfg, self.scratch.last());
        let logits = self.logits.get(b, rows * c.vocab_size)?;
        b.head_top1_chosen(&s.xn, rows, &self.lm_head, c.vocab_size, c.output_logit_soft_cap, logits)
    }

    fn head_top_k(&mut self, b: &B, rows: usize, k: usize) -> Result<Option<Vec<Vec<(u32, f32)>>>> {
        self.final_norm(b, 0, rows)?;
        let (c, s) = (&self.cfg, self.scratch.last());
        let logits = self.logits.get(b, rows * c.vocab_size)?;
        Ok(Some(b.head_top_k(&s.xn, rows, &self.lm_head, c.vocab_size, c.output_logit_soft_cap, k, logits)?))
    }
}

impl<B: Backend> LargeNet<B> {
    /// Out-norm of hidden rows `first..first + count` of the last forward, into `scratch.xn`.
    fn final_norm(&mut self, b: &B, first: usize, count: usize) -> Result<()> {
        let d = self.cfg.hidden_size;
        let s = self.scratch.last();
        // rows from the first need no copy of their own
        let rows = if first == 0 {
            &s.x
        } else {
            b.copy(&s.x, first * d, &mut s.last, 0, count * d)?;
            &s.last
        };
        match &self.out_norm {
            Some(w) => b.rms_norm(rows, count, d, w, self.cfg.norm_eps, &mut s.xn),
            None => b.copy(rows, 0, &mut s.xn, 0, count * d),
        }
    }

    fn head_logits_of(&mut self, b: &B, first: usize, count: usize) -> Result<Vec<f32>> {
        self.final_norm(b, first, count)?;
        let (c, s) = (&self.cfg, self.scratch.last());
        let logits = self.logits.get(b, count * c.vocab_size)?;
        b.matmul(&s.xn, count, &self.lm_head, logits)?; //                          [count, V]
        b.bias_soft_cap(logits, count, c.vocab_size, None, c.output_logit_soft_cap)?;
        b.download(logits, count * c.vocab_size)
    }
}

/// The MlstmKernel used when nothing else is asked: chunkwise with the config's chunk size.
pub fn default_kernel(cfg: &LargeConfig) -> MlstmKernel {
    MlstmKernel::Chunkwise { chunk: cfg.chunk_size }
}

/// Every tensor of an xlstm-large checkpoint ("single" weight mode, Hugging Face names), with a
/// random init that keeps activations in a sane range.
pub fn weight_specs(c: &LargeConfig) -> Vec<crate::model::random::WeightSpec> {
    use crate::model::random::{Init, WeightSpec as W};
    let (d, qk, v, nh, ff, voc) = (c.hidden_size, c.qk_dim(), c.v_dim(), c.num_heads, c.ffn_dim(), c.vocab_size);
    let mut s = vec![W::new("backbone.embeddings.weight", &[voc, d], Init::around(0.0, 1.0))];
    for i in 0..c.num_hidden_layers {
        let p = format!("backbone.blocks.{i}");
        let ml = format!("{p}.mlstm_layer");
        s.push(W::new(format!("{p}.norm_mlstm.weight"), &[d], Init::around(1.0, 0.1)));
        s.push(W::new(format!("{ml}.q.weight"), &[qk, d], Init::fan_in(d)));
        s.push(W::new(format!("{ml}.k.weight"), &[qk, d], Init::fan_in(d)));
        s.push(W::new(format!("{ml}.v.weight"), &[v, d], Init::fan_in(d)));
        s.push(W::new(format!("{ml}.ogate_preact.weight"), &[v, d], Init::fan_in(d)));
        s.push(W::new(format!("{ml}.igate_preact.weight"), &[nh, d], Init::fan_in(d)));
        s.push(W::new(format!("{ml}.igate_preact.bias"), &[nh], Init::around(-1.0, 1.0)));
        s.push(W::new(format!("{ml}.fgate_preact.weight"), &[nh, d], Init::fan_in(d)));
        s.push(W::new(format!("{ml}.fgate_preact.bias"), &[nh], Init::around(3.0, 1.0)));
        s.push(W::new(format!("{ml}.multihead_norm.weight"), &[v], Init::around(1.0, 0.1)));
        s.push(W::new(format!("{ml}.out_proj.weight"), &[d, v], Init::fan_in(v)));
        s.push(W::new(format!("{p}.norm_ffn.weight"), &[d], Init::around(1.0, 0.1)));
        s.push(W::new(format!("{p}.ffn.proj_up_gate.weight"), &[ff, d], Init::fan_in(d)));
        s.push(W::new(format!("{p}.ffn.proj_up.weight"), &[ff, d], Init::fan_in(d)));
        s.push(W::new(format!("{p}.ffn.proj_down.weight"), &[d, ff], Init::fan_in(ff)));
    }
    if c.add_out_norm {
        s.push(W::new("backbone.out_norm.weight", &[d], Init::around(1.0, 0.1)));
    }
    if !c.tie_word_embeddings {
        s.push(W::new("lm_head.weight", &[voc, d], Init::fan_in(d)));
    }
    s
}

/// A block's mLSTM half as the backend takes it.
fn mlstm_half<'a, B: Backend>(blk: &'a Block<B>, c: &LargeConfig) -> MlstmHalf<'a, B> {
    MlstmHalf {
        norm: &blk.norm_mlstm,
        eps: c.norm_eps,
        proj: [&blk.q, &blk.k, &blk.v, &blk.o, &blk.igate, &blk.fgate], // q, k [n, qk]; v, o [n, v]; ĩ, f̃ [n, NH]
        ibias: &blk.igate_bias,
        fbias: &blk.fgate_bias,
        gate_cap: c.gate_soft_cap,
        cell_eps: c.eps,
        head_norm: &blk.head_norm,
        out_proj: &blk.out_proj,
    }
}
