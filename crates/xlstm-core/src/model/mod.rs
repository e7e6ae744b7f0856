//! Model families, each written once against the [`Backend`] interface, and the [`Model`] that the CLI,
//! generation and (later) the server drive.
pub mod large;
pub mod lm;
pub mod random;

use std::path::Path;

use crate::backend::{Backend, MlstmKernel};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::state::{LayerState, State};
use crate::tensor::DType;
use crate::weights::{Checkpoint, Weights};

/// How the rows of one forward call relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Consecutive tokens of one sequence (batch 1), through the given mLSTM kernel.
    Sequence(MlstmKernel),
    /// One token for each of `rows` sequences (row b belongs to state slot b): a recurrent step.
    Step,
}

/// Which rows get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    All,
    Last,
    None,
    /// None, and the caller asks `Network::head_top1_chosen` next (a backend may do both at once).
    Chosen,
}

impl LogitRows {
    /// The rows (first, count) of an `n`-row forward that get logits; None for none.
    pub fn range(self, n: usize) -> Option<(usize, usize)> {
        match self {
            LogitRows::None | LogitRows::Chosen => None,
            LogitRows::All => Some((0, n)),
            LogitRows::Last => Some((n - 1, 1)),
        }
    }

    /// A prompt pass (`rows` = `Rows::Sequence(kernel)`) that asks for the last row's logits or
    /// none: its last block's outputs matter for that one row at most, so a network may run the
    /// block's output side on that row alone, moved to row 0 (llama.cpp prunes the last layer's
    /// unused rows the same way). Some((kernel, whether the last row is kept)), else None.
    pub fn prunable(self, rows: Rows) -> Option<(MlstmKernel, bool)> {
        match (rows, self) {
            (Rows::Sequence(kernel), LogitRows::Last | LogitRows::None) => Some((kernel, self == LogitRows::Last)),
            _ => None,
        }
    }

    /// `range` after a forward that pruned its last block (`pruned`): the last row is row 0.
    pub fn range_pruned(self, n: usize, pruned: bool) -> Option<(usize, usize)> {
        self.range(n).map(|(first, count)| if pruned { (0, count) } else { (first, count) })
    }
}

/// What a model family implements: its layers over a block of rows, and its state layout.
pub trait Network<B: Backend>: Send {
    /// Fresh (zero) state for `batch` sequences, the mLSTM cells' C in `c_dtype`.
    fn new_state(&self, backend: &B, batch: usize, c_dtype: DType) -> Result<Vec<LayerState<B::Buf>>>;
    /// Runs `ids` (laid out as `rows` says) through every layer, advancing `state`, and returns the
    /// requested logits as host f32, row-major [n, V].
    fn forward(&mut self, backend: &B, ids: &[u32], rows: Rows, state: &mut [LayerState<B::Buf>], logits: LogitRows) -> Result<Vec<f32>>;
    /// Bytes of weights one decode step reads (all matrices but the embedding table).
    fn weight_bytes_per_token(&self, backend: &B) -> usize;
    /// Drops cached activation buffers (they are re-made at the next call's size).
    fn release_cache(&mut self) {}
    /// Drops the activation buffers of prompts longer than `keep_rows` rows (decode steps keep
    /// theirs); true when something was freed.
    fn release_sequence_cache(&mut self, _keep_rows: usize) -> bool {
        false
    }
    /// After a forward with `LogitRows::None` over `rows` rows: the LM head fused with the selection
    /// of each row's k best tokens. None where the family has no fused head (the caller falls back).
    fn head_top_k(&mut self, _backend: &B, _rows: usize, _k: usize) -> Result<Option<Vec<Vec<(u32, f32)>>>> {
        Ok(None)
    }
    /// After a forward with `LogitRows::None` over `rows` rows: those rows' logits [rows, V].
    fn head_logits(&mut self, backend: &B, rows: usize) -> Result<Vec<f32>>;
    /// Whether [`Network::head_top1_chosen`] is there (the family has the fused head).
    fn has_chosen_head(&self) -> bool {
        false
    }
    /// After a forward with `LogitRows::None`: the fused head's top-1 per row kept on the device
    /// (`Backend::head_top1_chosen`), returning its ticket.
    fn head_top1_chosen(&mut self, _backend: &B, _rows: usize) -> Result<u64> {
        Err(Error::Device("this model family has no fused LM head".into()))
    }
}

