//! Certificate renewal over the control plane: a component's current
//! certificate authenticates its request for the next one.

use crate::control::ControlService;
use rebound_proto::control as pb;
use tonic::{Request, Response, Status};

/// `Control.Renew`.
pub async fn renew(
    _svc: &ControlService,
    _req: Request<pb::RenewRequest>,
) -> Result<Response<pb::RenewResponse>, Status> {
    Err(Status::unimplemented("TODO(trust): renewal"))
}
