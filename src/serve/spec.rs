//! Export names: what a client asks for, and what it gets.
//!
//! ```text
//! IMAGE                 the image, read-only
//! IMAGE@OVERLAY         writable; changes kept in the store's persistent overlay OVERLAY
//!                       (bound to IMAGE), reattached on the next connection and after
//!                       restarts; created on first connect if the server allows it
//! IMAGE+ephemeral       writable; a fresh overlay per connection, discarded when it ends
//! ```
//!
//! Image and overlay names are made of `A-Z a-z 0-9 . _ -`, so `@` and `+` cannot be part
//! of either and every export name parses one way. `+` rather than `:` because qemu's
//! legacy `nbd:HOST:PORT:exportname=NAME` syntax splits on colons.
//!
//! `--export` takes the same names, plus the older spellings `IMAGE:ephemeral`,
//! `IMAGE:persistent=OVERLAY` and `IMAGE:ro`, which also keep their old meaning: the plain
//! name IMAGE reaches that mode (one such export per image).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WriteMode {
    ReadOnly,
    Ephemeral,
    Persistent { overlay: String },
}

/// A parsed export name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExportName {
    pub image: String,
    pub mode: WriteMode,
}

const EPHEMERAL: &str = "ephemeral";

impl ExportName {
    pub fn read_only(image: &str) -> ExportName {
        ExportName {
            image: image.to_owned(),
            mode: WriteMode::ReadOnly,
        }
    }

    /// Parses a client-supplied name; `None` if it is not of the forms above (the names
    /// themselves are validated when looked up).
    pub fn parse(name: &str) -> Option<ExportName> {
        let (image, mode) = if let Some((image, overlay)) = name.split_once('@') {
            let overlay = overlay.to_owned();
            (image, WriteMode::Persistent { overlay })
        } else if let Some((image, suffix)) = name.split_once('+') {
            if suffix != EPHEMERAL {
                return None;
            }
            (image, WriteMode::Ephemeral)
        } else {
            (name, WriteMode::ReadOnly)
        };
        let overlay_ok = match &mode {
            WriteMode::Persistent { overlay } => !overlay.is_empty() && !overlay.contains('@'),
            _ => true,
        };
        (!image.is_empty() && !image.contains('+') && overlay_ok).then(|| ExportName {
            image: image.to_owned(),
            mode,
        })
    }
}

impl fmt::Display for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            WriteMode::ReadOnly => write!(f, "{}", self.image),
            WriteMode::Ephemeral => write!(f, "{}+{EPHEMERAL}", self.image),
            WriteMode::Persistent { overlay } => write!(f, "{}@{overlay}", self.image),
        }
    }
}

/// One `--export` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: ExportName,
    /// Given in the older `IMAGE:MODE` spelling: the plain name IMAGE means this export.
    pub legacy: bool,
}

impl FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use IMAGE, IMAGE@OVERLAY or IMAGE+ephemeral";
        let Some((image, rest)) = s.split_once(':') else {
            let name =
                ExportName::parse(s).ok_or_else(|| format!("invalid export {s:?}: {usage}"))?;
            return Ok(ExportSpec {
                name,
                legacy: false,
            });
        };
        let mode = match rest {
            "ro" => WriteMode::ReadOnly,
            EPHEMERAL => WriteMode::Ephemeral,
            _ => match rest.strip_prefix("persistent=") {
                Some(overlay) if !overlay.is_empty() => WriteMode::Persistent {
                    overlay: overlay.to_owned(),
                },
                _ => return Err(format!("unknown export mode {rest:?} in {s:?}: {usage}")),
            },
        };
        if image.is_empty() || image.contains(['@', '+']) {
            return Err(format!("invalid image name in {s:?}: {usage}"));
        }
        Ok(ExportSpec {
            name: ExportName {
                image: image.to_owned(),
                mode,
            },
            legacy: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persistent(image: &str, overlay: &str) -> ExportName {
        ExportName {
            image: image.into(),
            mode: WriteMode::Persistent {
                overlay: overlay.into(),
            },
        }
    }

    #[test]
    fn client_names_parse_one_way_and_print_back() {
        for (text, want) in [
            ("web", Some(ExportName::read_only("web"))),
            ("web@vm-1", Some(persistent("web", "vm-1"))),
            (
                "web+ephemeral",
                Some(ExportName {
                    image: "web".into(),
                    mode: WriteMode::Ephemeral,
                }),
            ),
            ("web+other", None),
            ("web@", None),
            ("@vm", None),
            ("+ephemeral", None),
            ("a@b@c", None),
            ("a+ephemeral@x", None),
            ("", None),
        ] {
            let got = ExportName::parse(text);
            assert_eq!(got, want, "{text:?}");
            if let Some(name) = got {
                assert_eq!(name.to_string(), text);
            }
        }
    }

    #[test]
    fn export_flags_take_new_names_and_old_spellings() {
        let spec = |s: &str| s.parse::<ExportSpec>();
        assert_eq!(
            spec("a@vm").unwrap(),
            ExportSpec {
                name: persistent("a", "vm"),
                legacy: false
            }
        );
        assert_eq!(
            spec("a:persistent=vm-1").unwrap(),
            ExportSpec {
                name: persistent("a", "vm-1"),
                legacy: true
            }
        );
        assert_eq!(spec("a:ephemeral").unwrap().name.mode, WriteMode::Ephemeral);
        assert_eq!(spec("a:ro").unwrap().name.mode, WriteMode::ReadOnly);
        assert!(spec("a:persistent=").is_err());
        assert!(spec("a:rw").is_err());
        assert!(spec(":ephemeral").is_err());
        assert!(spec("a+b").is_err());
    }
}