/// A buffer sized on demand to the most elements asked of it so far (the LM head's logits: a
/// prefill segment needs one row of them unless every position's logits are asked for).
pub(crate) struct GrowBuf<Bf>(Option<(usize, Bf)>);

impl<Bf> GrowBuf<Bf> {
    pub fn new() -> Self {
        GrowBuf(None)
    }
    pub fn get<B: Backend<Buf = Bf>>(&mut self, b: &B, len: usize) -> Result<&mut Bf> {
        if !self.0.as_ref().is_some_and(|(n, _)| *n >= len) {
            self.0 = None; // free the old one first
            self.0 = Some((len, b.zeros(len)?));
        }
        Ok(&mut self.0.as_mut().expect("set above").1)
    }
    pub fn clear(&mut self) {
        self.0 = None;
    }
    /// Frees the buffer when it holds more than `max_len` elements.
    pub fn shrink_to(&mut self, max_len: usize) {
        if self.0.as_ref().is_some_and(|(n, _)| *n > max_len) {
            self.0 = None;
        }
    }
}

/// A network's activation buffers (`S`, made for a number of rows), kept apart for decode steps and
/// for prompts: a step's buffers never move once made (a backend may have recorded the step against
/// them), and a long prompt's can be dropped after it without touching them.
pub(crate) struct ActivationCache<S> {
    step: Option<(usize, S)>,
    sequence: Option<(usize, S)>,
    last_was_step: bool,
}

impl<S> ActivationCache<S> {
    pub fn new() -> Self {
        ActivationCache { step: None, sequence: None, last_was_step: false }
    }

    /// The buffers for a forward of `n` rows laid out as `rows` says, made by `make(n)` when those
    /// held are fewer rows.
    pub fn get(&mut self, rows: Rows, n: usize, make: impl FnOnce(usize) -> Result<S>) -> Result<&mut S> {
        self.last_was_step = rows == Rows::Step;
        let slot = if self.last_was_step { &mut self.step } else { &mut self.sequence };
        if !slot.as_ref().is_some_and(|(r, _)| *r >= n) {
            *slot = None; // free the old ones first
            *slot = Some((n, make(n)?));
        }
        Ok(&mut slot.as_mut().expect("made above").1)
    }

    /// The buffers of the last forward.
    pub fn last(&mut self) -> &mut S {
        let slot = if self.last_was_step { &mut self.step } else { &mut self.sequence };
        &mut slot.as_mut().expect("a forward ran").1
    }

    /// Drops the prompt buffers when they hold more than `keep_rows` rows; true when it did.
    pub fn release_sequence(&mut self, keep_rows: usize) -> bool {
        let big = self.sequence.as_ref().is_some_and(|(r, _)| *r > keep_rows);
        if big {
            self.sequence = None;
            self.last_was_step = true;
        }
        big
    }

    pub fn clear(&mut self) {
        self.step = None;
        self.sequence = None;
    }
}

/// A prompt's activation buffers for up to this many rows (tokens per prefill pass) are kept for
/// the next prompt by default; larger ones are freed when the prompt is done, so that the memory
/// held while decoding stays bounded (`Model::keep_prompt_rows`, the `keep_prompt_buffers` knob).
/// 2048 is the CUDA and wgpu prefill segment: by default their buffers stay, which saves ~3 ms of
/// re-allocation per long prompt on xLSTM-7B and still keeps its batch-1 decode within 15 GB.
pub const KEEP_PROMPT_ROWS: usize = 2048;

/// One prefill segment, as the stats log records it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SegmentStat {
    pub tokens: usize,
    pub chunk: usize,
    pub seconds: f64,
}

