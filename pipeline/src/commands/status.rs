//! `intentflow status`: a running operator's status page (`/status.json`) in the terminal,
//! once or every few seconds.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use std::io::{Read, Write};
use std::time::Duration;

/// `intentflow status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The operator's `metrics_addr`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub addr: String,
    /// Print again every this many seconds until interrupted (0: once).
    #[arg(long, default_value_t = 0)]
    pub watch_seconds: u64,
    /// Rising users listed.
    #[arg(long, default_value_t = 5)]
    pub risers: usize,
}

/// `GET /status.json` from `addr`.
///
/// # Errors
///
/// No operator answering, or an answer that is not JSON.
pub fn fetch(addr: &str) -> Result<Value> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("no operator at {addr} (its metrics_addr)"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /status.json HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else { bail!("{addr}: not an HTTP answer") };
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{addr}: {}", head.lines().next().unwrap_or_default());
    }
    serde_json::from_str(body).with_context(|| format!("{addr}: /status.json is not JSON"))
}

/// A duration in seconds in words.
fn seconds(v: &Value) -> String {
    match v.as_f64() {
        None => "–".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        Some(s) if s < 120.0 => format!("{s:.1} s"),
        Some(s) if s < 7200.0 => format!("{:.0} min", s / 60.0),
        Some(s) if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        Some(s) => format!("{:.1} d", s / 86_400.0),
    }
}

/// The status as a few lines of text.
pub fn render(s: &Value, risers: usize) -> String {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let points = s["throughput"]["points"].as_array().cloned().unwrap_or_default();
    // The last 10 complete seconds (the current one is still filling).
    let recent: Vec<&Value> = points.iter().rev().skip(1).take(10).collect();
    let rate = |k: &str| recent.iter().map(|p| n(&p[k])).sum::<u64>() as f64 / recent.len().max(1) as f64;
    let lag: i64 = s["lag"].as_array().map_or(0, |l| l.iter().map(|p| p["records"].as_i64().unwrap_or(0)).sum());
    let t = &s["totals"];
    let mut out = format!(
        "{} · model {} · {} records in, {} intents out, {} invalid · {:.0} records/s, {:.0} intents/s (last 10 s) · lag {lag}\n",
        s["status"].as_str().unwrap_or("?"),
        s["model_version"].as_str().unwrap_or("?"),
        n(&t["records_in"]),
        n(&t["intents_out"]),
        n(&t["invalid"]),
        rate("records"),
        rate("intents"),
    );
    let l = &s["latency"];
    let (e, c) = (&l["event_to_produce_seconds"], &l["consume_to_produce_seconds"]);
    // Event times a day or more behind are history being replayed (a backfill, the demo), not
    // a slow pipeline: say so next to the figure.
    let replayed = e["p50"].as_f64().is_some_and(|s| s >= 86_400.0);
    out += &format!(
        "latency (last {} s): event → intent p50 {} p99 {}{} · consume → intent p50 {} p99 {}\n",
        n(&l["window_seconds"]),
        seconds(&e["p50"]),
        seconds(&e["p99"]),
        if replayed { " (old event times: history replayed)" } else { "" },
        seconds(&c["p50"]),
        seconds(&c["p99"])
    );
    let bins: Vec<u64> = s["scores"]["bins"].as_array().map_or(Vec::new(), |b| b.iter().map(n).collect());
    let top = bins.iter().copied().max().unwrap_or(0).max(1);
    let bars: String = bins.iter().map(|&b| ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'][((b * 7).div_ceil(top)) as usize]).collect();
    out += &format!("scores (last {} s, 0 → 1): {bars}  {} intents\n", n(&s["scores"]["window_seconds"]), n(&s["scores"]["count"]));
    let rising: Vec<String> = s["risers"]
        .as_array()
        .map_or(Vec::new(), |r| r.iter().take(risers).map(|r| format!("{} {:.2} → {:.2}", r["user"].as_str().unwrap_or("?"), r["from"].as_f64().unwrap_or(0.0), r["to"].as_f64().unwrap_or(0.0))).collect());
    out += &format!("rising (last minute): {}\n", if rising.is_empty() { "none".to_string() } else { rising.join(" · ") });
    out
}

/// Runs `intentflow status`.
///
/// # Errors
///
/// When the operator cannot be reached (the first time; while watching, a failure is printed
/// and retried).
pub fn status_cmd(args: &StatusArgs) -> Result<()> {
    print!("{}", render(&fetch(&args.addr)?, args.risers));
    while args.watch_seconds > 0 {
        std::thread::sleep(Duration::from_secs(args.watch_seconds));
        match fetch(&args.addr) {
            Ok(s) => print!("\n{}", render(&s, args.risers)),
            Err(e) => println!("\n{e:#}"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_fixture_of_the_status_page() {
        let fixture: Value = serde_json::from_str(include_str!("../../assets/status.sample.json")).unwrap();
        let text = render(&fixture, 3);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.starts_with(&format!("{} · model {}", fixture["status"].as_str().unwrap(), fixture["model_version"].as_str().unwrap())), "{text}");
        assert_eq!(text.lines().last().unwrap().matches(" → ").count(), 3, "{text}");
        let empty = render(&serde_json::json!({}), 3);
        assert!(empty.contains("rising (last minute): none") && empty.contains("p50 –"), "{empty}");
        assert!(!text.contains("history replayed"), "{text}");
        let mut replay = fixture.clone();
        replay["latency"]["event_to_produce_seconds"]["p50"] = serde_json::json!(226_000_000.0);
        assert!(render(&replay, 3).contains("event → intent p50 2615.7 d p99"), "{}", render(&replay, 3));
        assert!(render(&replay, 3).contains("(old event times: history replayed)"), "{}", render(&replay, 3));
    }
}
