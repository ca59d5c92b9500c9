//! One-time enrollment tokens: what an operator creates for one role and id
//! (`rebound token create`), and the CS's side of redeeming one.

use crate::service::AdminService;
use rebound_proto::control as pb;
use tonic::{Response, Status};

/// `Admin.CreateToken`.
pub async fn create_token(
    _svc: &AdminService,
    _req: pb::CreateTokenRequest,
) -> Result<Response<pb::CreateTokenResponse>, Status> {
    Err(Status::unimplemented("TODO(trust): tokens"))
}
