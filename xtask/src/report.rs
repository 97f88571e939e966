//! Turning benchmark results into `docs/benchmarks.md` and an SVG chart a reader would rather
//! look at than a table. Pure functions over numbers and strings; the bench parts call them.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};

/// What one part of the benchmark contributes to the report.
pub(crate) struct Part {
    /// The section's heading in docs/benchmarks.md.
    pub heading: String,
    /// The section's text and tables.
    pub markdown: String,
    /// Its panels in the chart.
    pub panels: Vec<Panel>,
    /// Lines of the bar in issue 6 this part measures, checked against its own figures.
    pub checks: Vec<Check>,
}

/// One line of the bar in issue 6, checked against the figures of the run that is written.
pub(crate) struct Check {
    /// What the bar asks, e.g. "throughput >= 1.0x HAProxy".
    pub bar: String,
    /// The spliced engine that comes closest in this run, and its figure.
    pub best: String,
    /// Whether that figure meets the bar, as the tables round it.
    pub met: bool,
}

/// The check of a bar that a ratio (or value) must reach or stay under: among `candidates`
/// (name, value), the best one, rounded to `decimals` as the tables show it.
pub(crate) fn check(
    bar: &str,
    candidates: impl IntoIterator<Item = (String, f64)>,
    higher_is_better: bool,
    limit: f64,
    decimals: i32,
    unit: &str,
) -> Option<Check> {
    let scale = 10f64.powi(decimals);
    let round = |v: f64| (v * scale).round() / scale;
    let best = candidates
        .into_iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(name, v)| (name, round(v)))
        .reduce(|a, b| {
            let b_better = if higher_is_better {
                b.1 > a.1
            } else {
                b.1 < a.1
            };
            if b_better { b } else { a }
        })?;
    let met = if higher_is_better {
        best.1 >= limit
    } else {
        best.1 <= limit
    };
    Some(Check {
        bar: bar.into(),
        best: format!("{}: {:.*}{unit}", best.0, decimals.max(0) as usize, best.1),
        met,
    })
}

/// One panel of the chart: horizontal bars, one per contender.
pub(crate) struct Panel {
    /// What is measured, e.g. "Throughput each way".
    pub title: String,
    /// The unit shown after each value, e.g. "MiB/s".
    pub unit: String,
    /// Whether smaller is better (said in the panel's title).
    pub lower_is_better: bool,
    /// Contender and value, in display order.
    pub bars: Vec<(String, f64)>,
}

