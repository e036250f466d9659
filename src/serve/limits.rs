//! Descriptors for thousands of guests: a connection to a persistent overlay holds its
//! socket, the overlay's data file and its lock (three descriptors), and the common soft
//! limit of 1024 would stop a farm's server at a few hundred guests.

/// Descriptors a connection may hold.
const PER_CONNECTION: u64 = 3;
/// Descriptors for everything else: listeners, store objects, the runtime.
const RESERVED: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and returns how many connections
/// fit in it: `wanted`, or fewer with a warning.
pub fn connections_that_fit(wanted: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return wanted;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    let fit = (soft.saturating_sub(RESERVED) / PER_CONNECTION).max(1);
    if (wanted as u64) > fit {
        tracing::warn!(
            wanted,
            fit,
            nofile = soft,
            "--max-connections lowered to what the descriptor limit (ulimit -n) allows"
        );
        return fit as usize;
    }
    wanted
}
