//! Where the model's time goes: wall time per part of the decoder, summed over calls, while
//! switched on (`generate --profile`). Off, a part costs one relaxed atomic load.
//!
//! candle's CPU ops finish before they return, so the wall time around a call is that call's
//! time, threads and all.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A part of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The FFNs (`GluFeedForward`).
    Ffn,
    /// Attention's q, k, v and o projections.
    AttnProj,
    /// Attention between the projections: RoPE, the KV cache, scores, softmax, the weighted sum.
    AttnCore,
    /// The output head.
    Head,
}

impl Part {
    /// Every part, in the order [`Split`] prints them.
    pub const ALL: [Part; 4] = [Part::Ffn, Part::AttnProj, Part::AttnCore, Part::Head];

    fn name(self) -> &'static str {
        match self {
            Part::Ffn => "FFN",
            Part::AttnProj => "attention projections",
            Part::AttnCore => "attention core",
            Part::Head => "output head",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);

thread_local! {
    static TOTALS: Cell<[Duration; 4]> = const { Cell::new([Duration::ZERO; 4]) };
}

/// Switches the timing on or off (for every thread).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Runs `f`, adding its wall time to `part`'s total on this thread while timing is on.
pub fn time<T>(part: Part, f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let spent = start.elapsed();
    TOTALS.with(|t| {
        let mut totals = t.get();
        totals[part as usize] += spent;
        t.set(totals);
    });
    out
}

/// The time of `tokens` tokens (or decode steps), split by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    parts: [Duration; 4],
    total: Duration,
    tokens: usize,
}

impl Split {
    /// The parts' totals on this thread since the last call (which it zeroes), over `total` wall
    /// time for `tokens` tokens: what the parts do not account for is "the rest".
    pub fn take(total: Duration, tokens: usize) -> Self {
        let parts = TOTALS.with(|t| t.replace([Duration::ZERO; 4]));
        Self {
            parts,
            total,
            tokens,
        }
    }

    /// The rest: embedding, norms, residual additions, the mask, between-op overheads.
    pub fn rest(&self) -> Duration {
        self.total.saturating_sub(self.parts.iter().sum())
    }

    /// Per-token milliseconds of each part, the rest, and the total, with their names.
    pub fn rows(&self) -> Vec<(&'static str, f64)> {
        let per = |d: Duration| d.as_secs_f64() * 1e3 / self.tokens.max(1) as f64;
        let mut rows: Vec<_> = Part::ALL
            .iter()
            .map(|&p| (p.name(), per(self.parts[p as usize])))
            .collect();
        rows.push(("the rest", per(self.rest())));
        rows.push(("total", per(self.total)));
        rows
    }
}

impl fmt::Display for Split {
    /// One line per part: milliseconds per token and share of the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self.rows();
        let total = rows.last().map_or(0.0, |r| r.1).max(1e-12);
        for (name, ms) in rows {
            writeln!(
                f,
                "  {name:<22} {ms:8.3} ms/token {:5.1}%",
                100.0 * ms / total
            )?;
        }
        Ok(())
    }
}
