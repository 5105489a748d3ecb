//! The handler registry and the catalog it announces: typed handlers erased to
//! `bytes → bytes` functions, and the context they receive.
//!
//! This module owns which handler serves which target at which version, and the catalog
//! revision peers use to order HELLOs. It never runs a handler (that is `respond`) and
//! never sends anything (registering a handler makes the membership announce it).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::calls::far_instant_after;

use crate::codec::{self, codes, ErrorBody, Id, MessageType, Version};

tokio::task_local! {
    /// The deadline of the handler this task is running, if it has one.
    static HANDLER_DEADLINE: Option<Instant>;
}

/// The deadline of the handler the current code runs in (called from inside it), if any:
/// the calls it makes inherit what is left of it.
pub(super) fn inherited_deadline() -> Option<Instant> {
    HANDLER_DEADLINE.try_with(|d| *d).ok().flatten()
}

/// What a handler learns about the message it handles.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// What the message is: a command, an event or a document (the sender's mark, else
    /// its kind's default: requests, notifications and gather requests are commands).
    pub message_type: MessageType,
    /// Cancelled when the caller gives up on this request (see [`Context::cancelled`]).
    pub(super) cancel: CancellationToken,
}

impl Context {
    /// Whether the caller has given up on this request (its deadline passed, or it
    /// dropped its handle, and said so with a CANCEL). A handler that awaits is dropped
    /// at that point anyway; this is for work it handed elsewhere (a spawned task, a
    /// thread) that should stop too.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Completes when the caller gives up on this request (see
    /// [`Context::is_cancelled`]); never, for a notification or a gather request.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

/// An error a handler returns; it travels back to the caller as a remote error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
#[non_exhaustive]
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

pub(super) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, ErrorBody>> + Send>>;
pub(super) type ErasedHandler = Arc<dyn Fn(Bytes, Context) -> HandlerFuture + Send + Sync>;

/// A registered handler and the version it serves.
struct Entry {
    version: Version,
    handler: ErasedHandler,
}

/// Wraps a typed handler: decode the request, run, encode the response. Panics in the
/// handler become a `handler_panicked` error body.
pub(super) fn erase<Req, Resp, F, Fut>(f: F) -> ErasedHandler
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
            // Calls the handler makes inherit what is left of its deadline.
            let deadline = ctx.deadline.map(far_instant_after);
            let out = HANDLER_DEADLINE
                .scope(
                    deadline,
                    AssertUnwindSafe(async move { f(req, ctx).await }).catch_unwind(),
                )
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
struct Tables {
    methods: HashMap<String, Entry>,
    gathers: HashMap<String, Entry>,
    /// Bumped on every change (see [`codec::Catalog::revision`]).
    revision: u64,
}

/// The registry. See the [module documentation](self).
#[derive(Default)]
pub(super) struct Registry {
    tables: RwLock<Tables>,
}

/// Which table a target is looked up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    /// Requests and notifications (`service.method`).
    Methods,
    /// Gather requests (a topic).
    Gathers,
}

impl Registry {
    /// Registers (or replaces) the handler of `target` in `table`.
    pub(super) fn insert(
        &self,
        table: Table,
        target: &str,
        version: Version,
        handler: ErasedHandler,
    ) {
        let mut t = self.tables.write();
        let entry = Entry { version, handler };
        match table {
            Table::Methods => t.methods.insert(target.to_string(), entry),
            Table::Gathers => t.gathers.insert(target.to_string(), entry),
        };
        t.revision += 1;
    }

    /// What this node serves, as announced in HELLO.
    pub(super) fn catalog(&self) -> codec::Catalog {
        let t = self.tables.read();
        let list =
            |m: &HashMap<String, Entry>| m.iter().map(|(k, e)| (k.clone(), e.version)).collect();
        codec::Catalog {
            methods: list(&t.methods),
            gathers: list(&t.gathers),
            revision: t.revision,
        }
    }

    /// The handler for `target` that serves `wanted`, or the error body explaining why
    /// there is none.
    pub(super) fn lookup(
        &self,
        table: Table,
        target: &str,
        wanted: Option<Version>,
    ) -> Result<ErasedHandler, ErrorBody> {
        let t = self.tables.read();
        let entries = match table {
            Table::Methods => &t.methods,
            Table::Gathers => &t.gathers,
        };
        let Some(e) = entries.get(target) else {
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
}
