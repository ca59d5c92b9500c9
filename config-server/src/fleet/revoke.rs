//! Revocation: `rebound revoke COMPONENT` marks every unexpired certificate
//! of a component revoked and pushes the list to every PS and MT.

use crate::service::AdminService;
use rebound_proto::control as pb;
use tonic::{Response, Status};

/// `Admin.Revoke`.
pub async fn revoke(
    _svc: &AdminService,
    _req: pb::RevokeRequest,
) -> Result<Response<pb::RevokeResponse>, Status> {
    Err(Status::unimplemented("TODO(trust): revocation"))
}
