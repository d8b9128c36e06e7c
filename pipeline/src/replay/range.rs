//! The bounds of a replay: `earliest`, `latest`, a time, or explicit offsets, resolved per
//! partition when the replay starts.

use std::collections::BTreeMap;

/// One end of a replay range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// The partition's oldest retained offset.
    Earliest,
    /// The partition's end when the replay starts.
    Latest,
    /// The first offset whose timestamp is at or after this time (epoch ms).
    Time(i64),
    /// Explicit offsets per partition; partitions not listed take `Earliest` (for `--from`) or
    /// `Latest` (for `--to`).
    Offsets(BTreeMap<i32, i64>),
}

impl std::str::FromStr for Bound {
    type Err = String;

    fn from_str(s: &str) -> Result<Bound, String> {
        match s.trim() {
            "earliest" => Ok(Bound::Earliest),
            "latest" => Ok(Bound::Latest),
            t if t.contains(':') && !t.contains('T') => t
                .split(',')
                .map(|pair| {
                    let (p, o) = pair.split_once(':').ok_or_else(|| format!("`{pair}` is not partition:offset"))?;
                    Ok((p.trim().parse::<i32>().map_err(|e| format!("partition `{p}`: {e}"))?, o.trim().parse::<i64>().map_err(|e| format!("offset `{o}`: {e}"))?))
                })
                .collect::<Result<BTreeMap<_, _>, String>>()
                .map(Bound::Offsets),
            t => chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| Bound::Time(d.timestamp_millis()))
                .map_err(|e| format!("`{t}` is neither earliest, latest, an RFC 3339 time nor partition:offset,…: {e}")),
        }
    }
}

/// What is known of a partition when its range is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionEnds {
    /// Oldest retained offset.
    pub low: i64,
    /// High watermark when the replay starts.
    pub high: i64,
}

/// The offset a bound stands for on one partition, clamped to `[low, high]`. `by_time` is the
/// broker's answer to offsets-for-times for a [`Bound::Time`] (`None`: no record that late).
pub fn resolve(bound: &Bound, partition: i32, ends: PartitionEnds, by_time: Option<i64>, is_start: bool) -> i64 {
    let offset = match bound {
        Bound::Earliest => ends.low,
        Bound::Latest => ends.high,
        Bound::Time(_) => by_time.unwrap_or(ends.high),
        Bound::Offsets(map) => map.get(&partition).copied().unwrap_or(if is_start { ends.low } else { ends.high }),
    };
    offset.clamp(ends.low, ends.high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse_and_resolve_per_partition() {
        let ends = PartitionEnds { low: 10, high: 100 };
        assert_eq!("earliest".parse::<Bound>().unwrap(), Bound::Earliest);
        assert_eq!("2019-10-01T00:00:00Z".parse::<Bound>().unwrap(), Bound::Time(1_569_888_000_000));
        let offsets: Bound = "0:50, 2:7".parse().unwrap();
        assert_eq!(offsets, Bound::Offsets([(0, 50), (2, 7)].into()));
        assert!("yesterday".parse::<Bound>().is_err());
        assert!("0:x".parse::<Bound>().is_err());

        assert_eq!(resolve(&Bound::Earliest, 0, ends, None, true), 10);
        assert_eq!(resolve(&Bound::Latest, 0, ends, None, false), 100);
        // offsets-for-times found offset 42; found nothing that late: the end.
        assert_eq!(resolve(&Bound::Time(5), 0, ends, Some(42), true), 42);
        assert_eq!(resolve(&Bound::Time(5), 0, ends, None, false), 100);
        // Listed partitions take their offset (clamped to what is retained), others the edge.
        assert_eq!(resolve(&offsets, 0, ends, None, true), 50);
        assert_eq!(resolve(&offsets, 2, ends, None, true), 10, "7 was deleted by retention");
        assert_eq!(resolve(&offsets, 1, ends, None, true), 10);
        assert_eq!(resolve(&offsets, 1, ends, None, false), 100);
    }
}
