//! What the fuzz targets share with the seed generator (`examples/seeds.rs`):
//! which RPC an `agent_requests` input's first byte selects.

/// The requests `agent_requests` decodes, in selector order: an input's first
/// byte modulo `ALL.len()` picks one, the rest is that request's protobuf
/// encoding. Append only: reordering would change what the corpus means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    HealthCheck,
    HealthVersion,
    GetGuestDetails,
    CreateSandbox,
    DestroySandbox,
    CreateContainer,
    StartContainer,
    RemoveContainer,
    ExecProcess,
    SignalProcess,
    WaitProcess,
    ReadStdout,
    ReadStderr,
    WriteStdin,
    CloseStdin,
    TtyWinResize,
    UpdateContainer,
    StatsContainer,
    PauseContainer,
    ResumeContainer,
    GetOomEvent,
    CopyFile,
    SetGuestDateTime,
    OnlineCpuMem,
    MemHotplugByProbe,
    GetMetrics,
    GetVolumeStats,
    UpdateInterface,
    UpdateRoutes,
    ListInterfaces,
    ListRoutes,
    AddArpNeighbors,
    /// `kiln.Diagnostics/GuestFacts`.
    GuestFacts,
    /// Not an RPC: the kernel command line the agent reads its `agent.*`
    /// settings from (UTF-8 text, not protobuf).
    KernelCmdline,
}

impl Rpc {
    pub const ALL: [Rpc; 34] = [
        Rpc::HealthCheck,
        Rpc::HealthVersion,
        Rpc::GetGuestDetails,
        Rpc::CreateSandbox,
        Rpc::DestroySandbox,
        Rpc::CreateContainer,
        Rpc::StartContainer,
        Rpc::RemoveContainer,
        Rpc::ExecProcess,
        Rpc::SignalProcess,
        Rpc::WaitProcess,
        Rpc::ReadStdout,
        Rpc::ReadStderr,
        Rpc::WriteStdin,
        Rpc::CloseStdin,
        Rpc::TtyWinResize,
        Rpc::UpdateContainer,
        Rpc::StatsContainer,
        Rpc::PauseContainer,
        Rpc::ResumeContainer,
        Rpc::GetOomEvent,
        Rpc::CopyFile,
        Rpc::SetGuestDateTime,
        Rpc::OnlineCpuMem,
        Rpc::MemHotplugByProbe,
        Rpc::GetMetrics,
        Rpc::GetVolumeStats,
        Rpc::UpdateInterface,
        Rpc::UpdateRoutes,
        Rpc::ListInterfaces,
        Rpc::ListRoutes,
        Rpc::AddArpNeighbors,
        Rpc::GuestFacts,
        Rpc::KernelCmdline,
    ];

    pub fn from_byte(b: u8) -> Rpc {
        Rpc::ALL[b as usize % Rpc::ALL.len()]
    }

    /// The selector byte of this RPC.
    pub fn byte(self) -> u8 {
        Rpc::ALL.iter().position(|r| *r == self).unwrap_or(0) as u8
    }
}
