//! Line charts rendered as SVG on the server: no JavaScript, no canvas, readable at any width.

use maud::{html, Markup, PreEscaped};

/// One series: a name, its colour, and (unix seconds, value) points in time order.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(i64, f64)>,
}

const W: f64 = 600.0;
const H: f64 = 180.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 8.0;
/// Most points drawn per series (longer series are averaged down to this).
const MAX_POINTS: usize = 300;

/// A chart of `series` over `[from, to]` (unix seconds). `max`: the top of the y axis, or
/// `None` to fit the data. `unit` labels the axis.
pub fn line_chart(
    title: &str,
    unit: &str,
    series: &[Series<'_>],
    from: i64,
    to: i64,
    max: Option<f64>,
) -> Markup {
    let top = max.unwrap_or_else(|| {
        let m = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0_f64, f64::max);
        nice_ceiling(m)
    });
    let span = (to - from).max(1) as f64;
    let x = |t: i64| LEFT + (t - from) as f64 / span * (W - LEFT - 4.0);
    let y = |v: f64| TOP + (1.0 - (v / top).clamp(0.0, 1.0)) * (H - TOP - BOTTOM);
    let empty = series.iter().all(|s| s.points.is_empty());
    let mut paths = String::new();
    for s in series {
        let pts = downsample(&s.points, MAX_POINTS);
        if pts.is_empty() {
            continue;
        }
        let d: Vec<String> = pts
            .iter()
            .enumerate()
            .map(|(i, (t, v))| {
                format!(
                    "{}{:.1},{:.1}",
                    if i == 0 { "M" } else { "L" },
                    x(*t),
                    y(*v)
                )
            })
            .collect();
        paths.push_str(&format!(
            r#"<path d="{}" fill="none" stroke="{}" stroke-width="1.6"><title>{}</title></path>"#,
            d.join(" "),
            s.color,
            escape(s.name)
        ));
    }
    let grid: String = (0..=4)
        .map(|i| {
            let v = top * f64::from(i) / 4.0;
            let yy = y(v);
            format!(
                r##"<line x1="{LEFT}" x2="{W}" y1="{yy:.1}" y2="{yy:.1}" stroke="#2a3542"/><text x="{:.1}" y="{:.1}" fill="#8b98a5" font-size="10" text-anchor="end">{}</text>"##,
                LEFT - 4.0,
                yy + 3.0,
                short_number(v)
            )
        })
        .collect();
    let ticks: String = (0..=4)
        .map(|i| {
            let t = from + (to - from) * i / 4;
            format!(
                r##"<text x="{:.1}" y="{:.1}" fill="#8b98a5" font-size="10" text-anchor="middle">{}</text>"##,
                x(t).clamp(LEFT + 12.0, W - 20.0),
                H - 6.0,
                ago(to - t)
            )
        })
        .collect();
    let svg = format!(
        r#"<svg viewBox="0 0 {W} {H}" role="img" aria-label="{}">{grid}{ticks}{paths}{}</svg>"#,
        escape(title),
        if empty {
            format!(
                r##"<text x="{:.0}" y="{:.0}" fill="#8b98a5" font-size="12" text-anchor="middle">no data in this range</text>"##,
                W / 2.0,
                H / 2.0
            )
        } else {
            String::new()
        }
    );
    html! {
        figure.chart {
            figcaption {
                b { (title) } " " span.dim { "(" (unit) ")" }
                @for s in series { " " span style={"color:" (s.color)} { "● " (s.name) } }
            }
            (PreEscaped(svg))
        }
    }
}

/// The mean of each run of points, so that at most `max` remain.
fn downsample(points: &[(i64, f64)], max: usize) -> Vec<(i64, f64)> {
    if points.len() <= max {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max);
    points
        .chunks(per)
        .map(|c| {
            let n = c.len() as f64;
            (c[c.len() / 2].0, c.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= step * mag {
            return step * mag;
        }
    }
    10.0 * mag
}

fn short_number(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn ago(secs: i64) -> String {
    match secs {
        0 => "now".into(),
        s if s < 3600 => format!("-{}m", s / 60),
        s if s < 86400 * 2 => format!("-{}h", s / 3600),
        s => format!("-{}d", s / 86400),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_each_series_as_a_path_within_the_box() {
        let s = Series {
            name: "cpu",
            color: "#58a6ff",
            points: (0..1000).map(|i| (i, (i % 100) as f64)).collect(),
        };
        let svg = line_chart("CPU", "%", &[s], 0, 999, Some(100.0)).into_string();
        assert!(svg.contains("<svg"));
        assert_eq!(svg.matches("<path").count(), 1);
        let d = svg.split("d=\"").nth(1).unwrap().split('"').next().unwrap();
        let coords: Vec<f64> = d
            .split([' ', ',', 'M', 'L'])
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(coords.len() / 2 <= MAX_POINTS, "downsampled");
        assert!(coords.iter().all(|c| (0.0..=W).contains(c)));
        let empty = line_chart("GPU", "%", &[], 0, 10, None).into_string();
        assert!(empty.contains("no data in this range"));
        assert!(line_chart("<x>", "%", &[], 0, 10, None)
            .into_string()
            .contains("&lt;x&gt;"));
    }

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(73.0), 100.0);
        assert_eq!(nice_ceiling(1800.0), 2000.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
    }
}
