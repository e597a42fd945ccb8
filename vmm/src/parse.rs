//! Values as users type them (sizes, seconds), parsed and bounded. Plain
//! functions returning a message: clap's value parsers in `cli` call them, and
//! so does any layer that reads a size or a duration from text.

/// Parse a size such as `512M`, `2G`, `65536K` or `268435456`; never 0.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let v = parse_size_or_zero(s)?;
    if v == 0 {
        return Err(format!("size {s:?} must be larger than zero"));
    }
    Ok(v)
}

/// Parse a size as [`parse_size`] does, 0 included: a balloon target, where
/// 0 means "hold nothing" (deflate, or start empty).
pub fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some(c) if c.is_ascii_digit() => (body, 0),
        _ => {
            return Err(format!(
            "invalid size {s:?}: use a number with an optional K, M or G suffix, e.g. 512M or 2G"
        ))
        }
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        format!(
            "invalid size {s:?}: use a number with an optional K, M or G suffix, e.g. 512M or 2G"
        )
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Most seconds a duration option takes (about 31 years): larger values
/// cannot be added to a clock without overflow.
pub const MAX_SECS: f64 = 1e9;

/// Parse a positive number of seconds, at most [`MAX_SECS`].
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 30 or 2.5)"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{s} must be a positive, finite number of seconds"));
    }
    if v > MAX_SECS {
        return Err(format!(
            "{s} seconds is too large: at most {MAX_SECS:e} seconds (about 31 years)"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        for bad in ["", "M", "12X", "1.5G", "-1M", "0", "99999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_balloon_size_may_be_zero() {
        assert_eq!(parse_size_or_zero("0").unwrap(), 0);
        assert_eq!(parse_size_or_zero(" 0 ").unwrap(), 0);
        assert_eq!(parse_size_or_zero("32M").unwrap(), 32 << 20);
        assert_eq!(parse_size_or_zero("0M").unwrap(), 0);
        for bad in ["", "-0", "x", "M", "99999999999999G"] {
            assert!(parse_size_or_zero(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds_are_bounded() {
        assert_eq!(parse_secs("2.5").unwrap(), 2.5);
        assert_eq!(parse_secs("1e9").unwrap(), 1e9);
        for bad in ["0", "-1", "nan", "inf", "1e300", "1e19", "x", ""] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        assert!(parse_secs("1e300").unwrap_err().contains("too large"));
    }
}
