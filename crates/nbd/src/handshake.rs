//! Fixed-newstyle negotiation: greeting, option haggling, STARTTLS, and the
//! choice of export. Decoding lives in `option`; this file only sequences
//! reads and replies and keeps the negotiation state.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::Config;
use crate::device::Device;
use crate::error::{OptionError, SessionError};
use crate::exports::{Export, Exports};
use crate::io::BoxIo;
use crate::option::{self, ClientOption, InfoRequest, MetaRequest, OPTION_HEADER_LEN};
use crate::proto::*;
use crate::reply::{self, ReplyMode};
use crate::tls::PeerIdentity;

/// Option payloads above this are refused with NBD_REP_ERR_TOO_BIG: the
/// largest legitimate one is a meta-context query list, far below it.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Oversized option payloads up to this are skipped so the client can go on;
/// beyond it the client is treated as hostile and disconnected.
const MAX_SKIP_LEN: u32 = 16 << 20;

/// The state transmission starts from.
pub(crate) struct Negotiated {
    pub stream: BoxIo,
    pub export: Export,
    pub eflags: u16,
    pub mode: ReplyMode,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
    pub tls: bool,
    /// The verified client certificate's identity, for the log.
    pub client: Option<PeerIdentity>,
}

pub(crate) enum Outcome {
    Transmission(Box<Negotiated>),
    /// The client sent NBD_OPT_ABORT (a soft disconnect).
    Aborted,
}

/// Transmission flags for a device, given what was negotiated.
pub(crate) fn transmission_flags(dev: &dyn Device, mode: ReplyMode) -> u16 {
    let mut f = FLAG_HAS_FLAGS;
    if dev.is_read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        if dev.can_fua() {
            f |= FLAG_SEND_FUA;
        }
        if dev.can_trim() {
            f |= FLAG_SEND_TRIM;
        }
        if dev.can_zero() {
            f |= FLAG_SEND_WRITE_ZEROES;
            if dev.can_fast_zero() {
                f |= FLAG_SEND_FAST_ZERO;
            }
        }
    }
    if dev.can_flush() {
        f |= FLAG_SEND_FLUSH;
    }
    if mode.structured() {
        // Any read up to the maximum block size fits in one chunk.
        f |= FLAG_SEND_DF;
    }
    if dev.can_multi_conn() {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if dev.can_cache() {
        f |= FLAG_SEND_CACHE;
    }
    f
}

struct State<'a> {
    exports: &'a Arc<dyn Exports>,
    config: &'a Config,
    fixed_newstyle: bool,
    no_zeroes: bool,
    tls: bool,
    /// Set once a TLS client presented a certificate the verifier accepted.
    peer: Option<PeerIdentity>,
    mode: ReplyMode,
    /// Export name of the last successful SET_META_CONTEXT that selected
    /// `base:allocation`.
    meta_export: Option<String>,
}

