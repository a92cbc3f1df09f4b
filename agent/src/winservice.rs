//! Running under the Windows service manager (`nebula-agent service`, registered by
//! install.ps1). Windows only; kept to the service protocol itself: report Running, turn Stop
//! and Shutdown into the agent's cancellation token, report Stopped with the agent's exit code
//! (a non-zero code makes the service manager restart the agent, which is how a self-update
//! takes effect).
#![allow(unsafe_code)] // `define_windows_service!` expands to the FFI entry point the SCM calls.

use std::ffi::OsString;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::{define_windows_service, service_dispatcher};

pub const SERVICE_NAME: &str = "nebula-agent";

/// The agent's body: runs until the token fires, returns the service's exit code.
pub type Body = Box<dyn FnOnce(CancellationToken) -> u32 + Send>;

static BODY: Mutex<Option<Body>> = Mutex::new(None);

define_windows_service!(ffi_service_main, service_main);

/// Hand this thread to the service dispatcher; returns when the service has stopped.
pub fn run(body: Body) -> windows_service::Result<()> {
    *BODY.lock().unwrap_or_else(|p| p.into_inner()) = Some(body);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main)
}

fn service_main(_arguments: Vec<OsString>) {
    if let Err(e) = serve() {
        tracing::error!("service: {e}");
    }
}

fn status(state: ServiceState, accept: ServiceControlAccept, code: u32) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: accept,
        exit_code: ServiceExitCode::Win32(code),
        checkpoint: 0,
        wait_hint: Duration::from_secs(15),
        process_id: None,
    }
}

fn serve() -> windows_service::Result<()> {
    let stop = CancellationToken::new();
    let on_stop = stop.clone();
    let handle = service_control_handler::register(SERVICE_NAME, move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            on_stop.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    })?;
    handle.set_service_status(status(
        ServiceState::Running,
        ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
        0,
    ))?;
    let body = BODY.lock().unwrap_or_else(|p| p.into_inner()).take();
    let code = body.map_or(1, |body| body(stop));
    handle.set_service_status(status(
        ServiceState::Stopped,
        ServiceControlAccept::empty(),
        code,
    ))
}
