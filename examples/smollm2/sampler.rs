//! Picking the next token: greedy, or candle-transformers' `LogitsProcessor` (temperature,
//! top-k, top-p) from a seed.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

// The examples' SplitMix64 (the infer example's seeded input), checked here.
#[cfg(test)]
#[path = "../common/rng.rs"]
mod rng;

/// The index of the largest value, the first on ties (NumPy's `argmax`); NaNs never win.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// How to choose each next token: greedy, or candle-transformers' `LogitsProcessor`
/// (temperature with top-k and/or top-p) from a seed.
///
/// Greedy is [`argmax`] rather than `LogitsProcessor`'s `ArgMax` (candle's tensor argmax): both
/// take the first of equal logits, but this one never picks a NaN, and it is the argmax the
/// end-to-end tests check `generate`'s tokens with against float64 and llama.cpp.
pub enum Sampler {
    /// Always the most likely token.
    Greedy,
    /// Sampled by candle-transformers' processor, from the `top_k` most likely tokens first
    /// where top-k is asked for (their logits kept with those tied with the k-th, the others
    /// −∞): with top-p, the nucleus is then taken of the k tokens' renormalised probabilities, as transformers' warpers and
    /// llama.cpp's samplers take it (candle's `TopKThenTopP` compares p with the k tokens'
    /// share of the whole distribution instead).
    Sample {
        processor: Box<LogitsProcessor>,
        top_k: Option<usize>,
    },
}

impl Sampler {
    /// Greedy without a temperature (or with one below 1e-7); else sampling at `temperature`
    /// from the `top_k` most likely tokens and/or the `top_p` nucleus (top-p 0.9 when neither
    /// is given).
    ///
    /// # Errors
    /// A negative or non-finite temperature, `top_k` of 0, or `top_p` outside `(0, 1]`.
    pub fn new(
        temperature: Option<f64>,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    ) -> Result<Self, String> {
        if let Some(p) = top_p.filter(|p| !(*p > 0. && *p <= 1.)) {
            return Err(format!("--top-p must be in (0, 1], found {p}"));
        }
        if top_k == Some(0) {
            return Err("--top-k must be at least 1".into());
        }
        let temperature = match temperature {
            None => return Ok(Self::Greedy),
            Some(t) if !t.is_finite() || t < 0. => {
                return Err(format!(
                    "--temperature must be a finite number >= 0, found {t}"
                ))
            }
            // Below 1e-7 the scaled logits overflow to ±inf, and softmax of those is NaN; the
            // limit is all but greedy, as candle's `LogitsProcessor::new` takes it.
            Some(t) if t < 1e-7 => return Ok(Self::Greedy),
            Some(t) => t,
        };
        let (sampling, top_k) = match (top_k, top_p) {
            (None, None) => (
                Sampling::TopP {
                    p: 0.9,
                    temperature,
                },
                None,
            ),
            // Top-k as a mask (ties with the k-th kept, as transformers keeps them), then the
            // whole of what is left.
            (Some(k), None) => (Sampling::All { temperature }, Some(k)),
            (k, Some(p)) => (Sampling::TopP { p, temperature }, k),
        };
        Ok(Self::Sample {
            processor: Box::new(LogitsProcessor::from_sampling(seed, sampling)),
            top_k,
        })
    }

