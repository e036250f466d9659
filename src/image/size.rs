//! Human sizes on the command line: `4096`, `512M`, `4G` (integers only). The suffixes
//! K, M, G and T are powers of 1024 and may be followed by `iB` or `B`.

/// Why a size does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {text:?}: expected an integer with an optional K, M, G or T suffix (e.g. 512M, 4G)")]
pub struct SizeError {
    pub text: String,
}

pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = || SizeError {
        text: text.to_owned(),
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    let number: u64 = digits.parse().map_err(|_| err())?;
    let unit = suffix
        .strip_suffix("iB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(suffix);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(err()),
    };
    number.checked_mul(1 << shift).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("16K"), Ok(16 << 10));
        assert_eq!(parse_size("100B"), Ok(100));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "M",
            "1.5G",
            "4X",
            "-1",
            "99999999999999999999T",
            "18014398509481984K",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
