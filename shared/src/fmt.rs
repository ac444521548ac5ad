//! Pure helpers the agent, the hub and the decider format and fingerprint with, so that the
//! three agree to the byte: times shown as RFC 3339 (and the one strict parser of what clients
//! send), and the idempotency fingerprints stored with every request.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::journal::UnixMs;

/// Milliseconds since the epoch as RFC 3339 (the number itself when out of range).
pub fn rfc3339(ms: UnixMs) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_else(|_| ms.to_string())
}

/// SHA-256 of the JSON of a request body: equal bodies, equal fingerprints. The bytes are what
/// agents and hubs have always stored, so stored fingerprints stay valid.
pub fn fingerprint_of(body: &impl Serialize) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(body).expect("request bodies serialise")).to_vec()
}

/// Parses an RFC 3339 `date-time` strictly (section 5.6): `YYYY-MM-DDTHH:MM:SS`, an optional
/// fraction of 1 to 9 digits, then `Z` or an offset `±HH:MM` within ±23:59. `T` and `Z` may be
/// lower case; a leap second (`:60`) counts as `:59`. Returns Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize, what: &str| -> Result<i32, String> {
        let part = b.get(from..from + len).ok_or_else(|| format!("it ends before the {what}"))?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(format!("the {what} must be {len} digits"));
        }
        Ok(part.iter().fold(0i32, |n, d| n * 10 + i32::from(d - b'0')))
    };
    let sep = |at: usize, want: &[u8], what: &str| -> Result<(), String> {
        match b.get(at) {
            Some(c) if want.contains(c) => Ok(()),
            _ => Err(format!("expected {what} at position {}", at + 1)),
        }
    };
    let year = num(0, 4, "year")?;
    sep(4, b"-", "'-'")?;
    let month = num(5, 2, "month")?;
    sep(7, b"-", "'-'")?;
    let day = num(8, 2, "day")?;
    sep(10, b"Tt", "'T' between date and time")?;
    let hour = num(11, 2, "hour")?;
    sep(13, b":", "':'")?;
    let minute = num(14, 2, "minute")?;
    sep(16, b":", "':' and seconds")?;
    let second = num(17, 2, "second")?;
    let mut i = 19;
    let mut nanos = 0i32;
    if b.get(i) == Some(&b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return Err("a fraction of a second must have 1 to 9 digits".into());
        }
        let frac = num(i + 1, digits, "fraction")?;
        nanos = frac * 10i32.pow(9 - digits as u32);
        i += 1 + digits;
    }
    let offset_secs = match b.get(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let oh = num(i + 1, 2, "offset hours")?;
            sep(i + 3, b":", "':' in the offset")?;
            let om = num(i + 4, 2, "offset minutes")?;
            if oh > 23 || om > 59 {
                return Err(format!("the offset {} is outside -23:59..+23:59", &s[i..i + 6]));
            }
            i += 6;
            (oh * 3600 + om * 60) * if *sign == b'-' { -1 } else { 1 }
        }
        _ => return Err("a time zone offset is required: Z or ±HH:MM".into()),
    };
    if i != b.len() {
        return Err(format!("unexpected text after position {i}"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err("the time of day must be 00:00:00 to 23:59:60".into());
    }
    let second = second.min(59); // a leap second
    let dt =
        jiff::civil::DateTime::new(year as i16, month as i8, day as i8, hour as i8, minute as i8, second as i8, nanos)
            .map_err(|_| format!("{year:04}-{month:02}-{day:02} is not a calendar date"))?;
    let offset = jiff::tz::Offset::from_seconds(offset_secs).map_err(|e| e.to_string())?;
    let ts = offset.to_timestamp(dt).map_err(|e| e.to_string())?;
    Ok(ts.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_fingerprints_are_stable() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_250), "2023-11-14T22:13:20.25Z");
        assert_eq!(rfc3339(i64::MAX), i64::MAX.to_string());
        let want = Sha256::digest(br#"[1,"a"]"#).to_vec();
        assert_eq!(fingerprint_of(&(1, "a")), want);
    }

    #[test]
    fn rfc3339_is_parsed_strictly() {
        let z = parse_rfc3339("2025-03-01T14:05:09Z").unwrap();
        assert_eq!(z, 1_740_837_909_000);
        assert_eq!(parse_rfc3339("2025-03-01t14:05:09z"), Ok(z));
        assert_eq!(parse_rfc3339("2025-03-01T15:05:09+01:00"), Ok(z));
        assert_eq!(parse_rfc3339("2025-03-01T14:05:09-00:00"), Ok(z));
        assert_eq!(parse_rfc3339("2025-03-01T14:05:09.25Z"), Ok(z + 250));
        assert_eq!(parse_rfc3339("2025-03-01T14:05:09.123456789Z"), Ok(z + 123));
        assert_eq!(parse_rfc3339("2025-03-02T14:04:09+23:59"), Ok(z));
        assert_eq!(parse_rfc3339("2025-02-28T14:06:09-23:59"), Ok(z));
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), parse_rfc3339("2016-12-31T23:59:59Z"));
        let refused = [
            ("0001-01-01T00:00:00+25:00", "offset"),
            ("2025-03-01T14:05:09+24:00", "offset"),
            ("2025-03-01T14:05:09+01:60", "offset"),
            ("2025-03-01T14:05:09", "offset is required"),
            ("2025-03-01T14:05Z", "seconds"),
            ("2025-03-01 14:05:09Z", "'T'"),
            ("2025-03-01T14:05:09+0100", "':' in the offset"),
            ("2025-03-01T14:05:09.Z", "1 to 9 digits"),
            ("2025-03-01T14:05:09.1234567891Z", "1 to 9 digits"),
            ("2025-02-30T14:05:09Z", "calendar date"),
            ("2025-13-01T14:05:09Z", "calendar date"),
            ("2025-03-01T24:00:00Z", "time of day"),
            ("2025-03-01T14:05:09Z ", "unexpected text"),
            ("+2025-03-01T14:05:09Z", "year"),
            ("2025-03-01T14:05:09[Europe/Paris]", "offset is required"),
            ("yesterday", "year"),
            ("", "year"),
        ];
        for (s, why) in refused {
            let e = parse_rfc3339(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e} lacks {why}");
        }
    }
}
