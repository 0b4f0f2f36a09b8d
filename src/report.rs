//! Latency reports: the table on stderr, the JSON file, the SVG percentile plot, and
//! `lipsync report FILE.json` to re-render a saved one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use lipsync_pipelines::metrics::{Percentiles, RunReport};

/// Arguments of `lipsync report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A report written by `--report`.
    pub report: PathBuf,
    /// Also draw the percentile plot here (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub svg: Option<PathBuf>,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.report).with_context(|| format!("reading {}", args.report.display()))?;
    let report: RunReport =
        serde_json::from_str(&text).with_context(|| format!("{} is not a lipsync report", args.report.display()))?;
    print!("{}", report.table());
    if let Some(svg) = &args.svg {
        write_svg(&report, svg)?;
        println!("wrote {}", svg.display());
    }
    Ok(())
}

/// Writes the report as JSON (temporary file, then rename).
pub fn write_json(r: &RunReport, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(r)?;
    lipsync_stages::io::avatar::write_atomic(path, format!("{text}\n").as_bytes())?;
    Ok(())
}

fn points(p: &Percentiles) -> Vec<(f64, f64)> {
    // x = number of nines: p50 -> 0.3, p90 -> 1, p99 -> 2, p99.9 -> 3, max -> 4
    vec![(0.301, p.p50), (1.0, p.p90), (2.0, p.p99), (3.0, p.p999), (4.0, p.max)]
}

/// Draws the service-time percentiles of every stage and the end-to-end latency (SVG).
pub fn write_svg(r: &RunReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut series: Vec<(String, Vec<(f64, f64)>)> =
        r.stages.iter().filter(|s| s.service_ms.count > 0).map(|s| (s.name.clone(), points(&s.service_ms))).collect();
    series.push(("end to end".into(), points(&r.end_to_end_ms)));
    let ymax = series.iter().flat_map(|(_, p)| p.iter().map(|v| v.1)).fold(0.0f64, f64::max).max(0.001);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = format!("lipsync {}: {} frames, {:.2} frames/s", r.kind, r.frames, r.frames_per_second);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0f64..4.2f64, (0.0005f64..ymax * 1.5).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms, log scale)")
            .x_label_formatter(&|x| match (x * 10.0).round() as i64 {
                3 => "p50".into(),
                10 => "p90".into(),
                20 => "p99".into(),
                30 => "p99.9".into(),
                40 => "max".into(),
                _ => String::new(),
            })
            .draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = if name == "end to end" { BLACK.stroke_width(3) } else { color.stroke_width(2) };
            chart
                .draw_series(LineSeries::new(pts.iter().map(|(x, y)| (*x, y.max(0.0005))), style))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        root.present()?;
    }
    lipsync_stages::io::avatar::write_atomic(path, svg.as_bytes())?;
    Ok(())
}
