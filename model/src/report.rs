//! A self-contained HTML report of an [`Assessment`]: a comparison table and inline SVG plots
//! (ROC, precision–recall, reliability diagram, ROC-AUC by events seen). No scripts, no external
//! files, so it can be attached to a ticket or opened offline.

use crate::assess::Assessment;
use crate::eval::Point;
use std::fmt::Write;

const COLOURS: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#7f7f7f", "#9467bd"];
/// Width of the plotting area plus its left margin; the legend sits to the right of it.
const PLOT_W: f64 = 320.0;
const LEGEND_W: f64 = 130.0;
const W: f64 = PLOT_W + LEGEND_W;
const H: f64 = 300.0;
const PAD: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.4}"))
}

/// An SVG chart over the unit square with one polyline per series (markers where the flag is
/// set) and the legend on the right; `diagonal` draws y = x; `x_ticks` replaces the numeric x
/// ticks with labels spread evenly over [0, 1].
fn chart(title: &str, x_label: &str, y_label: &str, series: &[(&str, &[Point], bool)], diagonal: bool, x_ticks: Option<&[&str]>) -> String {
    let sx = |x: f64| PAD + x.clamp(0.0, 1.0) * (PLOT_W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - y.clamp(0.0, 1.0) * (H - 2.0 * PAD);
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img"><title>{}</title>"#, esc(title));
    let _ = write!(svg, r##"<rect x="{PAD}" y="{PAD}" width="{}" height="{}" fill="none" stroke="#999"/>"##, PLOT_W - 2.0 * PAD, H - 2.0 * PAD);
    let numeric = ["0", "0.25", "0.5", "0.75", "1"];
    let x_labels = x_ticks.unwrap_or(&numeric);
    for (i, label) in x_labels.iter().enumerate() {
        let x = i as f64 / (x_labels.len().max(2) - 1) as f64;
        let _ = write!(svg, r#"<text x="{}" y="{}" font-size="9" text-anchor="middle">{}</text>"#, sx(x), H - PAD + 12.0, esc(label));
    }
    for (i, label) in numeric.iter().enumerate() {
        let _ = write!(svg, r#"<text x="{}" y="{}" font-size="9" text-anchor="end">{label}</text>"#, PAD - 4.0, sy(i as f64 / 4.0) + 3.0);
    }
    let _ = write!(svg, r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text>"#, PLOT_W / 2.0, H - 8.0, esc(x_label));
    let _ = write!(svg, r#"<text x="12" y="{}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {})">{}</text>"#, H / 2.0, H / 2.0, esc(y_label));
    let _ = write!(svg, r#"<text x="{}" y="20" font-size="13" text-anchor="middle" font-weight="bold">{}</text>"#, PLOT_W / 2.0, esc(title));
    if diagonal {
        let _ = write!(svg, r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ccc" stroke-dasharray="4 3"/>"##, sx(0.0), sy(0.0), sx(1.0), sy(1.0));
    }
    for (i, (name, points, markers)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        let _ = write!(svg, r#"<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{}"/>"#, path.join(" "));
        if *markers {
            for (x, y) in points.iter() {
                let _ = write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{colour}"/>"#, sx(*x), sy(*y));
            }
        }
        let ly = PAD + 8.0 + 15.0 * i as f64;
        let lx = PLOT_W - PAD + 10.0;
        let _ = write!(svg, r#"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="2"/>"#, ly - 3.0, lx + 14.0, ly - 3.0);
        let _ = write!(svg, r#"<text x="{}" y="{ly}" font-size="10" fill="{colour}">{}</text>"#, lx + 18.0, esc(name));
    }
    svg.push_str("</svg>");
    svg
}

/// Renders `a` as a standalone HTML page; `source` names the evaluated input.
pub fn render_html(a: &Assessment, source: &str) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Intentflow evaluation — {v}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}td:first-child{{text-align:left}}
.plots{{display:flex;flex-wrap:wrap;gap:12px}}small{{color:#666}}</style></head><body>
<h1>Intentflow evaluation</h1>
<p>Model <code>{v}</code> on <code>{src}</code>, {part} sessions of a {train:.0}/{val:.0}/{test:.0} time split, label <code>{label:?}</code>.
95&nbsp;% intervals: {reps} session-bootstrap replicates.</p>"#,
        v = esc(&a.model_version),
        src = esc(source),
        part = esc(&a.part),
        train = 100.0 * (1.0 - a.split.val_fraction - a.split.test_fraction),
        val = 100.0 * a.split.val_fraction,
        test = 100.0 * a.split.test_fraction,
        label = a.label,
        reps = a.bootstrap_reps,
    );
    if let Some(first) = a.scorers.first() {
        let m = &first.metrics;
        let _ = write!(html, "<p>{} labelled events in {} sessions, positive rate {:.4}.</p>", m.events, m.sessions, m.base_rate);
    }
    html.push_str("<table><tr><th>scorer</th><th>ROC-AUC [95% CI]</th><th>PR-AUC [95% CI]</th><th>log loss</th><th>Brier</th><th>ECE</th><th>threshold</th><th>precision</th><th>recall</th><th>F1</th></tr>");
    for s in &a.scorers {
        let m = &s.metrics;
        let ci = |c: Option<crate::eval::Interval>| c.map_or(String::new(), |c| format!(" [{:.3}, {:.3}]", c.lo, c.hi));
        let _ = write!(
            html,
            "<tr><td><b>{}</b><br><small>{}</small></td><td>{}{}</td><td>{}{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
            esc(&s.name),
            esc(&s.description),
            fmt_opt(m.roc_auc),
            ci(m.roc_auc_ci),
            fmt_opt(m.pr_auc),
            ci(m.pr_auc_ci),
            m.log_loss,
            m.brier,
            m.ece,
            m.at_threshold.threshold,
            m.at_threshold.precision,
            m.at_threshold.recall,
            m.at_threshold.f1
        );
    }
    html.push_str("</table><div class=\"plots\">");
    let roc: Vec<(&str, &[Point], bool)> = a.scorers.iter().map(|s| (s.name.as_str(), s.metrics.roc_curve.as_slice(), false)).collect();
    html.push_str(&chart("ROC", "false positive rate", "true positive rate", &roc, true, None));
    let pr: Vec<(&str, &[Point], bool)> = a.scorers.iter().map(|s| (s.name.as_str(), s.metrics.pr_curve.as_slice(), false)).collect();
    html.push_str(&chart("Precision–recall", "recall", "precision", &pr, false, None));
    let reliability: Vec<(String, Vec<Point>)> = a
        .scorers
        .iter()
        .filter(|s| s.name != "base_rate")
        .map(|s| (s.name.clone(), s.metrics.reliability.iter().map(|b| (b.mean_score, b.positive_rate)).collect()))
        .collect();
    let rel: Vec<(&str, &[Point], bool)> = reliability.iter().map(|(n, p)| (n.as_str(), p.as_slice(), true)).collect();
    html.push_str(&chart("Reliability", "mean score in bin", "observed purchase rate", &rel, true, None));
    let buckets = a.scorers.first().map_or(0, |s| s.metrics.auc_by_events.len()).max(2);
    let by_events: Vec<(String, Vec<Point>)> = a
        .scorers
        .iter()
        .filter(|s| s.name != "base_rate")
        .map(|s| {
            let points = s.metrics.auc_by_events.iter().enumerate().filter_map(|(i, b)| b.roc_auc.map(|v| (i as f64 / (buckets - 1) as f64, v))).collect();
            (s.name.clone(), points)
        })
        .collect();
    let be: Vec<(&str, &[Point], bool)> = by_events.iter().map(|(n, p)| (n.as_str(), p.as_slice(), true)).collect();
    let labels: Vec<&str> = a.scorers.first().map_or(Vec::new(), |s| s.metrics.auc_by_events.iter().map(|b| b.events.as_str()).collect());
    html.push_str(&chart("ROC-AUC by events seen", "events seen so far in the session", "ROC-AUC", &be, false, Some(&labels)));
    html.push_str("</div><h2>ROC-AUC by events seen so far</h2><table><tr><th>scorer</th>");
    for l in &labels {
        let _ = write!(html, "<th>{}</th>", esc(l));
    }
    html.push_str("</tr>");
    if let Some(first) = a.scorers.first() {
        html.push_str("<tr><td>events (positives)</td>");
        for b in &first.metrics.auc_by_events {
            let _ = write!(html, "<td>{} ({})</td>", b.count, b.positives);
        }
        html.push_str("</tr>");
    }
    for s in a.scorers.iter().filter(|s| s.name != "base_rate") {
        let _ = write!(html, "<tr><td>{}</td>", esc(&s.name));
        for b in &s.metrics.auc_by_events {
            let _ = write!(html, "<td>{}</td>", fmt_opt(b.roc_auc));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table><h2>Lift: positive events among the highest scores</h2><table><tr><th>scorer</th>");
    for top in crate::eval::LIFT_FRACTIONS {
        let _ = write!(html, "<th>top {:.0} %: captured (lift)</th>", top * 100.0);
    }
    html.push_str("</tr>");
    for s in &a.scorers {
        let _ = write!(html, "<tr><td>{}</td>", esc(&s.name));
        for r in &s.metrics.lift {
            let _ = write!(html, "<td>{:.3} (×{:.1})</td>", r.captured, r.lift);
        }
        html.push_str("</tr>");
    }
    html.push_str("</table><h2>Paired session bootstrap</h2><table><tr><th>comparison</th><th>metric</th><th>difference [95% CI]</th><th>P(first better)</th></tr>");
    for c in &a.comparisons {
        let ci = c.interval.map_or(String::new(), |c| format!(" [{:+.3}, {:+.3}]", c.lo, c.hi));
        let _ = write!(
            html,
            "<tr><td>{} − {}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            esc(&c.a),
            esc(&c.b),
            esc(&c.metric),
            c.difference.map_or("n/a".into(), |d| format!("{d:+.4}")),
            ci,
            fmt_opt(c.probability_a_better)
        );
    }
    html.push_str("</table></body></html>\n");
    html
}
