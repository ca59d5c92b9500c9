//! The agent's end of the `Ingest` stream, with frames encoded straight from
//! the sender's outbox into tonic's buffer.
//!
//! Why: with the generated client, a frame is copied twice before TLS sees
//! it: once into its wire bytes (the `bytes frame` field of an
//! `IngestRequest`), and once more by prost into tonic's encode buffer. A
//! profile of text-like churn put the first copy at a tenth of the agent's
//! CPU. This codec writes the same protobuf bytes as prost would (field 2,
//! length-delimited, holding the encoded frame), taking the header and the
//! body from the [`Frame`] the outbox keeps for resending, so each frame is
//! copied once. The process server decodes it with its generated code; the
//! bytes on the wire do not change.

use std::sync::Arc;

use prost::bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;
use rebound_common::frame::Frame;
use rebound_proto::ingest_request::Msg as ReqMsg;
use rebound_proto::{IngestRequest, IngestResponse, ReplicationInfo};
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder};

/// The `frame` field's number in `IngestRequest` (proto/rebound.proto).
const FRAME_FIELD: u32 = 2;

/// One message the agent sends on the `Ingest` stream.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// The first message of every stream.
    Hello(ReplicationInfo),
    /// A sealed frame, shared with the outbox until the PS holds it.
    Frame(Arc<Frame>),
}

/// The codec of the agent's `Ingest` calls: [`Outgoing`] out, the generated
/// `IngestResponse` in.
#[derive(Debug, Default, Clone)]
pub struct IngestCodec;

impl Codec for IngestCodec {
    type Encode = Outgoing;
    type Decode = IngestResponse;
    type Encoder = OutgoingEncoder;
    type Decoder = ProstDecoder<IngestResponse>;

    fn encoder(&mut self) -> OutgoingEncoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<IngestRequest, IngestResponse>::default().decoder()
    }
}

#[derive(Debug)]
pub struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outgoing::Hello(info) => IngestRequest {
                msg: Some(ReqMsg::Hello(info)),
            }
            .encode(dst)
            .map_err(|e| Status::internal(format!("encoding the hello: {e}"))),
            Outgoing::Frame(frame) => {
                // One allocation for the whole message, not growth steps.
                dst.reserve(frame.encoded_len() + 2 * encoded_len_varint(u64::MAX));
                encode_frame(&frame, dst);
                Ok(())
            }
        }
    }
}

/// Writes `IngestRequest { msg: Frame(frame.to_bytes()) }` as protobuf.
fn encode_frame(frame: &Frame, dst: &mut impl BufMut) {
    let head = frame.head_bytes();
    let len = head.len() + frame.body.len();
    encode_key(FRAME_FIELD, WireType::LengthDelimited, dst);
    encode_varint(len as u64, dst);
    dst.put_slice(&head);
    dst.put_slice(&frame.body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_common::frame::FrameBuilder;

    #[test]
    fn a_frame_encodes_as_the_generated_message_does() {
        let mut b = FrameBuilder::new("machine-7", 41);
        b.push_write(0, 4096, &[5u8; 300 << 10]);
        b.push_write(1, 0, &[6u8; 512]);
        let frame = b.finish();
        let mut ours = Vec::new();
        encode_frame(&frame, &mut ours);
        let generated = IngestRequest {
            msg: Some(ReqMsg::Frame(frame.to_bytes().into())),
        }
        .encode_to_vec();
        assert_eq!(ours, generated);
        let back = IngestRequest::decode(&ours[..]).unwrap();
        let Some(ReqMsg::Frame(bytes)) = back.msg else {
            panic!("not a frame: {back:?}");
        };
        assert_eq!(Frame::parse(&bytes).unwrap().records().unwrap().len(), 2);
    }
}
