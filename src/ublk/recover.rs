//! `serve --ublk-recovery`: finding the devices a dead server left quiesced.
//!
//! A device added with `UBLK_F_USER_RECOVERY` is not removed when its server's
//! `/dev/ublkcN` closes: the driver quiesces it (its I/O waits, a filesystem on it stays
//! mounted) until a new server sends START_USER_RECOVERY, sets up its queues and sends
//! END_USER_RECOVERY. Which export a device served is in the JSON libublk keeps for it
//! in `/run/ublksrvd/N.json` (`target_data.export`, written by `device::set_params`).

use libublk::ctrl::UblkCtrl;
use libublk::sys;

/// Quiesced devices whose server is gone, with the export each served.
pub fn quiesced() -> Vec<(u32, String)> {
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
        let export = ctrl
            .get_target_data_from_json()
            .and_then(|v| v.get("export")?.as_str().map(str::to_owned));
        match export {
            Some(export) => found.push((id, export)),
            None => eprintln!(
                "ublk: /dev/ublkb{id} waits for recovery but names no export ({}): \
                 not tessera's, left alone",
                ctrl.run_path()
            ),
        }
    }
    found
}