const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 300.0;
const BAR_H: f64 = 18.0;
const GAP: f64 = 6.0;
const PANEL_TOP: f64 = 34.0;
const PANEL_BOTTOM: f64 = 18.0;
/// Colours cycled over contenders, the same contender keeping its colour in every panel.
const COLOURS: [&str; 8] = [
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A value with about three significant digits.
fn short(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// An SVG with the panels stacked vertically; bars are scaled per panel.
fn chart(title: &str, panels: &[&Panel]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for p in panels {
        for (n, _) in &p.bars {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
    }
    let colour = |name: &str| {
        let i = names.iter().position(|n| *n == name).unwrap_or(0);
        COLOURS[i % COLOURS.len()]
    };
    let panel_h = |p: &Panel| PANEL_TOP + p.bars.len() as f64 * (BAR_H + GAP) + PANEL_BOTTOM;
    let height = 40.0 + panels.iter().map(|p| panel_h(p)).sum::<f64>();
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let mut y = 40.0;
    for p in panels {
        let better = if p.lower_is_better {
            "lower is better"
        } else {
            "higher is better"
        };
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{:.1}" font-weight="bold">{} ({}, {better})</text>"#,
            y + 20.0,
            escape(&p.title),
            escape(&p.unit)
        );
        let max = p
            .bars
            .iter()
            .map(|(_, v)| *v)
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        let room = WIDTH - LABEL_W - 70.0;
        for (i, (name, v)) in p.bars.iter().enumerate() {
            let top = y + PANEL_TOP + i as f64 * (BAR_H + GAP);
            let w = if max > 0.0 && v.is_finite() && *v > 0.0 {
                (v / max * room).max(1.0)
            } else {
                0.0
            };
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LABEL_W - 8.0,
                top + BAR_H - 5.0,
                escape(name)
            );
            let _ = writeln!(
                svg,
                r#"<rect x="{LABEL_W}" y="{top:.1}" width="{w:.1}" height="{BAR_H}" fill="{}"/>"#,
                colour(name)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                LABEL_W + w + 6.0,
                top + BAR_H - 5.0,
                short(*v)
            );
        }
        y += panel_h(p);
    }
    svg.push_str("</svg>\n");
    svg
}

/// The bar checks of every part as Markdown, if any part has some.
pub(crate) fn bar_table(parts: &[Part]) -> Option<String> {
    let checks: Vec<&Check> = parts.iter().flat_map(|p| &p.checks).collect();
    if checks.is_empty() {
        return None;
    }
    let mut table = String::from(
        "Each line of the bar, with the spliced engine that comes closest in this run. Ratios \
         move from run to run on these machines; the analysis below gives the spread over \
         several runs.\n\n| bar | best spliced engine in this run | met in this run |\n\
         |---|---|---|\n",
    );
    for c in checks {
        let _ = writeln!(
            table,
            "| {} | {} | {} |",
            c.bar,
            c.best,
            if c.met { "yes" } else { "no" }
        );
    }
    Some(table)
}

/// Writes `docs/benchmarks.md` and `docs/benchmarks.svg` under `root` from the parts' text
/// and panels; `docs/benchmarks-analysis.md`, written by hand, is linked when it exists.
pub(crate) fn write(root: &Path, command: &str, parts: &[Part]) -> Result<()> {
    let panels: Vec<&Panel> = parts.iter().flat_map(|p| &p.panels).collect();
    let svg = chart(
        "spliced next to HAProxy, nginx and a direct connection",
        &panels,
    );
    let mut sections: Vec<(String, String)> = parts
        .iter()
        .map(|p| (p.heading.clone(), p.markdown.clone()))
        .collect();
    if let Some(table) = bar_table(parts) {
        sections.push((
            "The bars in issues 6, 14 and 15, against this run".into(),
            table,
        ));
    }
    if root.join("docs/benchmarks-analysis.md").exists() {
        sections.push((
            "Where spliced falls short, and why".into(),
            "See [benchmarks-analysis.md](benchmarks-analysis.md): profiles and the evidence \
             behind each shortfall against the bar in issue 6."
                .into(),
        ));
    }
    write_docs(root, command, &sections, &svg)
}

/// Writes `docs/benchmarks.md` under `root`: a header saying when, where and how it was
/// measured, then `sections` (a heading and Markdown each), and the chart written next to it
/// as `benchmarks.svg`.
fn write_docs(root: &Path, command: &str, sections: &[(String, String)], svg: &str) -> Result<()> {
    let docs = root.join("docs");
    std::fs::create_dir_all(&docs).with_context(|| format!("creating {}", docs.display()))?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Measured {date} on Linux {}, {cpus} CPUs, with `{command}`. Every figure is a median \
         of interleaved rounds with its min-max; ratios compare contenders measured in the \
         same run, because absolute figures on these machines drift between runs.\n",
        kernel.trim()
    );
    let _ = writeln!(md, "![throughput and CPU per GiB](benchmarks.svg)\n");
    for (heading, body) in sections {
        let _ = writeln!(md, "## {heading}\n\n{}\n", body.trim_end());
    }
    std::fs::write(docs.join("benchmarks.md"), md).context("writing docs/benchmarks.md")?;
    std::fs::write(docs.join("benchmarks.svg"), svg).context("writing docs/benchmarks.svg")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The best candidate decides, compared as the tables round it; NaN never wins.
    #[test]
    fn bar_checks_take_the_best_engine_as_rounded() -> Result<(), String> {
        let c = check(
            "throughput >= 1.0x HAProxy",
            [
                ("a".to_string(), 0.8),
                ("b".to_string(), 0.996),
                ("c".to_string(), f64::NAN),
            ],
            true,
            1.0,
            2,
            "x",
        )
        .ok_or("no check")?;
        assert_eq!((c.best.as_str(), c.met), ("b: 1.00x", true));
        let c = check(
            "proxy CPU <= 0.1x",
            [("a".to_string(), 0.34), ("b".to_string(), 0.2)],
            false,
            0.1,
            2,
            "x",
        )
        .ok_or("no check")?;
        assert_eq!((c.best.as_str(), c.met), ("b: 0.20x", false));
        assert!(check("empty", Vec::new(), true, 1.0, 2, "x").is_none());
        Ok(())
    }

    fn panel(bars: &[(&str, f64)]) -> Panel {
        Panel {
            title: "Throughput <each way>".into(),
            unit: "MiB/s".into(),
            lower_is_better: false,
            bars: bars.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect(),
        }
    }

    #[test]
    fn bars_scale_to_the_largest_value_and_labels_are_escaped() {
        let svg = chart("t & u", &[&panel(&[("a", 100.0), ("b & c", 50.0)])]);
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &amp; u"));
        assert!(svg.contains("b &amp; c"));
        assert!(svg.contains("Throughput &lt;each way&gt;"));
        let room = WIDTH - LABEL_W - 70.0;
        assert!(svg.contains(&format!(r#"width="{room:.1}""#)));
        assert!(svg.contains(&format!(r#"width="{:.1}""#, room / 2.0)));
    }

    #[test]
    fn a_contender_keeps_its_colour_across_panels_and_bad_values_draw_nothing() {
        let svg = chart(
            "x",
            &[
                &panel(&[("a", 1.0), ("b", 2.0)]),
                &panel(&[("b", f64::NAN), ("a", 0.0)]),
            ],
        );
        assert_eq!(
            svg.matches(COLOURS[1]).count(),
            2,
            "b is drawn twice in its colour"
        );
        assert!(svg.contains(r#"width="0.0""#));
        assert!(svg.contains(">-<"), "NaN shows as -");
    }

    #[test]
    fn short_keeps_about_three_digits() {
        assert_eq!(short(1234.5), "1234");
        assert_eq!(short(12.345), "12.3");
        assert_eq!(short(1.2345), "1.23");
        assert_eq!(short(0.12345), "0.123");
    }
}
