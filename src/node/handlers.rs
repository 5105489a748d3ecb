//! Handler registry: typed handlers erased to `bytes → bytes` functions, and the
//! context they receive.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, codes, ErrorBody, Id, Version};

/// What a handler learns about the message it handles.
#[derive(Debug, Clone)]
pub struct Context {
    /// The message id.
    pub message_id: Id,
    /// The node that sent it.
    pub sender: Id,
    /// `service.method` or topic.
    pub target: String,
    /// Time the caller still allowed when the message arrived.
    pub deadline: Option<Duration>,
    /// The string headers it carried (trace context).
    pub headers: BTreeMap<String, String>,
    /// The shard key, if any.
    pub shard_key: Option<String>,
}

/// An error a handler returns; it travels back to the caller as a remote error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// A stable machine-readable code, chosen by the service.
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

impl HandlerError {
    /// An error with a code and a message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        HandlerError {
            code: code.into(),
            message: message.into(),
        }
    }
}

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, ErrorBody>> + Send>>;
pub(crate) type ErasedHandler = Arc<dyn Fn(Bytes, Context) -> HandlerFuture + Send + Sync>;

/// A registered handler and the version it serves.
#[derive(Clone)]
pub(crate) struct Entry {
    pub version: Version,
    pub handler: ErasedHandler,
}

/// Wraps a typed handler: decode the request, run, encode the response. Panics in the
/// handler become a `handler_panicked` error body.
pub(crate) fn erase<Req, Resp, F, Fut>(f: F) -> ErasedHandler
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Req, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, HandlerError>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |payload: Bytes, ctx: Context| {
        let f = f.clone();
        Box::pin(async move {
            let req: Req = codec::decode_payload(&payload).map_err(|e| ErrorBody {
                code: codes::BAD_REQUEST.into(),
                message: e.to_string(),
            })?;
            let target = ctx.target.clone();
            // The handler is user code: a panic must become an error reply, not take the
            // node (or even this connection) down.
            // The call itself is inside the guarded future too: a closure may panic
            // before it returns its future.
            let out = AssertUnwindSafe(async move { f(req, ctx).await })
                .catch_unwind()
                .await;
            match out {
                Ok(Ok(resp)) => codec::encode_payload(&resp).map_err(|e| ErrorBody {
                    code: codes::HANDLER_PANICKED.into(),
                    message: format!("cannot encode the response: {e}"),
                }),
                Ok(Err(e)) => Err(ErrorBody {
                    code: e.code,
                    message: e.message,
                }),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into());
                    tracing::error!(%target, panic = %what, "handler panicked");
                    Err(ErrorBody {
                        code: codes::HANDLER_PANICKED.into(),
                        message: format!("handler for {target} panicked: {what}"),
                    })
                }
            }
        }) as HandlerFuture
    })
}

/// Handlers by target, for requests/notifications and for gathers.
#[derive(Default)]
pub(crate) struct Registry {
    pub methods: HashMap<String, Entry>,
    pub gathers: HashMap<String, Entry>,
    /// Bumped on every change (see [`codec::Catalog::revision`]).
    pub revision: u64,
}

impl Registry {
    pub fn catalog(&self) -> codec::Catalog {
        codec::Catalog {
            methods: self
                .methods
                .iter()
                .map(|(k, e)| (k.clone(), e.version))
                .collect(),
            gathers: self
                .gathers
                .iter()
                .map(|(k, e)| (k.clone(), e.version))
                .collect(),
            revision: self.revision,
        }
    }
}

/// Finds the handler for `target` that serves `wanted`, or the error body explaining why
/// there is none.
pub(crate) fn lookup(
    table: &HashMap<String, Entry>,
    target: &str,
    wanted: Option<Version>,
) -> Result<ErasedHandler, ErrorBody> {
    let Some(e) = table.get(target) else {
        return Err(ErrorBody {
            code: codes::NO_HANDLER.into(),
            message: format!("no handler for {target} on this node"),
        });
    };
    if let Some(w) = wanted {
        if !e.version.serves(w) {
            return Err(ErrorBody {
                code: codes::INCOMPATIBLE_VERSION.into(),
                message: format!(
                    "{target} is served at version {}, caller wants {w}",
                    e.version
                ),
            });
        }
    }
    Ok(e.handler.clone())
}
