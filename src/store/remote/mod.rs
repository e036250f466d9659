//! A remote store: the same content-addressed layout in an object store (S3, or a local
//! directory for tests and shared filesystems), and the cache that fetches from it.
//!
//! ```text
//! s3://BUCKET/PREFIX/          (or file:///DIR/)
//! ├── objects/ab/cdef…         object bytes, named by their BLAKE3 like local objects
//! ├── outboard/ab/cdef…        outboards of objects over 256 KiB (format in `outboard`)
//! ├── trees/ab/cdef…           tree manifests, as opaque bytes
//! ├── images/NAME              image records, as opaque bytes
//! └── traces/NAME              prefetch traces of images (see [`trace`])
//! ```
//!
//! Content-addressed uploads are create-only: an existing key already holds the same bytes,
//! so "already exists" is success. Image records are names and are overwritten.
//!
//! The rest of tessera is synchronous; [`Remote`] runs `object_store`'s futures on a small
//! runtime of its own and waits for them on a channel, so it can be called from any thread,
//! a tokio worker's blocking section included. Network trouble is bounded: a connect
//! timeout of [`CONNECT_TIMEOUT`], requests of at most [`REQUEST_TIMEOUT`] and a retry
//! budget of [`RETRY_BUDGET`], all well below the 30 s a kernel NBD client waits.
//!
//! [`cache`] fetches object ranges on demand into the local store (what `serve --remote`
//! reads through); [`sync`] copies whole images either way (`store push`/`pull`).

pub mod cache;
pub mod counters;
mod lru;
pub mod origin;
pub mod sync;
pub mod trace;

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use super::ObjectId;

/// How long opening a connection to the backend may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take, retries not included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long retries of one request may go on.
pub const RETRY_BUDGET: Duration = Duration::from_secs(4);
/// The longest any one operation waits, whatever the backend does.
const OPERATION_LIMIT: Duration = Duration::from_secs(15);

/// Why a remote operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid remote URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("cannot open the remote store {url}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{key} is not in the remote store")]
    NotFound { key: String },
    #[error("cannot {op} {key} in the remote store")]
    Backend {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{op} {key}: no answer from the remote store within {}s", .limit.as_secs())]
    Timeout {
        op: &'static str,
        key: String,
        limit: Duration,
    },
    #[error("cannot start the remote store's runtime")]
    Runtime(#[source] std::io::Error),
}

impl RemoteError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, RemoteError::NotFound { .. })
    }
}

/// What a key in the remote store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Object,
    Outboard,
    Tree,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Object => "objects",
            Kind::Outboard => "outboard",
            Kind::Tree => "trees",
        }
    }
}

