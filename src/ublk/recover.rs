//! `serve --ublk-recovery`: finding the devices a dead server left quiesced.
//!
//! A device added with `UBLK_F_USER_RECOVERY` is not removed when its server's
//! `/dev/ublkcN` closes: the driver quiesces it (its I/O waits, a filesystem on it stays
//! mounted) until a new server sends START_USER_RECOVERY, sets up its queues and sends
//! END_USER_RECOVERY. Which export a device served is in the JSON libublk keeps for it
//! in `/run/ublksrvd/N.json` (`target_data.export`, written by `device::set_params`),
//! beside the store it came from (`target_data.store`).

use std::path::Path;

use libublk::ctrl::UblkCtrl;
use libublk::sys;

/// Whose a waiting device is, by the target data of its JSON.
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    /// This store's: the export to serve again, and what image it was (`super::identity`)
    /// if recorded.
    Ours(String, Option<String>),
    /// Another store's (its root): an image of the same name here is another filesystem.
    Other(String),
    /// Not tessera's, or from a tessera that did not record its store.
    Unknown,
}

fn claim(target: Option<&serde_json::Value>, store: &Path) -> Claim {
    let field = |k: &str| target?.get(k)?.as_str().map(str::to_owned);
    match (field("export"), field("store")) {
        (Some(export), Some(root)) if Path::new(&root) == store => {
            Claim::Ours(export, field("image"))
        }
        (Some(_), Some(root)) => Claim::Other(root),
        _ => Claim::Unknown,
    }
}

/// Quiesced devices of `store` (its absolute root) whose server is gone, with the export
/// each served and the image it was.
pub fn quiesced(store: &Path) -> Vec<(u32, String, Option<String>)> {
    let ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    for id in ids {
        let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else {
            continue;
        };
        let info = ctrl.dev_info();
        let pid = info.ublksrv_pid;
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = pid <= 0 || unsafe { libc::kill(pid, 0) } != 0;
        if u32::from(info.state) != sys::UBLK_S_DEV_QUIESCED || !gone {
            continue;
        }
        match claim(ctrl.get_target_data_from_json().as_ref(), store) {
            Claim::Ours(export, image) => found.push((id, export, image)),
            Claim::Other(root) => eprintln!(
                "ublk: /dev/ublkb{id} waits for recovery by a server of the store {root}: left alone"
            ),
            Claim::Unknown => eprintln!(
                "ublk: /dev/ublkb{id} waits for recovery but names no tessera store and export ({}): \
                 left alone",
                ctrl.run_path()
            ),
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_devices_of_this_store_are_claimed() {
        let here = Path::new("/srv/store");
        let mine = json!({ "export": "bb", "store": "/srv/store", "image": "uuid 1, 4096 bytes" });
        assert_eq!(
            claim(Some(&mine), here),
            Claim::Ours("bb".into(), Some("uuid 1, 4096 bytes".into()))
        );
        let theirs = json!({ "export": "bb", "store": "/srv/other" });
        assert_eq!(
            claim(Some(&theirs), here),
            Claim::Other("/srv/other".into())
        );
        // No store recorded: whose image "bb" it was cannot be known.
        assert_eq!(
            claim(Some(&json!({ "export": "bb" })), here),
            Claim::Unknown
        );
        assert_eq!(claim(Some(&json!({})), here), Claim::Unknown);
        assert_eq!(claim(None, here), Claim::Unknown);
    }
}
