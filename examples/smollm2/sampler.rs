//! Picking the next token: greedy, or temperature with top-p (nucleus) sampling from a seeded
//! generator, so that a seed gives the same text on every platform.

#[path = "../common/rng.rs"]
mod rng;
pub use rng::Rng;

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

/// The nucleus of `softmax(logits / temperature)`: the most likely tokens, most likely first,
/// until their probability reaches `top_p` (at least one), renormalised to sum to 1.
pub fn top_p_distribution(logits: &[f32], temperature: f64, top_p: f64) -> Vec<(u32, f64)> {
    if logits.is_empty() {
        return Vec::new();
    }
    let max = f64::from(logits[argmax(logits) as usize]);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((f64::from(l) - max) / temperature).exp()))
        .filter(|(_, p)| *p > 0.)
        .collect();
    let total: f64 = probs.iter().map(|(_, p)| p).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.;
    for (_, p) in &probs {
        kept += 1;
        mass += p / total;
        if mass >= top_p {
            break;
        }
    }
    probs.truncate(kept.max(1));
    let kept_total: f64 = probs.iter().map(|(_, p)| p).sum();
    probs.iter_mut().for_each(|(_, p)| *p /= kept_total);
    probs
}

/// How to choose each next token.
#[derive(Debug, Clone)]
pub enum Sampler {
    /// Always the most likely token.
    Greedy,
    /// Sample from the top-p nucleus of the tempered distribution.
    TopP {
        /// Divides the logits: below 1 sharpens, above 1 flattens.
        temperature: f64,
        /// The probability mass kept, in `(0, 1]`.
        top_p: f64,
        /// The seeded generator.
        rng: Rng,
    },
}

impl Sampler {
    /// Greedy without a temperature (or with temperature 0), else top-p sampling.
    ///
    /// # Errors
    /// A negative or non-finite temperature, or `top_p` outside `(0, 1]`.
    pub fn new(temperature: Option<f64>, top_p: f64, seed: u64) -> Result<Self, String> {
        if !(top_p > 0. && top_p <= 1.) {
            return Err(format!("--top-p must be in (0, 1], found {top_p}"));
        }
        match temperature {
            None => Ok(Self::Greedy),
            Some(t) if !t.is_finite() || t < 0. => Err(format!(
                "--temperature must be a finite number >= 0, found {t}"
            )),
            Some(0.) => Ok(Self::Greedy),
            Some(temperature) => Ok(Self::TopP {
                temperature,
                top_p,
                rng: Rng::new(seed),
            }),
        }
    }

    /// The next token, given the logits over the vocabulary.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self {
            Self::Greedy => argmax(logits),
            Self::TopP {
                temperature,
                top_p,
                rng,
            } => {
                let dist = top_p_distribution(logits, *temperature, *top_p);
                let mut u = rng.next_f64();
                for &(id, p) in &dist {
                    if u < p {
                        return id;
                    }
                    u -= p;
                }
                // Rounding left `u` a hair above the total: the last kept token.
                dist.last().map_or_else(|| argmax(logits), |&(id, _)| id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn nucleus() {
        let logits = [1f32.ln(), 2f32.ln(), 5f32.ln()]; // p = 1/8, 2/8, 5/8
        let ids = |d: Vec<(u32, f64)>| d.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(top_p_distribution(&logits, 1., 0.5)), [2]);
        assert_eq!(ids(top_p_distribution(&logits, 1., 0.625)), [2]);
        let d = top_p_distribution(&logits, 1., 0.8);
        assert_eq!(ids(d.clone()), [2, 1]);
        assert!((d[0].1 - 5. / 7.).abs() < 1e-6 && (d[1].1 - 2. / 7.).abs() < 1e-6);
        let d = top_p_distribution(&logits, 2., 1.0); // p ∝ √1, √2, √5
        let z = 1. + 2f64.sqrt() + 5f64.sqrt();
        assert!((d[0].1 - 5f64.sqrt() / z).abs() < 1e-6, "{d:?}");
        assert_eq!(ids(d), [2, 1, 0]);
        assert!(top_p_distribution(&[], 1., 1.).is_empty());
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [1f32.ln(), 3f32.ln()]; // p = 1/4, 3/4
        let mut s = Sampler::new(Some(1.), 1., 7).unwrap();
        let ones = (0..20_000).filter(|_| s.sample(&logits) == 1).count();
        assert!((ones as f64 / 20_000. - 0.75).abs() < 0.015, "{ones}");
        let draw = |seed| {
            let mut s = Sampler::new(Some(1.), 1., seed).unwrap();
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn sampler_settings() {
        assert!(matches!(Sampler::new(None, 0.9, 0), Ok(Sampler::Greedy)));
        assert!(matches!(
            Sampler::new(Some(0.), 0.9, 0),
            Ok(Sampler::Greedy)
        ));
        assert!(Sampler::new(Some(-1.), 0.9, 0).is_err());
        assert!(Sampler::new(Some(f64::NAN), 0.9, 0).is_err());
        assert!(Sampler::new(Some(1.), 0., 0).is_err());
        assert!(Sampler::new(Some(1.), 1.5, 0).is_err());
        assert!(Sampler::new(None, f64::NAN, 0).is_err());
    }
}
