//! Control-channel messages (the `Control` service of proto/control.proto)
//! as the CS decodes a component's stream and renewal, and as an agent, PS
//! or MT decodes the CS's: every message decodes without panicking, and
//! what decodes re-encodes canonically.

use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control::{
    component_message, ComponentMessage, RenewRequest, RenewResponse, ServerMessage,
};

pub fn control(data: &[u8]) {
    if let Some(m) = round_trips::<ComponentMessage>(data) {
        if let Some(component_message::Msg::Hello(h)) = &m.msg {
            // The CS matches the hello's role against the certificate's.
            let _ = Role::parse(&h.role);
        }
    }
    round_trips::<ServerMessage>(data);
    round_trips::<RenewRequest>(data);
    round_trips::<RenewResponse>(data);
}

/// Decodes `data` as `M`; what decodes encodes to bytes that decode to the
/// same message and encode to the same bytes again (prost drops unknown
/// fields and keeps the last of a repeated scalar field, so the first
/// encoding is the canonical one).
pub(crate) fn round_trips<M: Message + Default + PartialEq>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let once = m.encode_to_vec();
    assert_eq!(once.len(), m.encoded_len());
    let back = M::decode(once.as_slice()).expect("an encoded message decodes");
    assert!(back == m, "a decoded message re-encodes to another message");
    assert_eq!(back.encode_to_vec(), once, "encoding is not canonical");
    Some(m)
}