/// A loaded model on one backend.
pub struct Model<B: Backend> {
    pub backend: B,
    pub config: ModelConfig,
    pub dtype: DType,
    pub chunk_size: usize,
    /// Prompt tokens per prefill pass (rounded down to a multiple of the chunk, at least one chunk);
    /// bounds activation memory. Starts at the backend's preference.
    pub prefill_segment: usize,
    /// A prompt's activation buffers for up to this many rows (tokens per prefill pass) are kept
    /// for the next prompt; larger ones are freed when it is done ([`KEEP_PROMPT_ROWS`] unless set).
    pub keep_prompt_rows: usize,
    /// The element type of the mLSTM states' C in new states (f32 unless `set_state_dtype`).
    state_dtype: DType,
    net: Box<dyn Network<B>>,
    /// Samples memory between segments and tokens; None when switched off.
    pub watchdog: Option<crate::watchdog::Watchdog>,
    /// Prefill segments since the caller last drained this (for the stats log).
    pub segments: Vec<SegmentStat>,
    /// What the watchdog made the model do (chunk shrinks, cache releases), for the caller to report.
    pub events: Vec<String>,
}

impl<B: Backend> Model<B> {
    /// Loads `dir` (config.json + safetensors) with weights in `dtype`.
    pub fn load(backend: B, dir: &Path, dtype: DType) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let weights = ckpt.load(dtype)?;
        Self::from_weights(backend, config, weights)
    }

    pub fn from_weights(backend: B, config: ModelConfig, weights: Weights) -> Result<Self> {
        let dtype = weights.dtype;
        backend.set_weight_dtype(dtype);
        let (net, chunk_size): (Box<dyn Network<B>>, usize) = match &config {
            ModelConfig::Large(c) => (Box::new(large::LargeNet::new(&backend, c, weights)?), c.chunk_size),
            ModelConfig::Lm(c) => (Box::new(lm::LmNet::new(&backend, c, weights)?), 64),
        };
        let prefill_segment = backend.prefill_segment();
        Ok(Model { backend, config, dtype, chunk_size, prefill_segment, keep_prompt_rows: KEEP_PROMPT_ROWS, state_dtype: DType::F32, net, watchdog: None, segments: Vec::new(), events: Vec::new() })
    }

    /// A model of `config`'s shape with random weights (for trying things out and benchmarks).
    pub fn random(backend: B, config: ModelConfig, dtype: DType, seed: u64) -> Result<Self> {
        let weights = random::random_weights(&config, dtype, seed)?;
        Self::from_weights(backend, config, weights)
    }

    pub fn fingerprint(&self) -> String {
        match &self.config {
            ModelConfig::Large(c) => format!(
                "xlstm-large:L{}:D{}:H{}:V{}:qk{}:v{}",
                c.num_hidden_layers, c.hidden_size, c.num_heads, c.vocab_size, c.qk_dim(), c.v_dim()
            ),
            ModelConfig::Lm(c) => c.fingerprint(),
        }
    }

    pub fn new_state(&self, batch: usize) -> Result<State<B>> {
        if batch == 0 {
            return Err(Error::Input("batch size must be at least 1".into()));
        }
        Ok(State { batch, position: 0, fingerprint: self.fingerprint(), layers: self.net.new_state(&self.backend, batch, self.state_dtype)? })
    }

    /// Keeps the mLSTM states' C of states made from now on in `dtype` (`--state-dtype`): f32, or
    /// bf16 where the backend offers it (half the state's memory and traffic; every step's update
    /// is rounded to bf16, as NX-AI's `inference_state_dtype = "bfloat16"` does).
    pub fn set_state_dtype(&mut self, dtype: DType) -> Result<()> {
        let offered = self.backend.state_dtypes();
        if !offered.contains(&dtype) {
            let names: Vec<&str> = offered.iter().map(|d| d.name()).collect();
            return Err(Error::Input(format!(
                "state dtype {dtype} is not available on {}: it keeps the mLSTM states' C in {}; use --state-dtype {}, or --device cuda (f32 or bf16)",
                self.backend.name(),
                names.join(" or "),
                names[0]
            )));
        }
        self.state_dtype = dtype;
        Ok(())
    }

    pub fn state_dtype(&self) -> DType {
        self.state_dtype
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size()
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Input(format!("token id {bad} is out of range: the vocabulary has {v} tokens (0..{})", v - 1)));
        }
        Ok(())
    }

    /// Feeds a prompt segment of one sequence (state batch 1) through `kernel`; long prompts go in
    /// segments (multiples of the chunk) with the state carried. Returns logits for `logits` rows.
    pub fn prefill(&mut self, ids: &[u32], state: &mut State<B>, kernel: MlstmKernel, logits: LogitRows) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::Input("the prompt is empty: give at least one token".into()));
        }
        if state.batch != 1 {
            return Err(Error::State(format!("prefill runs one sequence; this state holds {}", state.batch)));
        }
        self.check_ids(ids)?;
        let (mut kernel, mut segment) = (kernel, self.prefill_segment);
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < ids.len() {
            self.ease_memory(Some((&mut kernel, &mut segment)))?;
            let chunk = match kernel {
                MlstmKernel::Chunkwise { chunk } => chunk.max(1),
                MlstmKernel::Sequence => 1,
            };
            let seg = (segment / chunk).max(1) * chunk;
            let part = &ids[pos..(pos + seg).min(ids.len())];
            let last = pos + part.len() == ids.len();
            let want = match logits {
                LogitRows::All => LogitRows::All,
                LogitRows::Last if last => LogitRows::Last,
                _ => LogitRows::None,
            };
            let t = std::time::Instant::now();
            let l = self.net.forward(&self.backend, part, Rows::Sequence(kernel), &mut state.layers, want)?;
            self.segments.push(SegmentStat { tokens: part.len(), chunk, seconds: t.elapsed().as_secs_f64() });
            out.extend_from_slice(&l);
            state.position += part.len();
            pos += part.len();
        }
        if self.net.release_sequence_cache(self.keep_prompt_rows) {
            self.backend.release_sequence_cache()?;
        }
        Ok(out)
    }

    /// Asks the watchdog (if any) what to do: a hard limit is an error; at the soft limit the
    /// configured actions run (warn, release cached buffers, halve the prefill chunk and segment of
    /// the prefill in progress, given as `prefill`).
    pub fn ease_memory(&mut self, prefill: Option<(&mut MlstmKernel, &mut usize)>) -> Result<()> {
        let Some(w) = &self.watchdog else { return Ok(()) };
        let crate::watchdog::Verdict::Ease { actions, why } = w.check()? else { return Ok(()) };
        use crate::settings::MemAction;
        let min_chunk = w.min_chunk;
        if actions.contains(&MemAction::Warn) {
            w.warn_once(&why);
        }
        if actions.contains(&MemAction::EmptyCache) {
            self.net.release_cache();
            self.backend.release_cache()?;
            if !self.events.iter().any(|e| e.starts_with("released cached buffers")) {
                self.events.push(format!("released cached buffers ({why})"));
            }
        }
        if let (true, Some((MlstmKernel::Chunkwise { chunk }, segment))) = (actions.contains(&MemAction::Shrink), prefill) {
            if *chunk > min_chunk {
                let to = (*chunk / 2).max(min_chunk);
                self.events.push(format!("prefill chunk {chunk} -> {to} ({why})"));
                *chunk = to;
                // the segment too, so that the activation buffers shrink with it
                *segment = (*segment / 2).max(to);
            }
        }
        Ok(())
    }

    /// One recurrent step for every sequence of the state: `ids[b]` is sequence b's next token.
    /// Returns logits [B, V].
    pub fn step(&mut self, ids: &[u32], state: &mut State<B>) -> Result<Vec<f32>> {
        self.step_layers(ids, state, LogitRows::All)
    }

    /// A recurrent step that returns only each sequence's `k` most likely tokens (id, logit), best
    /// first, through the fused LM head where the family has one (else the plain head and a
    /// selection): the same tokens and values as [`Model::step`] followed by a selection.
    pub fn step_top_k(&mut self, ids: &[u32], state: &mut State<B>, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        self.step_layers(ids, state, LogitRows::None)?;
        match self.net.head_top_k(&self.backend, ids.len(), k)? {
            Some(t) => Ok(t),
            None => {
                let v = self.vocab_size();
                let logits = self.net.head_logits(&self.backend, ids.len())?;
                Ok(logits.chunks(v).map(|r| crate::backend::top_k_of(r, k)).collect())
            }
        }
    }

    /// Whether greedy decoding can keep the chosen token on the device ([`Model::pipe_step`]).
    pub fn can_pipe_greedy(&self) -> bool {
        self.backend.device_greedy() && self.net.has_chosen_head()
    }

    /// Greedy decoding of one sequence (state batch 1) with the chosen token kept on the device: the
    /// step on `token`, or on the token the device chose last (None), then the LM head's top-1 kept
    /// there and its copy back started. Returns at once with a ticket for [`Model::pipe_token`], so
    /// the next step can be recorded before this one's token is read: the device never waits for the
    /// host between tokens. Needs [`Model::can_pipe_greedy`]. A caller that stops at a token it read
    /// (end of sequence, a stop string) has by then usually run the step on it too: the state has
    /// consumed that token.
    pub fn pipe_step(&mut self, token: Option<u32>, state: &mut State<B>) -> Result<u64> {
        if !self.can_pipe_greedy() {
            return Err(Error::Device(format!("greedy decoding on the device needs a backend and model family that keep the chosen token there ({})", self.backend.name())));
        }
        if state.batch != 1 {
            return Err(Error::State(format!("pipelined greedy decoding runs one sequence; this state holds {}", state.batch)));
        }
        if let Some(t) = token {
            self.check_ids(&[t])?;
        }
        self.step_layers_of(&[token.unwrap_or(crate::backend::CHOSEN_ID)], state, LogitRows::Chosen)?;
        self.net.head_top1_chosen(&self.backend, 1)
    }

    /// The token of a [`Model::pipe_step`] ticket (waits for that step's selection only).
    pub fn pipe_token(&mut self, ticket: u64) -> Result<u32> {
        let ids = self.backend.chosen_ids(ticket)?;
        ids.first().copied().ok_or_else(|| Error::Device("the device returned no chosen token".into()))
    }

    fn step_layers(&mut self, ids: &[u32], state: &mut State<B>, logits: LogitRows) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.step_layers_of(ids, state, logits)
    }

    /// [`Model::step_layers`] with the ids checked by the caller ([`crate::backend::CHOSEN_ID`] allowed).
    fn step_layers_of(&mut self, ids: &[u32], state: &mut State<B>, logits: LogitRows) -> Result<Vec<f32>> {
        if ids.len() != state.batch {
            return Err(Error::Input(format!("step got {} tokens for a batch of {}", ids.len(), state.batch)));
        }
        // The backend may record this step's device work and replay it on later steps (CUDA graphs);
        // when it could not run the step as recorded, it left everything untouched and asks for the
        // step again (a backend settles within three attempts: replay, record, eager).
        let mut attempt = 0;
        let l = loop {
            self.backend.step_begin()?;
            let r = self.net.forward(&self.backend, ids, Rows::Step, &mut state.layers, logits);
            if !self.backend.step_end()? {
                break r?;
            }
            attempt += 1;
            if attempt == 3 {
                return Err(Error::Device("the backend did not run the decode step in three attempts".into()));
            }
        };
        state.position += 1;
        Ok(l)
    }

    pub fn weight_bytes_per_token(&self) -> usize {
        self.net.weight_bytes_per_token(&self.backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MlstmKernel;

    const SEQ: Rows = Rows::Sequence(MlstmKernel::Sequence);

    /// Steps and prompts get buffers of their own; a long prompt's are dropped after it, a step's
    /// stay where they are (the same allocation, so a recorded step still fits).
    #[test]
    fn activation_cache_keeps_step_buffers_apart() {
        let mut made = Vec::new();
        let mut c: ActivationCache<Vec<u8>> = ActivationCache::new();
        let mut make = |n: usize| -> Result<Vec<u8>> {
            made.push(n);
            Ok(vec![0u8; n])
        };
        let step_ptr = c.get(Rows::Step, 1, &mut make).unwrap().as_ptr();
        assert_eq!(c.get(SEQ, 1000, &mut make).unwrap().len(), 1000);
        assert_eq!(c.last().len(), 1000, "the last forward was the prompt");
        assert!(c.get(SEQ, 300, &mut make).is_ok(), "fewer rows reuse the prompt buffers");
        assert_eq!(c.get(Rows::Step, 1, &mut make).unwrap().as_ptr(), step_ptr, "the step buffers did not move");
        assert_eq!(c.last().len(), 1);
        assert!(!c.release_sequence(1000), "prompts up to keep_rows keep theirs");
        assert!(c.release_sequence(256), "a longer prompt's buffers go");
        assert!(!c.release_sequence(256), "nothing left to free");
        assert_eq!(c.get(Rows::Step, 1, &mut make).unwrap().as_ptr(), step_ptr);
        c.get(SEQ, 10, &mut make).unwrap();
        assert_eq!(made, [1, 1000, 10], "made once per size that did not fit");
    }
}
