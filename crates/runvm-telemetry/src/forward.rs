//! Sending a guest's span batch to the collector as the guest encoded it: a gRPC unary call of
//! OTLP's `TraceService/Export` whose request body is the guest's bytes, never decoded on the
//! host (a hostile guest's 2 MiB could decode to hundreds of MiB of nested messages). The
//! collector decodes it, and refuses what is not a valid request.

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Status;

/// OTLP's trace export method.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Sends `encoded` (an `ExportTraceServiceRequest` as the guest encoded it) over `channel`.
pub(crate) async fn export_encoded(channel: Channel, encoded: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the collector is not ready: {e}")))?;
    grpc.unary(
        tonic::Request::new(encoded),
        PathAndQuery::from_static(EXPORT_PATH),
        PassThrough,
    )
    .await
    .map(|_| ())
}

/// Writes the request's bytes as they are; reads the answer's and discards them (an
/// `ExportTraceServiceResponse` says only what the collector rejected, which is not ours to
/// act on).
#[derive(Debug, Clone, Copy, Default)]
struct PassThrough;

impl Codec for PassThrough {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> PassThrough {
        PassThrough
    }

    fn decoder(&mut self) -> PassThrough {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}