/// An opened remote store.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Remote {
    /// Open `s3://BUCKET[/PREFIX]` (credentials and region from the `AWS_*` environment;
    /// `endpoint`, else `$AWS_ENDPOINT`, for servers other than AWS) or `file:///DIR`.
    pub fn open(url: &str, endpoint: Option<&str>) -> Result<Remote, RemoteError> {
        let bad = |why: &str| RemoteError::Url {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if let Some(rest) =
            url.strip_prefix("s3://")
        {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket name"));
            }
            let options = ClientOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT);
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(options)
                .with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(50),
                        max_backoff: Duration::from_millis(500),
                        base: 2.0,
                    },
                    max_retries: 3,
                    retry_timeout: RETRY_BUDGET,
                })
                .with_conditional_put(S3ConditionalPut::ETagMatch);
            let endpoint = endpoint
                .map(str::to_owned)
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                .or_else(|| std::env::var("AWS_ENDPOINT").ok());
            if let Some(endpoint) = &endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            // `with_client_options` resets allow-http (shared/README.md); an http
            // endpoint or AWS_ALLOW_HTTP=true turns it back on.
            let allow_http = endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
                || std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
            builder = builder.with_allow_http(allow_http);
            let s3 = builder.build().map_err(|source| RemoteError::Open {
                url: url.to_owned(),
                source,
            })?;
            (Arc::new(s3), prefix.trim_matches('/').to_owned())
        } else if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("file:// needs an absolute path"));
            }
            std::fs::create_dir_all(dir).map_err(|e| bad(&e.to_string()))?;
            let fs = LocalFileSystem::new_with_prefix(dir).map_err(|source| RemoteError::Open {
                url: url.to_owned(),
                source,
            })?;
            (Arc::new(fs), String::new())
        } else {
            return Err(bad("expected s3://BUCKET/PREFIX or file:///DIR"));
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-remote")
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        Ok(Remote {
            url: url.to_owned(),
            store,
            prefix,
            runtime: Some(runtime),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// The key of `id` of kind `kind`.
    pub fn content_key(&self, kind: Kind, id: &ObjectId) -> Key {
        let hex = id.to_hex();
        self.key(&format!("{}/{}/{}", kind.dir(), &hex[..2], &hex[2..]))
    }

    fn image_key(&self, name: &str) -> Key {
        self.key(&format!("images/{name}"))
    }

    /// Run `fut` on the remote's runtime and wait for it, at most [`OPERATION_LIMIT`].
    fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &Key,
        fut: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, RemoteError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let rt = self.runtime.as_ref().expect("runtime lives until drop");
        rt.spawn(async move {
            let r = tokio::time::timeout(OPERATION_LIMIT, fut).await;
            let _ = tx.send(r);
        });
        let timeout = || RemoteError::Timeout {
            op,
            key: key.to_string(),
            limit: OPERATION_LIMIT,
        };
        match rx.recv() {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(object_store::Error::NotFound { .. }))) => Err(RemoteError::NotFound {
                key: key.to_string(),
            }),
            Ok(Ok(Err(source))) => Err(RemoteError::Backend {
                op,
                key: key.to_string(),
                source,
            }),
            Ok(Err(_)) | Err(_) => Err(timeout()),
        }
    }

    /// The whole of `key`.
    fn get(&self, key: Key) -> Result<Bytes, RemoteError> {
        let store = self.store.clone();
        let k = key.clone();
        self.run(
            "read",
            &key,
            async move { store.get(&k).await?.bytes().await },
        )
    }

    /// Bytes `range` of `key`.
    fn get_range(&self, key: Key, range: Range<u64>) -> Result<Bytes, RemoteError> {
        let store = self.store.clone();
        let k = key.clone();
        self.run(
            "read",
            &key,
            async move { store.get_range(&k, range).await },
        )
    }

    /// Create `key` with `bytes`; true if it was created, false if it already existed.
    fn put_new(&self, key: Key, bytes: Bytes) -> Result<bool, RemoteError> {
        let store = self.store.clone();
        let k = key.clone();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.run("upload", &key, async move {
            match store.put_opts(&k, PutPayload::from(bytes), opts).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                // S3 answers 412 to If-None-Match on an existing key.
                Err(object_store::Error::Precondition { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// The whole content `id` of kind `kind`.
    pub fn get_content(&self, kind: Kind, id: &ObjectId) -> Result<Bytes, RemoteError> {
        self.get(self.content_key(kind, id))
    }

    /// Bytes `range` of object `id`.
    pub fn get_object_range(&self, id: &ObjectId, range: Range<u64>) -> Result<Bytes, RemoteError> {
        self.get_range(self.content_key(Kind::Object, id), range)
    }

    /// Upload content `id` unless it is there; true if this call created it.
    pub fn put_content(
        &self,
        kind: Kind,
        id: &ObjectId,
        bytes: Bytes,
    ) -> Result<bool, RemoteError> {
        self.put_new(self.content_key(kind, id), bytes)
    }

    /// The ids of every content of kind `kind`.
    pub fn list_content(&self, kind: Kind) -> Result<Vec<ObjectId>, RemoteError> {
        let top = self.key(kind.dir());
        let store = self.store.clone();
        let t = top.clone();
        let metas = self.run("list", &top, async move {
            store.list(Some(&t)).try_collect::<Vec<_>>().await
        })?;
        let mut ids = Vec::new();
        for meta in metas {
            let parts: Vec<_> = meta.location.parts().collect();
            if let [.., fan, rest] = parts.as_slice() {
                if let Ok(id) = format!("{}{}", fan.as_ref(), rest.as_ref()).parse() {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// Names of the remote's images, sorted.
    pub fn list_images(&self) -> Result<Vec<String>, RemoteError> {
        let top = self.key("images");
        let store = self.store.clone();
        let t = top.clone();
        let metas = self.run("list", &top, async move {
            store.list(Some(&t)).try_collect::<Vec<_>>().await
        })?;
        let mut names: Vec<String> = metas
            .iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The prefetch trace of image `name`.
    pub fn get_trace(&self, name: &str) -> Result<Bytes, RemoteError> {
        self.get(self.key(&format!("traces/{name}")))
    }

    /// Store the prefetch trace of image `name` unless it has one.
    pub fn put_trace(&self, name: &str, bytes: Bytes) -> Result<bool, RemoteError> {
        self.put_new(self.key(&format!("traces/{name}")), bytes)
    }

    pub fn get_image(&self, name: &str) -> Result<Bytes, RemoteError> {
        self.get(self.image_key(name))
    }

    /// Create or replace the image record `name`.
    pub fn put_image(&self, name: &str, bytes: Bytes) -> Result<(), RemoteError> {
        let store = self.store.clone();
        let key = self.image_key(name);
        let k = key.clone();
        self.run("upload", &key, async move {
            store.put(&k, PutPayload::from(bytes)).await.map(|_| ())
        })
    }
}
