//! Text generation: prefill the prompt with the chunkwise kernel, then decode one token at a time with
//! the recurrent step, sampling each token, streaming text as it forms, stopping on EOS, on a stop
//! string or at the token budget.
use std::time::Instant;

use serde::Serialize;

use crate::backend::{Backend, MlstmKernel};
use crate::error::{Error, Result};
use crate::model::{LogitRows, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::state::State;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    /// Stop when the model emits its EOS token.
    pub stop_on_eos: bool,
    /// Prompt kernel (chunkwise with the model's chunk size by default).
    pub prefill_kernel: Option<MlstmKernel>,
    /// Refuse prompts longer than this many tokens (None: no limit; xLSTM state is fixed-size).
    pub max_prompt_tokens: Option<usize>,
    /// `--stats-log`: a CSV row per prefill segment and per generated token.
    pub stats_log: Option<std::path::PathBuf>,
    /// Live statistics for `xlstm top`.
    pub live: Option<crate::live::Live>,
    /// Decode through the fused LM head (matrix product + soft-cap + top-k selection) when the
    /// sampling settings allow it (`XLSTM_FAST_HEAD`).
    pub fast_head: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            stop_strings: Vec::new(),
            stop_on_eos: true,
            prefill_kernel: None,
            max_prompt_tokens: None,
            stats_log: None,
            live: None,
            fast_head: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    Eos,
    StopString,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token_ms: f64,
    pub prefill_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_ms: f64,
    pub decode_tok_s: f64,
    pub peak_rss_mb: f64,
    /// The sequence's recurrent state (every layer's; fixed whatever the length), MB, and the
    /// element type of its mLSTM C matrices.
    pub state_mb: f64,
    pub state_dtype: &'static str,
    pub stop_reason: StopReason,
    /// What the memory watchdog did (chunk shrinks), if anything.
    pub memory_events: Vec<String>,
}

impl GenerationStats {
    pub fn line(&self) -> String {
        format!(
            "prompt {} tok | generated {} tok | ttft {:.1} ms | prefill {:.1} tok/s | decode {:.1} tok/s | peak mem {:.0} MB | state {:.1} MB ({}) | stop: {:?}",
            self.prompt_tokens,
            self.generated_tokens,
            self.time_to_first_token_ms,
            self.prefill_tok_s,
            self.decode_tok_s,
            self.peak_rss_mb,
            self.state_mb,
            self.state_dtype,
            self.stop_reason
        )
    }
}

pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub stats: GenerationStats,
}

