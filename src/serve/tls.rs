//! TLS for `serve`: the command-line policy turned into the server's
//! configuration, and certificate reload on SIGHUP.

use anyhow::{bail, Context};
use tessera_nbd::{ClientAllowList, TlsFiles, TlsMode, TlsServer};

use super::{ServeArgs, TlsArg};

/// `--tls-allow EXPORT=ID[,ID…]`: one export's allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowArg {
    pub export: String,
    pub ids: Vec<String>,
}

impl std::str::FromStr for AllowArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The last '=' splits, so export names may contain '='; identities
        // (CNs, DNS names) do not.
        let Some((export, ids)) = s.rsplit_once('=') else {
            return Err(format!("{s:?} is not EXPORT=ID[,ID…]"));
        };
        let ids: Vec<String> = ids
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return Err(format!("{s:?} names no client identity"));
        }
        Ok(AllowArg {
            export: export.to_owned(),
            ids,
        })
    }
}

/// The TLS mode and allow-lists `args` ask for, with credentials loaded.
pub fn setup(args: &ServeArgs) -> anyhow::Result<(TlsMode, ClientAllowList)> {
    let mut allow = ClientAllowList::default();
    for a in &args.tls_allow {
        allow.allow(a.export.clone(), a.ids.iter().cloned());
    }
    if args.tls == TlsArg::Off {
        if args.tls_cert.is_some() || args.tls_key.is_some() || args.tls_ca.is_some() {
            bail!("--tls-cert/--tls-key/--tls-ca given but --tls is off; add --tls on or --tls require");
        }
        if args.tls_verify_peer || !allow.is_empty() {
            bail!("--tls-verify-peer and --tls-allow need --tls require (or --tls on)");
        }
        return Ok((TlsMode::Off, allow));
    }
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        bail!(
            "--tls {:?} needs --tls-cert FILE and --tls-key FILE",
            args.tls
        );
    };
    if args.tls_verify_peer != args.tls_ca.is_some() {
        bail!("--tls-verify-peer and --tls-ca FILE go together: the CA is what client certificates must chain to");
    }
    if !allow.is_empty() && !args.tls_verify_peer {
        bail!(
            "--tls-allow matches verified client certificates: add --tls-verify-peer --tls-ca FILE"
        );
    }
    let files = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: args.tls_ca.clone(),
    };
    let server = TlsServer::load(files).context("cannot load TLS credentials")?;
    let mode = match args.tls {
        TlsArg::On => TlsMode::On(server),
        _ => TlsMode::Require(server),
    };
    Ok((mode, allow))
}

/// Re-reads the TLS credentials on every SIGHUP, for as long as the runtime
/// runs. Connections keep the session they have; new handshakes get the new
/// certificate (and CA). A failed reload is logged and changes nothing.
pub fn reload_on_sighup(mode: &TlsMode) {
    use tokio::signal::unix::{signal, SignalKind};
    let Some(server) = mode.server().cloned() else {
        return;
    };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; TLS credentials will not reload");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match server.reload() {
                Ok(()) => {
                    let f = server.files();
                    tracing::info!(cert = %f.cert.display(), key = %f.key.display(), "SIGHUP: reloaded TLS credentials");
                    eprintln!("reloaded TLS credentials");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SIGHUP: TLS credentials not reloaded; keeping the old ones");
                    eprintln!("TLS credentials not reloaded, keeping the old ones: {e}");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_arg_parses() {
        let a: AllowArg = "web@ov=client-a, host.example".parse().unwrap();
        assert_eq!(a.export, "web@ov");
        assert_eq!(a.ids, ["client-a", "host.example"]);
        assert!("web".parse::<AllowArg>().is_err());
        assert!("web=".parse::<AllowArg>().is_err());
        assert!("web=,".parse::<AllowArg>().is_err());
    }
}
