//! Guest networking when kiln-agent is built without the `netlink` feature:
//! every networking RPC answers UNIMPLEMENTED.

use kiln_protocol::{agent, types};

use crate::error::{AgentError, ErrorKind, Result};

fn unimplemented(what: &str) -> AgentError {
    AgentError::new(
        ErrorKind::Unimplemented,
        format!("{what}: this kiln-agent was built without the netlink feature"),
    )
}

pub async fn update_interface(_i: Option<&types::Interface>) -> Result<types::Interface> {
    Err(unimplemented("UpdateInterface"))
}

pub async fn update_routes(_r: Option<&agent::Routes>) -> Result<agent::Routes> {
    Err(unimplemented("UpdateRoutes"))
}

pub async fn list_interfaces() -> Result<agent::Interfaces> {
    Err(unimplemented("ListInterfaces"))
}

pub async fn list_routes() -> Result<agent::Routes> {
    Err(unimplemented("ListRoutes"))
}

pub async fn add_arp_neighbors(_n: Option<&agent::ARPNeighbors>) -> Result<()> {
    Err(unimplemented("AddARPNeighbors"))
}
