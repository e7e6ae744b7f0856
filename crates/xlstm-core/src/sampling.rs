//! Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), repetition
//! penalty, all reproducible from a seed.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// > 1 discourages tokens already seen (Hugging Face convention: divide positive logits, multiply negative ones).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Input(format!("temperature {} must be a finite number ≥ 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("top-p {} must be in (0, 1]", self.top_p)));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::Input(format!("repetition penalty {} must be > 0", self.repetition_penalty)));
        }
        Ok(())
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Picks a token; `logits` is scratch (penalised in place), `history` the tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, cut by top-k, softmax at the temperature, cut by top-p.
        let k = if p.top_k == 0 { logits.len() } else { p.top_k };
        let cands = crate::backend::top_k_of(logits, k);
        self.sample_sorted(&cands)
    }

    /// How many candidates [`Sampler::sample_candidates`] needs, when the k best tokens are enough to
    /// sample exactly as from the full logits (greedy, or top-k without a repetition penalty).
    pub fn candidates_needed(&self) -> Option<usize> {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            return None;
        }
        if p.temperature == 0.0 {
            return Some(1);
        }
        (p.top_k > 0).then_some(p.top_k)
    }

    /// Samples from the best candidates (id, logit), best first, as the fused LM head returns them;
    /// identical to [`Sampler::sample`] on the full logits when `candidates_needed` allowed it.
    pub fn sample_candidates(&mut self, cands: &[(u32, f32)]) -> u32 {
        if self.params.temperature == 0.0 {
            return cands[0].0;
        }
        self.sample_sorted(cands)
    }

    fn sample_sorted(&mut self, cands: &[(u32, f32)]) -> u32 {
        let t = self.params.temperature;
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands.iter().map(|&(_, l)| ((l - max) / t).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (j, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= self.params.top_p {
                    keep = j + 1;
                    break;
                }
            }
        }
        let mass: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * mass;
        for j in 0..keep {
            r -= probs[j];
            if r <= 0.0 {
                return cands[j].0;
            }
        }
        cands[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed }).unwrap()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = sampler(0.0, 0, 1.0, 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, -2.0, 2.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = sampler(5.0, 1, 1.0, 7);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.1, 3.0, -2.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn top_k_restricts_support() {
        let mut s = sampler(10.0, 2, 1.0, 3);
        for _ in 0..200 {
            let t = s.sample(&mut [0.1, 3.0, -2.0, 2.9], &[]);
            assert!(t == 1 || t == 3, "top-k 2 sampled {t}");
        }
    }

    #[test]
    fn top_p_restricts_support() {
        // probabilities ≈ [0.8756, 0.1185, 0.0059]: p = 0.5 keeps only the first.
        let mut s = sampler(1.0, 0, 0.5, 3);
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [5.0, 3.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut s = sampler(1.0, 0, 1.0, 42);
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&mut logits.clone(), &[]) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "sampled frequency {frac}");
        let a: Vec<u32> = { let mut s = sampler(1.0, 0, 1.0, 9); (0..50).map(|_| s.sample(&mut logits.clone(), &[])).collect() };
        let b: Vec<u32> = { let mut s = sampler(1.0, 0, 1.0, 9); (0..50).map(|_| s.sample(&mut logits.clone(), &[])).collect() };
        assert_eq!(a, b, "same seed, same tokens");
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() }).unwrap();
        // token 0 leads (4.0) but was seen: 4/2 = 2 < 3.
        assert_eq!(s.sample(&mut [4.0, 3.0, 1.0], &[0]), 1);
    }

    #[test]
    fn bad_params_are_errors() {
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
    }
}
