//! Minimal SVG charts for `--plot DIR`: line charts and bar charts with axes, ticks and a
//! legend. Plain text output, no fonts or system libraries needed.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// One named series of `(x, y)` points.
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
pub struct LineChart {
    /// Title.
    pub title: String,
    /// x axis label.
    pub x_label: String,
    /// y axis label.
    pub y_label: String,
    /// Series.
    pub series: Vec<Series>,
    /// Fixed y range (else from the data, starting at 0).
    pub y_range: Option<(f64, f64)>,
}

/// A bar chart: one bar per `(label, value)`; bars with the same group share a colour.
pub struct BarChart {
    /// Title.
    pub title: String,
    /// y axis label.
    pub y_label: String,
    /// `(label, value, colour group)`.
    pub bars: Vec<(String, f64, usize)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step for a range.
fn tick_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0).max(f64::EPSILON) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y - self.y0) / (self.y1 - self.y0).max(f64::EPSILON) * (H - TOP - BOTTOM)
    }
}

fn header(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        esc(title)
    );
}

fn axes(out: &mut String, f: &Frame, x_label: Option<&str>, y_label: &str, x_ticks: bool) {
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="black"/>"##,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM
    );
    let step = tick_step(f.y1 - f.y0);
    let mut y = (f.y0 / step).ceil() * step;
    while y <= f.y1 + step * 1e-9 {
        let p = f.py(y);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{p}" x2="{}" y2="{p}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            p + 4.0,
            fmt_num(y)
        );
        y += step;
    }
    if x_ticks {
        let step = tick_step(f.x1 - f.x0);
        let mut x = (f.x0 / step).ceil() * step;
        while x <= f.x1 + step * 1e-9 {
            let p = f.px(x);
            let _ = write!(
                out,
                r##"<line x1="{p}" y1="{}" x2="{p}" y2="{}" stroke="black"/><text x="{p}" y="{}" text-anchor="middle">{}</text>"##,
                H - BOTTOM,
                H - BOTTOM + 5.0,
                H - BOTTOM + 18.0,
                fmt_num(x)
            );
            x += step;
        }
    }
    if let Some(xl) = x_label {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (W - RIGHT + LEFT) / 2.0,
            H - 15.0,
            esc(xl)
        );
    }
    let _ = write!(
        out,
        r#"<text transform="translate(20,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (H - BOTTOM + TOP) / 2.0,
        esc(y_label)
    );
}

fn legend(out: &mut String, names: &[String]) {
    for (i, n) in names.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let x = W - RIGHT + 15.0;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="14" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            y - 9.0,
            COLORS[i % COLORS.len()],
            x + 20.0,
            y,
            esc(n)
        );
    }
}

impl LineChart {
    /// Renders the chart.
    pub fn to_svg(&self) -> String {
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        let (y0, y1) = self
            .y_range
            .unwrap_or((0.0, if y1 > 0.0 { y1 * 1.1 } else { 1.0 }));
        let f = Frame { x0, x1, y0, y1 };
        let mut out = String::new();
        header(&mut out, &self.title);
        axes(&mut out, &f, Some(&self.x_label), &self.y_label, true);
        for (i, s) in self.series.iter().enumerate() {
            let path: Vec<String> = s
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", f.px(x), f.py(y.clamp(y0, y1))))
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                COLORS[i % COLORS.len()],
                path.join(" ")
            );
            if s.points.len() <= 20 {
                for &(x, y) in &s.points {
                    let _ = write!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                        f.px(x),
                        f.py(y.clamp(y0, y1)),
                        COLORS[i % COLORS.len()]
                    );
                }
            }
        }
        let names: Vec<String> = self.series.iter().map(|s| s.name.clone()).collect();
        legend(&mut out, &names);
        out.push_str("</svg>\n");
        out
    }
}

impl BarChart {
    /// Renders the chart.
    pub fn to_svg(&self) -> String {
        let ymax = self.bars.iter().map(|b| b.1).fold(0.0, f64::max);
        let f = Frame {
            x0: 0.0,
            x1: self.bars.len().max(1) as f64,
            y0: 0.0,
            y1: if ymax > 0.0 { ymax * 1.15 } else { 1.0 },
        };
        let mut out = String::new();
        header(&mut out, &self.title);
        axes(&mut out, &f, None, &self.y_label, false);
        for (i, (label, v, group)) in self.bars.iter().enumerate() {
            let (xa, xb) = (f.px(i as f64 + 0.15), f.px(i as f64 + 0.85));
            let (ya, yb) = (f.py(*v), f.py(0.0));
            let _ = write!(
                out,
                r#"<rect x="{xa:.1}" y="{ya:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                xb - xa,
                (yb - ya).max(0.0),
                COLORS[group % COLORS.len()],
                (xa + xb) / 2.0,
                ya - 4.0,
                fmt_num(*v),
                (xa + xb) / 2.0,
                H - BOTTOM + 16.0,
                esc(label)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

/// Writes `svg` to `dir/name`.
pub fn write(dir: &Path, name: &str, svg: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = dir.join(name);
    std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))
}

/// Empirical CDF of samples as `(value, fraction ≤ value)` points (at most ~200).
pub fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let stride = n.div_ceil(200).max(1);
    (0..n)
        .step_by(stride)
        .chain(n.checked_sub(1))
        .map(|i| (s[i], (i + 1) as f64 / n as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_render_well_formed_svg() {
        let line = LineChart {
            title: "hit <rate>".into(),
            x_label: "query".into(),
            y_label: "fraction".into(),
            series: vec![Series {
                name: "a".into(),
                points: vec![(0.0, 0.0), (1.0, 0.5), (2.0, 1.0)],
            }],
            y_range: Some((0.0, 1.0)),
        }
        .to_svg();
        assert!(line.starts_with("<svg") && line.trim_end().ends_with("</svg>"));
        assert!(line.contains("hit &lt;rate&gt;") && line.contains("<polyline"));
        let bars = BarChart {
            title: "t".into(),
            y_label: "GB/s".into(),
            bars: vec![("memcpy".into(), 7.0, 0), ("store".into(), 6.0, 1)],
        }
        .to_svg();
        assert_eq!(bars.matches("<rect x=").count(), 2);
        // Empty input must not panic or divide by zero.
        let empty = LineChart {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            series: vec![],
            y_range: None,
        }
        .to_svg();
        assert!(!empty.contains("NaN"));
    }

    #[test]
    fn cdf_is_monotone_and_ends_at_one() {
        let c = cdf(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(c.last().unwrap().1, 1.0);
        assert!(cdf(&[]).is_empty());
        assert_eq!(tick_step(10.0), 2.0);
    }
}