    /// The next token, given the logits over the vocabulary (`[vocab]`, f32).
    ///
    /// # Errors
    /// Logits with a NaN, or all −inf: no token can be chosen from them (greedy took token 0 or
    /// the last, and sampling failed with "a weight is invalid in distribution").
    pub fn sample(&mut self, logits: &Tensor) -> candle_core::Result<u32> {
        let values = logits.to_vec1::<f32>()?;
        if values.iter().any(|v| v.is_nan()) {
            candle_core::bail!("the model's logits are NaN")
        }
        if values.iter().all(|&v| v == f32::NEG_INFINITY) {
            candle_core::bail!("every logit is −inf")
        }
        match self {
            Self::Greedy => Ok(argmax(&values)),
            Self::Sample {
                processor,
                top_k: None,
            } => processor.sample(logits),
            Self::Sample {
                processor,
                top_k: Some(k),
            } => {
                let mut values = values;
                // The k-th largest logit (a selection, not a sort of the vocabulary every
                // token); ties with it are kept, as transformers keeps them.
                if *k <= values.len() {
                    let mut rest = values.clone();
                    let (_, &mut kth, _) =
                        rest.select_nth_unstable_by(*k - 1, |a, b| b.total_cmp(a));
                    for v in values.iter_mut().filter(|v| **v < kth) {
                        *v = f32::NEG_INFINITY;
                    }
                }
                processor.sample(&Tensor::new(values, logits.device())?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rng::Rng;
    use super::*;
    use candle_core::Device;

    #[test]
    fn splitmix64_reference_values() {
        // The first outputs for seed 0 (Vigna's splitmix64.c).
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
        let mut rng = Rng::new(42);
        assert!((0..1000)
            .map(|_| rng.next_f64())
            .all(|u| (0. ..1.).contains(&u)));
    }

    #[test]
    fn argmax_takes_the_first_of_ties_and_skips_nans() {
        assert_eq!(argmax(&[1., 3., 3., 2.]), 1);
        assert_eq!(argmax(&[f32::NAN, -1., 5., f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    fn logits(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let l = logits(&[1f32.ln(), 3f32.ln()]); // p = 1/4, 3/4
        let mut s = Sampler::new(Some(1.), None, Some(1.), 7).unwrap();
        let ones = (0..20_000).filter(|_| s.sample(&l).unwrap() == 1).count();
        assert!((ones as f64 / 20_000. - 0.75).abs() < 0.015, "{ones}");
        // Top-k 1 and a small nucleus keep the most likely token only.
        for (k, p) in [(Some(1), None), (None, Some(0.5))] {
            let mut s = Sampler::new(Some(1.), k, p, 7).unwrap();
            assert!((0..200).all(|_| s.sample(&l).unwrap() == 1));
        }
        // Top-k keeps the ties with the k-th: of two equal best logits, top-1 draws both.
        let tied = logits(&[1., 1., 0.]);
        let mut s = Sampler::new(Some(1.), Some(1), None, 7).unwrap();
        let draws: Vec<u32> = (0..2_000).map(|_| s.sample(&tied).unwrap()).collect();
        let ones = draws.iter().filter(|&&t| t == 1).count();
        assert!(
            draws.iter().all(|&t| t < 2) && (800..1200).contains(&ones),
            "{ones}"
        );
        // Top-k then top-p renormalises the k tokens before the nucleus: of p = 0.5, 0.3, 0.2,
        // the top 2 have 0.625 and 0.375, and a nucleus of 0.6 holds the first alone
        // (candle's TopKThenTopP kept both, and drew the second 37.5% of the time).
        let l3 = logits(&[0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()]);
        let mut s = Sampler::new(Some(1.), Some(2), Some(0.6), 7).unwrap();
        assert!((0..500).all(|_| s.sample(&l3).unwrap() == 0));
        // A wider nucleus keeps both, in their renormalised shares, and never the third.
        let mut s = Sampler::new(Some(1.), Some(2), Some(0.95), 7).unwrap();
        let draws: Vec<u32> = (0..20_000).map(|_| s.sample(&l3).unwrap()).collect();
        let share = draws.iter().filter(|&&t| t == 1).count() as f64 / 20_000.;
        assert!(
            draws.iter().all(|&t| t < 2) && (share - 0.375).abs() < 0.015,
            "{share}"
        );
        let draw = |seed| {
            let mut s = Sampler::new(Some(1.), None, Some(1.), seed).unwrap();
            (0..64).map(|_| s.sample(&l).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn logits_without_a_choice_are_errors() {
        for sampler in [
            Sampler::new(None, None, None, 0).unwrap(),
            Sampler::new(Some(1.), Some(2), None, 0).unwrap(),
        ] {
            let mut sampler = sampler;
            let nan = logits(&[1., f32::NAN, 0.]);
            let e = sampler.sample(&nan).unwrap_err().to_string();
            assert!(e.contains("logits are NaN"), "{e}");
            let none = logits(&[f32::NEG_INFINITY; 3]);
            let e = sampler.sample(&none).unwrap_err().to_string();
            assert!(e.contains("every logit is −inf"), "{e}");
        }
    }

    #[test]
    fn sampler_settings() {
        let greedy = |t| matches!(Sampler::new(t, None, None, 0), Ok(Sampler::Greedy));
        assert!(greedy(None) && greedy(Some(0.)));
        assert!(Sampler::new(Some(-1.), None, None, 0).is_err());
        assert!(Sampler::new(Some(f64::NAN), None, None, 0).is_err());
        assert!(Sampler::new(Some(1.), None, Some(0.), 0).is_err());
        assert!(Sampler::new(Some(1.), None, Some(1.5), 0).is_err());
        assert!(Sampler::new(None, None, Some(f64::NAN), 0).is_err());
        assert!(Sampler::new(Some(1.), Some(0), None, 0).is_err());
        // Greedy takes the first of ties, as the end-to-end tests' argmax does.
        let mut g = Sampler::new(None, None, None, 0).unwrap();
        assert_eq!(g.sample(&logits(&[1., 3., 3., 2.])).unwrap(), 1);
    }
}
