//! The SVG bar charts of `vmm bench` (plotters). `tlb`: one group of bars per
//! (working set, page size), one bar per backing plus native, height = median
//! ns per access, a thin line for the min–max spread. `workload`: one group
//! per measure, bars relative to the `4k` backing.

use plotters::prelude::*;

use super::summary::{BackingResult, ConfigResult, Spread};

const SERIES: [(&str, RGBColor); 4] = [
    ("native", RGBColor(120, 120, 120)),
    ("4k", RGBColor(214, 69, 65)),
    ("thp", RGBColor(66, 133, 244)),
    ("hugetlb", RGBColor(15, 157, 88)),
];

/// Renders the `tlb` chart as an SVG document.
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
    let labels: Vec<String> = groups
        .iter()
        .map(|(ws, gp)| format!("{} / {} pages", super::plan::size_name(*ws), gp))
        .collect();
    grouped_bars(
        title,
        "ns per access (median; line = min-max)",
        &labels,
        &series,
        &|gi, name| {
            let (ws, gp) = &groups[gi];
            results
                .iter()
                .find(|c| c.working_set == *ws && &c.guest_pages == gp && c.backing == name)
                .and_then(|c| c.ns_per_access)
        },
    )
}

/// Renders the `workload` chart as an SVG document: one group per measure
/// (CMD's wall time, then each numeric `RESULT` key), one bar per backing,
/// height = median relative to the `4k` backing's median in the same run (the
/// first backing's when `4k` did not run), a thin line for the min–max spread.
pub fn workload_svg(backings: &[BackingResult], title: &str) -> Result<String, String> {
    let base = backings
        .iter()
        .find(|b| b.backing == "4k")
        .or_else(|| backings.first())
        .map_or("4k", |b| b.backing.as_str());
    let base_row = backings.iter().find(|b| b.backing == base);
    let mut measures: Vec<String> = vec!["wall time".into()];
    for b in backings {
        for k in b.result.keys() {
            if !measures.contains(k) {
                measures.push(k.clone());
            }
        }
    }
    let spread = |b: &BackingResult, mi: usize| -> Option<Spread> {
        if mi == 0 {
            b.wall_seconds
        } else {
            b.result.get(&measures[mi]).copied()
        }
    };
    let series: Vec<(&str, RGBColor)> = SERIES
        .iter()
        .copied()
        .filter(|(name, _)| backings.iter().any(|b| b.backing == *name))
        .collect();
    grouped_bars(
        title,
        &format!("relative to {base} (median; line = min-max)"),
        &measures,
        &series,
        &|mi, name| {
            let by = base_row.and_then(|b| spread(b, mi))?.median;
            if !(by.is_finite() && by > 0.0) {
                return None;
            }
            let s = spread(backings.iter().find(|b| b.backing == name)?, mi)?;
            Some(Spread {
                median: s.median / by,
                min: s.min / by,
                max: s.max / by,
            })
        },
    )
}

/// One group of bars per label, one bar per series (`value(group, series)`:
/// median bar, min–max line; none drawn for `None`), with a legend.
fn grouped_bars(
    title: &str,
    y_desc: &str,
    labels: &[String],
    series: &[(&str, RGBColor)],
    value: &dyn Fn(usize, &str) -> Option<Spread>,
) -> Result<String, String> {
    let n = labels.len().max(1);
    let ymax = (0..labels.len())
        .flat_map(|gi| series.iter().filter_map(move |(name, _)| value(gi, name)))
        .map(|s| s.max)
        .fold(0.0f64, f64::max)
        * 1.15;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
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
            .y_desc(y_desc)
            .draw()
            .map_err(|e| e.to_string())?;
        let k = series.len().max(1) as f64;
        let bar = 0.8 / k;
        for (si, (name, color)) in series.iter().enumerate() {
            let bars: Vec<(f64, f64, f64, f64)> = (0..labels.len())
                .filter_map(|gi| {
                    value(gi, name).map(|s| {
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
            kvm_pages_1g: None,
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

    #[test]
    fn workload_bars_relative_to_4k() {
        let b = |backing: &str, wall: f64, ns: f64| BackingResult {
            backing: backing.into(),
            runs: 1,
            wall_seconds: Spread::of(&[wall]),
            result: [("ns_per_access".to_string(), Spread::of(&[ns]).unwrap())].into(),
            wall_ratio_to_4k: None,
            ns_per_access_ratio_to_4k: None,
            kvm_pages_2m_peak: None,
            kvm_pages_4k_peak: None,
        };
        let rows = [b("4k", 2.0, 100.0), b("hugetlb", 1.0, 40.0)];
        let s = workload_svg(&rows, "w").unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..40.min(s.len())]);
        assert!(s.contains("wall time") && s.contains("ns_per_access"));
        assert!(s.contains("relative to 4k"));
        // Background, legend box, two legend swatches, four bars.
        assert!(s.matches("<rect").count() >= 8, "{s}");
        // Without a 4k row the first backing is the base.
        let s = workload_svg(&rows[1..], "w").unwrap();
        assert!(s.contains("relative to hugetlb"));
    }
}
