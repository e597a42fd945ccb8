//! The SVG bar chart of `vmm bench tlb` (plotters): one group of bars per
//! (working set, page size), one bar per backing plus native, height = median
//! ns per access, a thin line for the min–max spread.

use plotters::prelude::*;

use super::summary::ConfigResult;

const SERIES: [(&str, RGBColor); 4] = [
    ("native", RGBColor(120, 120, 120)),
    ("4k", RGBColor(214, 69, 65)),
    ("thp", RGBColor(66, 133, 244)),
    ("hugetlb", RGBColor(15, 157, 88)),
];

/// Renders the chart as an SVG document.
pub fn svg(results: &[ConfigResult], title: &str) -> Result<String, String> {
    let mut groups: Vec<(u64, String)> = Vec::new();
    for c in results {
        let g = (c.working_set, c.guest_pages.clone());
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let series: Vec<(&str, RGBColor)> = SERIES
        .iter()
        .copied()
        .filter(|(name, _)| results.iter().any(|c| c.backing == *name))
        .collect();
    let ymax = results
        .iter()
        .filter_map(|c| c.ns_per_access.map(|s| s.max))
        .fold(0.0f64, f64::max)
        * 1.15;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
    let n = groups.len().max(1);
    let labels: Vec<String> = groups
        .iter()
        .map(|(ws, gp)| format!("{} / {} pages", super::plan::size_name(*ws), gp))
        .collect();
    let mut out = String::new();
    {
        let width = (160 * n as u32).max(640);
        let root = SVGBackend::with_string(&mut out, (width, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("ns per access (median; line = min-max)")
            .draw()
            .map_err(|e| e.to_string())?;
        let k = series.len().max(1) as f64;
        let bar = 0.8 / k;
        for (si, (name, color)) in series.iter().enumerate() {
            let bars: Vec<(f64, f64, f64, f64)> = groups
                .iter()
                .enumerate()
                .filter_map(|(gi, (ws, gp))| {
                    results
                        .iter()
                        .find(|c| {
                            c.working_set == *ws && &c.guest_pages == gp && c.backing == *name
                        })
                        .and_then(|c| c.ns_per_access)
                        .map(|s| {
                            let x0 = gi as f64 - 0.4 + si as f64 * bar;
                            (x0, s.median, s.min, s.max)
                        })
                })
                .collect();
            let color = *color;
            chart
                .draw_series(bars.iter().map(|&(x0, med, _, _)| {
                    Rectangle::new([(x0, 0.0), (x0 + bar * 0.9, med)], color.filled())
                }))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            chart
                .draw_series(bars.iter().map(|&(x0, _, lo, hi)| {
                    let xm = x0 + bar * 0.45;
                    PathElement::new(vec![(xm, lo), (xm, hi)], BLACK.stroke_width(1))
                }))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::summary::Spread;

    #[test]
    fn renders_bars_and_labels() {
        let c = |backing: &str, med: f64| ConfigResult {
            working_set: 64 << 20,
            working_set_name: "64M".into(),
            guest_pages: "2m".into(),
            backing: backing.into(),
            native_backing: None,
            guest_memory: None,
            samples_ns: vec![med],
            ns_per_access: Spread::of(&[med]),
            slowdown_vs_native: None,
            slowdown_best_vs_native: None,
            kvm_pages_2m: None,
            kvm_pages_4k: None,
            kvm_runs: vec![],
            setup_seconds: vec![],
        };
        let s = svg(&[c("native", 10.0), c("hugetlb", 11.0), c("4k", 20.0)], "t").unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..40.min(s.len())]);
        assert!(s.contains("64M / 2m pages"));
        assert!(s.contains("hugetlb"));
        assert!(s.matches("<rect").count() >= 4);
    }
}
