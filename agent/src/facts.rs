//! Host facts sent at enrollment and in every `Hello`.

use nebula_protocol::{Labels, NodeFacts};
use sysinfo::System;

/// Collect this host's facts (cheap: no process list, no CPU sampling).
pub fn collect(labels: &Labels) -> NodeFacts {
    let mut sys = System::new();
    sys.refresh_memory();
    NodeFacts {
        hostname: System::host_name().unwrap_or_else(|| "unknown".into()),
        os: System::name().unwrap_or_else(|| std::env::consts::OS.into()),
        os_version: System::os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.into(),
        cpu_count: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: sys.total_memory(),
        labels: labels.clone(),
        // Filled from the first telemetry inventory before each Hello.
        gpus: Vec::new(),
        container_runtime: None,
    }
}
