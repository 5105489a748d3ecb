//! The message type (command, event, document) an envelope's `mt` carries.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Kind;

/// The message types of asynchronous messaging (command, event, document): what a
/// message means to its receiver, independent of how it travels ([`Kind`]). Carried in
/// the header's `mt`; a header without one has its kind's default
/// ([`Header::effective_type`](super::Header::effective_type)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageType {
    /// A request for the receiver to do something (requests, and notifications unless
    /// marked otherwise).
    Command,
    /// Something notable that happened at the sender (`OrderCreated`): published events,
    /// or a notification marked so.
    Event,
    /// Data, for the receiver to interpret (replies, or a notification marked so).
    Document,
}

impl MessageType {
    /// The code carried in `mt`.
    pub fn code(self) -> u8 {
        match self {
            MessageType::Command => 1,
            MessageType::Event => 2,
            MessageType::Document => 3,
        }
    }

    /// The type for an `mt` code; `None` for a code this build does not know (a
    /// receiver treats it as absent: the kind's default).
    pub fn from_code(c: u64) -> Option<MessageType> {
        match c {
            1 => Some(MessageType::Command),
            2 => Some(MessageType::Event),
            3 => Some(MessageType::Document),
            _ => None,
        }
    }

    /// The type a message of `kind` has when its header names none; `None` for the
    /// node's own messages (HELLO, CANCEL, ...), which are none of the three.
    pub fn default_for(kind: Kind) -> Option<MessageType> {
        match kind {
            Kind::Request | Kind::Notification | Kind::GatherRequest => Some(MessageType::Command),
            Kind::Reply | Kind::GatherReply | Kind::ErrorReply => Some(MessageType::Document),
            Kind::Event => Some(MessageType::Event),
            _ => None,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageType::Command => "command",
            MessageType::Event => "event",
            MessageType::Document => "document",
        })
    }
}

impl Serialize for MessageType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for MessageType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MessageType, D::Error> {
        let c = u64::deserialize(d)?;
        MessageType::from_code(c)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown message type {c}")))
    }
}

/// `mt` as the header decoder reads it: an unknown code is absent.
pub(super) fn de_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MessageType>, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.and_then(MessageType::from_code))
}
