//! Error codes peerwire itself puts in error replies (PROTOCOL.md lists what each means).

/// No handler for the target on this node.
pub const NO_HANDLER: &str = "no_handler";
/// The caller asked for a method version this node does not serve.
pub const INCOMPATIBLE_VERSION: &str = "incompatible_version";
/// The request payload could not be decoded into the handler's type.
pub const BAD_REQUEST: &str = "bad_request";
/// The handler panicked.
pub const HANDLER_PANICKED: &str = "handler_panicked";
/// The envelope's major version is not one this node speaks.
pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
/// The envelope's kind is not one this node knows.
pub const UNSUPPORTED_KIND: &str = "unsupported_kind";
/// The node is shutting down.
pub const SHUTTING_DOWN: &str = "shutting_down";
/// The caller's connection already has as many requests running as a connection
/// may; the request was not run (retry later).
pub const OVERLOADED: &str = "overloaded";
