//! `--plot`: the held-out loss against the training step, one line per variant (the mean over
//! its seeds, their range shaded), the plain FFNs dashed, from a quarter of the run on (before
//! that every curve falls steeply from ln 256 and the variants' differences would not show).
//! Drawn with `plotters` and a font embedded in the binary (Ubuntu Light, from
//! `epaint_default_fonts`), so nothing on the system is needed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::model::Variant;
use crate::train::RunResult;

/// The file must end in `.png`, not be a folder, and its folder be writable: checked (by
/// writing and removing the temporary file) before hours of training.
pub fn check_path(path: &Path) -> Result<()> {
    if path
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!("--plot {} must name a .png file", path.display());
    }
    if path.is_dir() {
        bail!("--plot {} is a folder", path.display());
    }
    let dir = parent(path);
    if !dir.is_dir() {
        bail!("--plot {}: no folder {}", path.display(), dir.display());
    }
    let tmp = temporary(path);
    std::fs::write(&tmp, b"").with_context(|| {
        format!(
            "--plot {}: cannot write in {}",
            path.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// `.<name>.<pid>.partial.png` beside the target (the encoder goes by the extension).
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(path).join(format!(".{name}.{}.partial.png", std::process::id()))
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// One line per variant, in the order given.
const COLORS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(44, 160, 44),
    RGBColor(31, 119, 180),
    RGBColor(148, 103, 189),
];

/// Writes the plot to `path`, through a temporary file in the same folder: a failed write
/// leaves nothing behind.
pub fn write(path: &Path, variants: &[Variant], results: &[RunResult]) -> Result<()> {
    let tmp = temporary(path);
    let drawn = draw(&tmp, variants, results);
    let moved = drawn.and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    });
    if moved.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    moved
}

/// One point of a variant's curve: the step, and the held-out loss's mean, minimum and maximum
/// over the seeds.
#[derive(Debug, Clone, Copy)]
struct Point {
    step: f64,
    mean: f64,
    lo: f64,
    hi: f64,
}

/// A variant's curve over its seeds.
fn band(runs: &[&RunResult]) -> Vec<Point> {
    let points = runs.iter().map(|r| r.curve.len()).min().unwrap_or(0);
    (0..points)
        .map(|k| {
            let losses: Vec<f64> = runs.iter().map(|r| r.curve[k].1).collect();
            let mean = losses.iter().sum::<f64>() / losses.len() as f64;
            let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Point {
                step: runs[0].curve[k].0 as f64,
                mean,
                lo,
                hi,
            }
        })
        .collect()
}

fn draw(path: &Path, variants: &[Variant], results: &[RunResult]) -> Result<()> {
    let plot_err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    )
    .map_err(|_| anyhow!("the embedded font did not load"))?;
    let bands: Vec<(Variant, Vec<Point>)> = variants
        .iter()
        .map(|&v| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| r.variant == v.name()).collect();
            (v, band(&runs))
        })
        .filter(|(_, b)| !b.is_empty())
        .collect();
    let last_step = bands
        .iter()
        .flat_map(|(_, b)| b.last().map(|p| p.step))
        .fold(1.0, f64::max);
    // The early steps fall steeply from ln 256; the variants part in the last three quarters.
    let shown = |p: &&Point| p.step >= 0.25 * last_step;
    let lo = bands
        .iter()
        .flat_map(|(_, b)| b.iter().filter(shown).map(|p| p.lo))
        .fold(f64::INFINITY, f64::min);
    let hi = bands
        .iter()
        .flat_map(|(_, b)| b.iter().filter(shown).map(|p| p.hi))
        .fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        bail!("nothing to plot: no held-out points");
    }
    let margin = 0.05 * (hi - lo).max(1e-3);
    // plotters would loop for ever over an infinite axis.
    if ![hi - lo, lo - margin, hi + margin]
        .iter()
        .all(|v| v.is_finite())
    {
        bail!("the held-out losses ({lo} to {hi}) span no axis that can be drawn");
    }
    let first_step = 0.25 * last_step;

    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Held-out loss by feed-forward variant (mean over seeds, range shaded)",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(first_step..last_step, (lo - margin)..(hi + margin))
        .map_err(|e| plot_err(&e))?;
    chart
        .configure_mesh()
        .x_desc("training step")
        .x_label_formatter(&|step| format!("{step:.0}"))
        .y_desc("held-out loss (nats per byte)")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| plot_err(&e))?;
    for (k, (variant, band)) in bands.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<&Point> = band.iter().filter(shown).collect();
        let area: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.step, p.hi))
            .chain(points.iter().rev().map(|p| (p.step, p.lo)))
            .collect();
        chart
            .draw_series(std::iter::once(Polygon::new(
                area,
                color.mix(0.15).filled(),
            )))
            .map_err(|e| plot_err(&e))?;
        let line: Vec<(f64, f64)> = points.iter().map(|p| (p.step, p.mean)).collect();
        let style = color.stroke_width(2);
        let gated = variant.is_gated();
        let series = if gated {
            chart.draw_series(LineSeries::new(line, style))
        } else {
            chart.draw_series(DashedLineSeries::new(line, 10, 6, style))
        };
        // The legend's sample: two segments, touching for a solid line, apart for a dashed one.
        let gap = if gated { 0 } else { 6 };
        series
            .map_err(|e| plot_err(&e))?
            .label(variant.paper_name())
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (9, 0)], style)
                    + PathElement::new(vec![(9 + gap, 0), (24, 0)], style)
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}