async fn send(stream: &mut BoxIo, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn reply_err(stream: &mut BoxIo, code: u32, rtype: u32, msg: &str) -> std::io::Result<()> {
    send(stream, &reply::option_reply(code, rtype, msg.as_bytes())).await
}

/// Runs the handshake until the client enters transmission or leaves.
/// Resolves early with `SessionError::Shutdown` when `shutdown` flips while
/// the server waits for the next option.
pub(crate) async fn negotiate(
    mut stream: BoxIo,
    exports: &Arc<dyn Exports>,
    config: &Config,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Outcome, SessionError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend(NBD_MAGIC.to_be_bytes());
    greeting.extend(IHAVEOPT.to_be_bytes());
    greeting.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(&mut stream, &greeting).await?;

    let flags = option::decode_client_flags(stream.read_u32().await?)?;
    let mut st = State {
        exports,
        config,
        fixed_newstyle: flags.fixed_newstyle,
        no_zeroes: flags.no_zeroes,
        tls: false,
        peer: None,
        mode: ReplyMode::Simple,
        meta_export: None,
    };

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        tokio::select! {
            r = stream.read_exact(&mut hdr) => { r?; }
            _ = shutdown.wait_for(|s| *s) => return Err(SessionError::Shutdown),
        }
        let Some(h) = option::decode_option_header(&hdr)? else {
            unreachable!("read a full header")
        };

        if h.len > MAX_OPTION_LEN {
            if h.len > MAX_SKIP_LEN || h.code == OPT_EXPORT_NAME || !st.fixed_newstyle {
                return Err(SessionError::OptionTooLarge { len: h.len });
            }
            let mut limited = (&mut stream).take(h.len as u64);
            tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            reply_err(
                &mut stream,
                h.code,
                REP_ERR_TOO_BIG,
                "option data too large",
            )
            .await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        stream.read_exact(&mut data).await?;

        // Without fixed newstyle the client cannot parse option replies, so
        // EXPORT_NAME is the only option we can act on.
        if !st.fixed_newstyle && h.code != OPT_EXPORT_NAME {
            return Err(OptionError::Invalid {
                code: h.code,
                reason: "option needs fixed newstyle",
            }
            .into());
        }

        let opt = match option::decode_option(h.code, &data) {
            Ok(opt) => opt,
            Err(OptionError::Invalid { code, reason }) if code != OPT_EXPORT_NAME => {
                reply_err(&mut stream, code, REP_ERR_INVALID, reason).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };

        // FORCEDTLS: everything but STARTTLS and ABORT waits for TLS.
        if config.tls.required() && !st.tls {
            match opt {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(_) => return Err(SessionError::TlsRequired),
                _ => {
                    reply_err(&mut stream, h.code, REP_ERR_TLS_REQD, "TLS is required").await?;
                    continue;
                }
            }
        }

        match opt {
            ClientOption::Abort => {
                // The client may already have hung up; that is fine.
                let _ = send(&mut stream, &reply::option_reply(h.code, REP_ACK, b"")).await;
                return Ok(Outcome::Aborted);
            }
            ClientOption::List => {
                let mut out = Vec::new();
                let allowed = st
                    .exports
                    .list()
                    .into_iter()
                    .filter(|e| st.permits(&e.name));
                for e in allowed {
                    let data = reply::rep_server(&e.name, e.description.as_deref());
                    out.extend(reply::option_reply(h.code, REP_SERVER, &data));
                }
                out.extend(reply::option_reply(h.code, REP_ACK, b""));
                send(&mut stream, &out).await?;
            }
            ClientOption::StartTls => {
                let Some(server) = config.tls.server() else {
                    reply_err(&mut stream, h.code, REP_ERR_POLICY, "TLS is disabled").await?;
                    continue;
                };
                if st.tls {
                    reply_err(&mut stream, h.code, REP_ERR_INVALID, "TLS already active").await?;
                    continue;
                }
                send(&mut stream, &reply::option_reply(h.code, REP_ACK, b"")).await?;
                // With a client CA, rustls refuses unverified clients here,
                // before they can send another option.
                let tls = server
                    .acceptor()
                    .accept(stream)
                    .await
                    .map_err(SessionError::Tls)?;
                st.peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(PeerIdentity::from_cert);
                stream = Box::new(tls);
                // "the server MUST NOT preserve any negotiation state"
                st.tls = true;
                st.mode = ReplyMode::Simple;
                st.meta_export = None;
            }
            ClientOption::StructuredReply => {
                let (rtype, msg) = match st.mode {
                    ReplyMode::Simple => (REP_ACK, ""),
                    ReplyMode::Structured => (REP_ERR_INVALID, "structured replies already on"),
                    ReplyMode::Extended => (
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    ),
                };
                if rtype == REP_ACK {
                    st.mode = ReplyMode::Structured;
                }
                reply_err(&mut stream, h.code, rtype, msg).await?;
            }
            ClientOption::ExtendedHeaders => {
                let (rtype, msg) = if !config.extended_headers {
                    (REP_ERR_UNSUP, "extended headers are disabled")
                } else if st.mode == ReplyMode::Extended {
                    (REP_ERR_INVALID, "extended headers already negotiated")
                } else {
                    // Extended headers imply structured replies.
                    st.mode = ReplyMode::Extended;
                    (REP_ACK, "")
                };
                reply_err(&mut stream, h.code, rtype, msg).await?;
            }
            ClientOption::ListMetaContext(req) => {
                st.meta_context(&mut stream, h.code, req, false).await?;
            }
            ClientOption::SetMetaContext(req) => {
                st.meta_context(&mut stream, h.code, req, true).await?;
            }
            ClientOption::Info(req) => {
                st.info(&mut stream, h.code, req).await?;
            }
            ClientOption::Go(req) => {
                if let Some((export, eflags)) = st.info(&mut stream, h.code, req.clone()).await? {
                    let block_status = st.mode.structured()
                        && st.meta_export.as_deref() == Some(req.name.as_str());
                    return Ok(Outcome::Transmission(Box::new(Negotiated {
                        stream,
                        export,
                        eflags,
                        mode: st.mode,
                        block_status,
                        tls: st.tls,
                        client: st.peer,
                    })));
                }
            }
            ClientOption::ExportName(name) => {
                let Some(export) = st.open(&name).await? else {
                    // "If the chosen export does not exist ... the server
                    // MUST terminate the session."
                    return Err(SessionError::UnknownExport { name });
                };
                if !st.permits(&export.name) {
                    return Err(st.denied(&export.name));
                }
                let eflags = transmission_flags(export.device.as_ref(), st.mode);
                let size = export.device.size();
                send(
                    &mut stream,
                    &reply::export_name_reply(size, eflags, st.no_zeroes),
                )
                .await?;
                let block_status =
                    st.mode.structured() && st.meta_export.as_deref() == Some(name.as_str());
                return Ok(Outcome::Transmission(Box::new(Negotiated {
                    stream,
                    export,
                    eflags,
                    mode: st.mode,
                    block_status,
                    tls: st.tls,
                    client: st.peer,
                })));
            }
            ClientOption::Unknown(code) => {
                let msg = format!("option {code} is not supported");
                reply_err(&mut stream, code, REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

impl State<'_> {
    /// The TLS allow-list's verdict on `export` for this client.
    fn permits(&self, export: &str) -> bool {
        self.config.tls_allow.permits(export, self.peer.as_ref())
    }

    fn denied(&self, export: &str) -> SessionError {
        let client = match (&self.peer, self.tls) {
            (Some(p), _) => p.to_string(),
            (None, true) => "(no certificate)".to_string(),
            (None, false) => "(plain text)".to_string(),
        };
        SessionError::ExportDenied {
            name: export.to_string(),
            client,
        }
    }

    /// Resolves an export name on a blocking thread (opening a synthesized
    /// image may compute its layout).
    async fn open(&self, name: &str) -> Result<Option<Export>, SessionError> {
        let exports = self.exports.clone();
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || exports.open(&owned))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .map_err(|source| SessionError::OpenExport {
                name: name.to_string(),
                source,
            })
    }

    async fn exists(&self, name: &str) -> std::io::Result<bool> {
        let exports = self.exports.clone();
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || exports.exists(&owned))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// Answers NBD_OPT_INFO / NBD_OPT_GO. Returns the export when the reply
    /// ended in NBD_REP_ACK.
    async fn info(
        &self,
        stream: &mut BoxIo,
        code: u32,
        req: InfoRequest,
    ) -> Result<Option<(Export, u16)>, SessionError> {
        let export = match self.open(&req.name).await {
            Ok(Some(e)) => e,
            Ok(None) => {
                let msg = format!("unknown export {:?}", req.name);
                reply_err(stream, code, REP_ERR_UNKNOWN, &msg).await?;
                return Ok(None);
            }
            Err(e) => {
                let kind = match &e {
                    SessionError::OpenExport { source, .. } => source.kind(),
                    _ => std::io::ErrorKind::Other,
                };
                reply_err(stream, code, refusal_code(kind), &e.to_string()).await?;
                return Ok(None);
            }
        };
        if !self.permits(&export.name) {
            let msg = self.denied(&export.name).to_string();
            reply_err(stream, code, REP_ERR_POLICY, &msg).await?;
            return Ok(None);
        }
        let dev = export.device.as_ref();
        let eflags = transmission_flags(dev, self.mode);
        let mut out = reply::option_reply(code, REP_INFO, &reply::info_export(dev.size(), eflags));
        if req.requests.contains(&INFO_NAME) {
            let data = reply::info_string(INFO_NAME, &export.name);
            out.extend(reply::option_reply(code, REP_INFO, &data));
        }
        if req.requests.contains(&INFO_DESCRIPTION) {
            if let Some(d) = dev.description() {
                let d = truncate(&d, MAX_STRING_LEN);
                let data = reply::info_string(INFO_DESCRIPTION, d);
                out.extend(reply::option_reply(code, REP_INFO, &data));
            }
        }
        // Sent unasked too: our constraints are the defaults apart from the
        // maximum, and a client that did not ask may assume only 32 MiB,
        // which is below ours.
        let bs = self.config.block_size;
        let data = reply::info_block_size(bs.min, bs.preferred, bs.max);
        out.extend(reply::option_reply(code, REP_INFO, &data));
        out.extend(reply::option_reply(code, REP_ACK, b""));
        send(stream, &out).await?;
        Ok(Some((export, eflags)))
    }

    /// Answers LIST_META_CONTEXT and SET_META_CONTEXT. We know one context,
    /// `base:allocation`; queries in other namespaces are ignored as the spec
    /// requires.
    async fn meta_context(
        &mut self,
        stream: &mut BoxIo,
        code: u32,
        req: MetaRequest,
        set: bool,
    ) -> Result<(), SessionError> {
        if set {
            // "Issuing this command replaces all previously-set metadata
            // contexts (including when this command fails)".
            self.meta_export = None;
            if !self.mode.structured() {
                let msg = "structured replies are required first";
                reply_err(stream, code, REP_ERR_INVALID, msg).await?;
                return Ok(());
            }
        }
        if !self.permits(&req.export) {
            let msg = self.denied(&req.export).to_string();
            reply_err(stream, code, REP_ERR_POLICY, &msg).await?;
            return Ok(());
        }
        match self.exists(&req.export).await {
            Ok(true) => {}
            Ok(false) => {
                let msg = format!("unknown export {:?}", req.export);
                reply_err(stream, code, REP_ERR_UNKNOWN, &msg).await?;
                return Ok(());
            }
            Err(e) => {
                reply_err(stream, code, refusal_code(e.kind()), &e.to_string()).await?;
                return Ok(());
            }
        }
        let selected = if set {
            req.queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            // LIST: no queries means "everything"; `base:` is a wildcard.
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == "base:" || q == BASE_ALLOCATION)
        };
        let mut out = Vec::new();
        if selected {
            // Ids in LIST replies are reserved and "SHOULD be set to zero".
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let data = reply::rep_meta_context(id, BASE_ALLOCATION);
            out.extend(reply::option_reply(code, REP_META_CONTEXT, &data));
            if set {
                self.meta_export = Some(req.export);
            }
        }
        out.extend(reply::option_reply(code, REP_ACK, b""));
        send(stream, &out).await?;
        Ok(())
    }
}

/// The NBD error for an export that cannot be opened (see [`Exports::open`]).
fn refusal_code(kind: std::io::ErrorKind) -> u32 {
    use std::io::ErrorKind as K;
    match kind {
        K::PermissionDenied | K::ResourceBusy => REP_ERR_POLICY,
        K::Unsupported => REP_ERR_UNSUP,
        _ => REP_ERR_UNKNOWN,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