/// The prompt's ids with BOS inserted where the model asks for it (`force_bos_token_insert`).
pub fn prompt_ids<B: Backend>(model: &Model<B>, tok: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        return Err(Error::Input("the prompt is empty: give some text with --prompt".into()));
    }
    if let Some(bos) = model.config.bos_token_id() {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// Generates from `prompt`, calling `on_text` with each piece of text as soon as it is complete.
pub fn generate<B: Backend>(
    model: &mut Model<B>,
    tok: &Tokenizer,
    prompt: &str,
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let ids = prompt_ids(model, tok, prompt)?;
    if let Some(limit) = params.max_prompt_tokens {
        if ids.len() > limit {
            return Err(Error::Input(format!(
                "the prompt is {} tokens, longer than the allowed {limit}: shorten it or raise --max-prompt-tokens",
                ids.len()
            )));
        }
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let kernel = params.prefill_kernel.unwrap_or(MlstmKernel::Chunkwise { chunk: model.chunk_size });
    let eos = if params.stop_on_eos { model.config.eos_token_id() } else { None };

    let mut log = params.stats_log.as_deref().map(crate::live::StatsLog::create).transpose()?;
    let live = params.live.clone().unwrap_or_default();
    live.update(|s| {
        s.phase = "prefill".into();
        s.prompt_tokens = ids.len();
    });
    model.segments.clear();
    model.events.clear();

    let t0 = Instant::now();
    let mut state: State<B> = model.new_state(1)?;
    let mut logits = model.prefill(&ids, &mut state, kernel, LogitRows::Last)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let last_chunk = model.segments.last().map_or(0, |s| s.chunk);
    for seg in model.segments.drain(..) {
        if let Some(l) = log.as_mut() {
            l.row("prefill", seg.tokens, seg.seconds, seg.chunk);
        }
    }
    live.update(|s| {
        s.prefill_tok_s = ids.len() as f64 / prefill_s.max(1e-9);
        s.chunk = last_chunk;
    });

    let mut history = ids.clone();
    let mut out_ids = Vec::new();
    let mut text = String::new();
    let mut emitted = 0usize; // bytes of `text` handed to on_text
    let mut decoder = StreamDecoder::default();
    let mut ttft = None;
    let mut reason = StopReason::MaxTokens;
    let t_decode = Instant::now();
    let mut decode_steps = 0usize;
    let fast_k = if params.fast_head { sampler.candidates_needed() } else { None };
    // Greedy on a backend that keeps the chosen token on the device: each step is recorded before
    // the previous token is read back (`ticket`: the step whose token comes next; `ahead`: the one
    // after it, already under way). Output is the same; a stop leaves one step run past it.
    let pipe = fast_k == Some(1) && model.can_pipe_greedy();
    let (mut ticket, mut ahead): (Option<u64>, Option<u64>) = (None, None);
    let mut last_token_at = Instant::now();
    let mut cands: Option<Vec<(u32, f32)>> = None;
    while out_ids.len() < params.max_new_tokens {
        let next = match (ticket.take(), cands.take()) {
            (Some(t), _) => {
                if out_ids.len() + 2 <= params.max_new_tokens {
                    ahead = Some(model.pipe_step(None, &mut state)?);
                }
                model.pipe_token(t)?
            }
            (None, Some(c)) => sampler.sample_candidates(&c),
            (None, None) => sampler.sample(&mut logits, &history),
        };
        ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if Some(next) == eos {
            reason = StopReason::Eos;
            break;
        }
        out_ids.push(next);
        history.push(next);
        if let Some(piece) = decoder.push(tok, next)? {
            text.push_str(&piece);
            if let Some(cut) = stop_position(&text, &params.stop_strings) {
                text.truncate(cut);
                on_text(&text[emitted..]);
                emitted = text.len();
                reason = StopReason::StopString;
                break;
            }
            // Hold back a tail that may be the start of a stop string.
            let safe = text.len() - held_back(&text, &params.stop_strings);
            if safe > emitted {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
        }
        if out_ids.len() == params.max_new_tokens {
            break;
        }
        model.ease_memory(None)?;
        let t_step = Instant::now();
        let dt = if pipe {
            ticket = Some(match ahead.take() {
                Some(a) => a,
                None => model.pipe_step(Some(next), &mut state)?,
            });
            // a pipelined step's time is the interval between tokens
            let now = Instant::now();
            std::mem::replace(&mut last_token_at, now).elapsed().as_secs_f64()
        } else {
            match fast_k {
                Some(k) => cands = model.step_top_k(&[next], &mut state, k)?.pop(),
                None => logits = model.step(&[next], &mut state)?,
            }
            t_step.elapsed().as_secs_f64()
        };
        decode_steps += 1;
        live.token(dt);
        if let Some(w) = &model.watchdog {
            let level = w.level();
            live.update(|s| s.watchdog = format!("{level:?}").to_lowercase());
        }
        if let Some(l) = log.as_mut() {
            l.row("decode", 1, dt, 0);
        }
    }
    // A step run past the stop: collect its token (unused) so its read-back is released.
    if let Some(a) = ahead.take() {
        model.pipe_token(a)?;
    }
    live.update(|s| s.phase = "done".into());
    if let Some(l) = log.as_mut() {
        l.flush();
    }
    if reason != StopReason::StopString {
        if let Some(rest) = decoder.flush(tok)? {
            text.push_str(&rest);
        }
        if text.len() > emitted {
            on_text(&text[emitted..]);
        }
    }
    let decode_s = t_decode.elapsed().as_secs_f64();
    let stats = GenerationStats {
        prompt_tokens: ids.len(),
        generated_tokens: out_ids.len(),
        time_to_first_token_ms: ttft.unwrap_or(prefill_s) * 1e3,
        prefill_ms: prefill_s * 1e3,
        prefill_tok_s: ids.len() as f64 / prefill_s.max(1e-9),
        decode_ms: decode_s * 1e3,
        decode_tok_s: if decode_steps > 0 { decode_steps as f64 / decode_s.max(1e-9) } else { 0.0 },
        peak_rss_mb: crate::sys::peak_rss_bytes() as f64 / 1e6,
        state_mb: state.bytes() as f64 / 1e6,
        state_dtype: model.state_dtype().name(),
        stop_reason: reason,
        memory_events: std::mem::take(&mut model.events),
    };
    Ok(Generation { text, tokens: out_ids, stats })
}

/// Byte offset where the first stop string begins in `text`.
fn stop_position(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest tail of `text` that is a proper prefix of a stop string (not yet safe to emit).
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_at_the_earliest() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(stop_position("abc END x\n\n", &stops), Some(4));
        assert_eq!(stop_position("abc", &stops), None);
        assert_eq!(held_back("abc E", &stops), 1);
        assert_eq!(held_back("abc EN", &stops), 2);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
    }
}
