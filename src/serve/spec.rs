//! `--export` values: which image, and how clients may write to it.
//!
//! ```text
//! NAME                          read-only (the default)
//! NAME:ephemeral                writable; each connection gets a fresh overlay,
//!                               discarded when it disconnects
//! NAME:persistent=OVERLAY       writable; changes kept in the store's overlay OVERLAY,
//!                               reattached on the next connection and after restarts
//! ```

use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteMode {
    ReadOnly,
    Ephemeral,
    Persistent { overlay: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub image: String,
    pub mode: WriteMode,
}

impl FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (image, mode) = match s.split_once(':') {
            None => (s, WriteMode::ReadOnly),
            Some((image, "ro")) => (image, WriteMode::ReadOnly),
            Some((image, "ephemeral")) => (image, WriteMode::Ephemeral),
            Some((image, rest)) => match rest.strip_prefix("persistent=") {
                Some(overlay) if !overlay.is_empty() => (image, WriteMode::Persistent { overlay: overlay.to_owned() }),
                _ => {
                    return Err(format!(
                        "unknown export mode {rest:?} in {s:?}: use NAME, NAME:ephemeral or NAME:persistent=OVERLAY"
                    ))
                }
            },
        };
        if image.is_empty() {
            return Err(format!("missing image name in {s:?}"));
        }
        Ok(ExportSpec {
            image: image.to_owned(),
            mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_modes_and_rejects_others() {
        assert_eq!("a".parse::<ExportSpec>().unwrap().mode, WriteMode::ReadOnly);
        assert_eq!(
            "a:ephemeral".parse::<ExportSpec>().unwrap().mode,
            WriteMode::Ephemeral
        );
        assert_eq!(
            "a:persistent=vm-1".parse::<ExportSpec>().unwrap(),
            ExportSpec {
                image: "a".into(),
                mode: WriteMode::Persistent {
                    overlay: "vm-1".into()
                }
            }
        );
        assert!("a:persistent=".parse::<ExportSpec>().is_err());
        assert!("a:rw".parse::<ExportSpec>().is_err());
        assert!(":ephemeral".parse::<ExportSpec>().is_err());
    }
}
