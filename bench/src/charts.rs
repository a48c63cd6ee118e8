//! SVG charts (plotters, SVG backend only: text is emitted as SVG `<text>`, so no fonts
//! or system libraries are needed).

use std::path::Path;

use plotters::prelude::*;

use crate::results::Record;

type ChartError = Box<dyn std::error::Error>;

fn provider_color(provider: &str) -> RGBColor {
    match provider {
        "hybrid" => RGBColor(0x1f, 0x77, 0xb4),
        "procedure" => RGBColor(0x2c, 0xa0, 0x2c),
        "incumbent" => RGBColor(0xd6, 0x27, 0x28),
        _ => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

fn providers_in(records: &[&Record]) -> Vec<String> {
    let order = ["hybrid", "procedure", "incumbent"];
    let mut ps: Vec<String> = records.iter().map(|r| r.provider.clone()).collect();
    ps.sort_by_key(|p| order.iter().position(|o| o == p).unwrap_or(order.len()));
    ps.dedup();
    ps
}

fn find<'a>(
    records: &[&'a Record],
    provider: &str,
    case: &str,
    rtt: u64,
    metric: &str,
) -> Option<&'a Record> {
    records
        .iter()
        .copied()
        .find(|r| r.provider == provider && r.case == case && r.rtt_ms == rtt && r.metric == metric)
}

/// Latency (p50 solid with min–max whiskers, p95 dashed) against simulated RTT, one
/// colour per provider.
pub fn latency_vs_rtt(
    records: &[Record],
    path: &Path,
    metric_prefix: &str,
    title: &str,
) -> Result<bool, ChartError> {
    let p50 = format!("{metric_prefix}_p50_ms");
    let p95 = format!("{metric_prefix}_p95_ms");
    let recs: Vec<&Record> = records
        .iter()
        .filter(|r| r.scenario == "latency" && (r.metric == p50 || r.metric == p95))
        .collect();
    if recs.is_empty() {
        return Ok(false);
    }
    let mut rtts: Vec<u64> = recs.iter().map(|r| r.rtt_ms).collect();
    rtts.sort_unstable();
    rtts.dedup();
    let case = recs[0].case.clone();
    let x_max = (*rtts.last().unwrap_or(&0) as f64 * 1.08).max(1.0);
    let y_max = recs.iter().map(|r| r.max).fold(0.0, f64::max) * 1.12;
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-x_max * 0.04..x_max, 0.0..y_max.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("simulated round-trip time to PostgreSQL (ms)")
        .y_desc("start → completed (ms)")
        .x_labels(12)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .max_light_lines(1)
        .light_line_style(RGBColor(245, 245, 245))
        .draw()?;
    for provider in providers_in(&recs) {
        let color = provider_color(&provider);
        let pts50: Vec<(f64, f64, f64, f64)> = rtts
            .iter()
            .filter_map(|&rtt| {
                find(&recs, &provider, &case, rtt, &p50)
                    .map(|r| (rtt as f64, r.median, r.min, r.max))
            })
            .collect();
        let pts95: Vec<(f64, f64)> = rtts
            .iter()
            .filter_map(|&rtt| {
                find(&recs, &provider, &case, rtt, &p95).map(|r| (rtt as f64, r.median))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts50.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))?
            .label(format!("{provider} p50"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            pts50
                .iter()
                .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
        )?;
        chart.draw_series(
            pts50
                .iter()
                .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, color.stroke_width(1), 8)),
        )?;
        chart
            .draw_series(DashedLineSeries::new(
                pts95.iter().copied(),
                6,
                4,
                color.stroke_width(1),
            ))?
            .label(format!("{provider} p95"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
        chart.draw_series(
            pts95
                .iter()
                .map(|p| TriangleMarker::new(*p, 4, color.stroke_width(1))),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(true)
}

/// What a grouped bar chart shows.
pub struct Bars<'a> {
    pub scenario: &'a str,
    pub metric: &'a str,
    pub rtt: u64,
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    /// Logarithmic value axis.
    pub log: bool,
}

/// Grouped bars of `metric` per case (x) and provider (colour), with min–max whiskers.
pub fn grouped_bars(records: &[Record], path: &Path, spec: &Bars<'_>) -> Result<bool, ChartError> {
    let Bars {
        scenario,
        metric,
        rtt,
        title,
        x_desc,
        y_desc,
        log,
    } = *spec;
    let recs: Vec<&Record> = records
        .iter()
        .filter(|r| r.scenario == scenario && r.metric == metric && r.rtt_ms == rtt)
        .collect();
    if recs.is_empty() {
        return Ok(false);
    }
    let mut cases: Vec<String> = Vec::new();
    for r in &recs {
        if !cases.contains(&r.case) {
            cases.push(r.case.clone());
        }
    }
    let providers = providers_in(&recs);
    // A log axis is drawn as log10 values on a linear axis (bars need a finite floor).
    let t = |v: f64| if log { v.max(1e-9).log10() } else { v };
    let raw_max = recs.iter().map(|r| r.max).fold(0.0, f64::max);
    let raw_min = recs
        .iter()
        .map(|r| r.min)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let (y_lo, y_max) = if log {
        (raw_min.log10().floor(), (raw_max.log10() + 0.4).ceil())
    } else {
        (0.0, (raw_max * 1.3).max(1.0))
    };
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = cases.len() as f64;
    let labels = cases.clone();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..n, y_lo..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cases.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc(x_desc)
        .y_desc(y_desc)
        .y_labels(if log { (y_max - y_lo) as usize + 1 } else { 10 })
        .y_label_formatter(&|y| {
            if log {
                crate::report::fmt_num(10f64.powf(*y))
            } else if y_max >= 20.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .max_light_lines(1)
        .light_line_style(RGBColor(245, 245, 245))
        .draw()?;
    let group_w = 0.8;
    let bar_w = group_w / providers.len().max(1) as f64;
    for (j, provider) in providers.iter().enumerate() {
        let color = provider_color(provider);
        let mut bars = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            if let Some(r) = recs
                .iter()
                .find(|r| &r.provider == provider && &r.case == case)
            {
                let x0 = i as f64 + 0.1 + j as f64 * bar_w;
                bars.push((
                    x0,
                    x0 + bar_w * 0.9,
                    t(r.median),
                    t(r.min),
                    t(r.max),
                    r.median,
                ));
            }
        }
        chart
            .draw_series(
                bars.iter()
                    .map(|b| Rectangle::new([(b.0, y_lo), (b.1, b.2)], color.filled())),
            )?
            .label(provider.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(bars.iter().map(|b| {
            ErrorBar::new_vertical((b.0 + b.1) / 2.0, b.3, b.2, b.4, BLACK.stroke_width(1), 6)
        }))?;
        chart.draw_series(bars.iter().map(|b| {
            Text::new(
                crate::report::fmt_num(b.5),
                (
                    (b.0 + b.1) / 2.0 - bar_w * 0.3,
                    b.4 + (y_max - y_lo) * 0.025,
                ),
                ("sans-serif", 12),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(true)
}
