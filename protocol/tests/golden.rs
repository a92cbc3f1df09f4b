//! Golden bytes: every message's encoding is pinned in `tests/golden/*.hex`. An accidental change
//! to a type (field order, a new field in the middle, a renamed variant's position) fails here.
//! After an intended change that also bumps the protocol version, regenerate with
//! `NEBULA_BLESS=1 cargo test -p nebula-protocol --test golden`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nebula_protocol::*;
use uuid::Uuid;

fn facts() -> NodeFacts {
    NodeFacts {
        hostname: "gpu-box".into(),
        os: "Ubuntu".into(),
        os_version: "24.04".into(),
        kernel: "6.8.0-45-generic".into(),
        arch: "x86_64".into(),
        cpu_count: 16,
        memory_bytes: 64 * 1024 * 1024 * 1024,
        labels: BTreeMap::from([
            ("zone".into(), "home".into()),
            ("gpu".into(), "rtx4090".into()),
        ]),
        gpus: vec![gpu_info()],
        container_runtime: Some("docker 27.3.1".into()),
    }
}

fn gpu_info() -> telemetry::GpuInfo {
    telemetry::GpuInfo {
        uuid: "GPU-8d3c".into(),
        name: "NVIDIA GeForce RTX 4090".into(),
        memory_total_bytes: 24 << 30,
        power_limit_mw: Some(450_000),
    }
}

fn inventory() -> telemetry::TelemetryInventory {
    telemetry::TelemetryInventory {
        epoch: 3,
        disks: vec![telemetry::DiskInfo {
            mount: "/".into(),
            filesystem: "ext4".into(),
            total_bytes: 512 << 30,
        }],
        interfaces: vec!["eth0".into()],
        gpus: vec![gpu_info()],
        containers: vec![telemetry::ContainerInfo {
            id: "4f1c2a".into(),
            name: "ollama".into(),
            image: "ollama/ollama:0.5".into(),
            labels: BTreeMap::from([("nebula.service".into(), "ollama".into())]),
            created_unix: 1_764_000_000,
        }],
        container_runtime: Some("docker 27.3.1".into()),
        gpu_driver: Some("560.35.03".into()),
        os: "Ubuntu 24.04".into(),
        kernel: "6.8.0".into(),
        models: vec![telemetry::ModelInfo {
            name: "llama3.1:8b".into(),
            backend: "ollama".into(),
            loaded: true,
            size_bytes: 4_920_753_328,
            vram_bytes: Some(6_000_000_000),
        }],
    }
}

fn sample() -> telemetry::TelemetrySample {
    telemetry::TelemetrySample {
        epoch: 3,
        seq: 42,
        taken_at_ms: 1_764_000_000_000,
        host: telemetry::HostSample {
            cpu_percent: 12.5,
            per_core_percent: vec![10.0, 15.0],
            load: [0.5, 0.25, 0.125],
            memory_used_bytes: 8 << 30,
            memory_total_bytes: 64 << 30,
            swap_used_bytes: 0,
            swap_total_bytes: 2 << 30,
            uptime_secs: 86_400,
        },
        disks_used_bytes: vec![100 << 30],
        interfaces: vec![telemetry::NetRate {
            rx_bytes_per_sec: 1000,
            tx_bytes_per_sec: 2000,
        }],
        gpus: vec![telemetry::GpuSample {
            utilization_percent: Some(87),
            memory_used_bytes: Some(20 << 30),
            temperature_c: Some(71),
            power_mw: Some(350_000),
            fan_percent: None,
            sm_clock_mhz: Some(2520),
            memory_clock_mhz: Some(10501),
            processes: vec![telemetry::GpuProcess {
                pid: 4242,
                name: "ollama".into(),
                memory_used_bytes: 19 << 30,
            }],
        }],
        containers: vec![telemetry::ContainerSample {
            state: telemetry::ContainerState::Running,
            health: telemetry::ContainerHealth::Healthy,
            restart_count: 1,
            cpu_percent: Some(3.5),
            memory_used_bytes: Some(512 << 20),
            memory_limit_bytes: None,
            net_rx_bytes: Some(1234),
            net_tx_bytes: Some(5678),
        }],
    }
}

fn node_id() -> Uuid {
    Uuid::from_u128(0x0193_7c2e_5a1b_7c3d_8e9f_0a1b_2c3d_4e5f)
}

fn settings() -> SessionSettings {
    SessionSettings {
        telemetry_interval_ms: 5000,
        keep_alive_ms: 5000,
        idle_timeout_ms: 15000,
    }
}

fn refusal() -> Refusal {
    Refusal {
        code: RefusalCode::VersionMismatch,
        message: "agent speaks 2.0, controller speaks 1.0".into(),
        version: ProtocolVersion { major: 1, minor: 0 },
    }
}

fn check<M: Message + std::fmt::Debug + PartialEq>(name: &str, msg: &M) {
    let bytes = encode(msg).expect("encode");
    let back: M = decode(&bytes).expect("decode");
    assert_eq!(&back, msg, "{name}: round trip");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.hex"));
    let hex_now = hex::encode(&bytes);
    if std::env::var_os("NEBULA_BLESS").is_some() {
        std::fs::write(&path, format!("{hex_now}\n")).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with NEBULA_BLESS=1 to create)",
            path.display()
        )
    });
    assert_eq!(
        hex_now,
        expected.trim(),
        "encoding of {name} changed; if intended, bump the protocol version and re-bless"
    );
}

#[test]
fn protocol_version() {
    // The version prefix is frozen across majors: two varint u16s.
    let bytes =
        bincode::serde::encode_to_vec(PROTOCOL_VERSION, bincode::config::standard()).unwrap();
    assert_eq!(
        bytes,
        vec![PROTOCOL_VERSION.major as u8, PROTOCOL_VERSION.minor as u8]
    );
}

#[test]
fn enroll_request() {
    check(
        "enroll_request",
        &EnrollRequest {
            version: PROTOCOL_VERSION,
            token_id: "k3x9q2".into(),
            token_secret: "s3cr3t".into(),
            csr_der: vec![0x30, 0x82, 0x01, 0x0a],
            name: "gpu-box".into(),
            labels: BTreeMap::from([("role".into(), "inference".into())]),
            facts: facts(),
        },
    );
}

#[test]
fn enroll_response() {
    check(
        "enroll_response_enrolled",
        &EnrollResponse::Enrolled(Enrolled {
            node_id: node_id(),
            name: "gpu-box".into(),
            labels: BTreeMap::from([("zone".into(), "home".into())]),
            cert_der: vec![1, 2, 3],
            ca_der: vec![4, 5, 6],
            settings: settings(),
        }),
    );
    check(
        "enroll_response_refused",
        &EnrollResponse::Refused(refusal()),
    );
}

#[test]
fn hello() {
    check(
        "hello",
        &Hello {
            version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            facts: facts(),
        },
    );
}

#[test]
fn server_hello() {
    check(
        "server_hello_welcome",
        &ServerHello::Welcome(Welcome {
            node_id: node_id(),
            name: "gpu-box".into(),
            labels: BTreeMap::from([("zone".into(), "home".into())]),
            controller_version: PROTOCOL_VERSION,
            settings: settings(),
        }),
    );
    check("server_hello_refused", &ServerHello::Refused(refusal()));
    // Frozen across majors: Refused is variant 1.
    let bytes = encode(&ServerHello::Refused(refusal())).unwrap();
    assert_eq!(bytes[0], 1);
}

#[test]
fn agent_messages() {
    check(
        "agent_renew",
        &AgentMessage::RenewCertificate {
            csr_der: vec![9, 8, 7],
        },
    );
    check(
        "agent_bye",
        &AgentMessage::Bye {
            reason: "shutdown".into(),
        },
    );
    check(
        "agent_unsupported",
        &AgentMessage::Unsupported { variant: 7 },
    );
    check("agent_certificate_saved", &AgentMessage::CertificateSaved);
    check(
        "agent_deploy_policy",
        &AgentMessage::DeployPolicy(deploy::DeployPolicySummary {
            allow_bind_paths: vec!["/srv".into()],
            allow_docker_socket: false,
            allow_privileged: true,
            allow_host_network: true,
            allow_host_pid: false,
            allow_capabilities: vec!["NET_ADMIN".into()],
            allow_devices: vec!["/dev/dri".into()],
            allow_gpus: true,
        }),
    );
    check(
        "agent_telemetry_inventory",
        &AgentMessage::TelemetryInventory(inventory()),
    );
    check(
        "agent_docker_policy",
        &AgentMessage::DockerPolicy(containers::DockerPolicySummary {
            control: containers::Reach::All,
            exec: containers::Reach::Managed,
            logs: containers::Reach::None,
        }),
    );
    check(
        "agent_container_details",
        &AgentMessage::ContainerDetails(containers::ContainerDetails {
            epoch: 3,
            containers: vec![containers::ContainerDetail {
                started_unix_ms: Some(1_764_000_000_500),
                ports: vec![deploy::PortMapping {
                    host_ip: None,
                    host_port: Some(11434),
                    container_port: 11434,
                    protocol: deploy::PortProtocol::Tcp,
                }],
            }],
        }),
    );
    check(
        "agent_monitor_results",
        &AgentMessage::MonitorResults(vec![monitors::MonitorResult {
            name: "home-nas".into(),
            at_ms: 1_764_000_000_000,
            up: true,
            latency_us: 1_250,
            status: Some(200),
            cert_expires_ms: Some(1_770_000_000_000),
            method: None,
            error: None,
        }]),
    );
    check("controller_term", &ControllerMessage::Term(42));
    check(
        "controller_replicas",
        &ControllerMessage::Replicas(vec![
            "nebula-a.example.net:4433".into(),
            "203.0.113.7:4433".into(),
        ]),
    );
    check(
        "controller_monitors",
        &ControllerMessage::Monitors(vec![
            monitors::MonitorSpec {
                name: "home-nas".into(),
                check: monitors::MonitorCheck::Http {
                    url: "https://nas.home/health".into(),
                    statuses: vec![200],
                    body_contains: Some("ok".into()),
                    insecure: true,
                },
                interval_ms: 30_000,
                timeout_ms: 5_000,
            },
            monitors::MonitorSpec {
                name: "resolver".into(),
                check: monitors::MonitorCheck::Dns {
                    name: "example.org".into(),
                    record: monitors::DnsRecord::A,
                    server: Some("192.168.1.1".into()),
                    expect: None,
                },
                interval_ms: 60_000,
                timeout_ms: 2_000,
            },
            monitors::MonitorSpec {
                name: "router".into(),
                check: monitors::MonitorCheck::Ping {
                    host: "192.168.1.1".into(),
                    tcp_port: 80,
                },
                interval_ms: 30_000,
                timeout_ms: 2_000,
            },
        ]),
    );
    check(
        "agent_ai_inventory",
        &AgentMessage::AiInventory(ai::AiInventory {
            backends: vec![ai::BackendStatus {
                name: "ollama-11434".into(),
                kind: ai::BackendKind::Ollama,
                url: "http://127.0.0.1:11434".into(),
                source: "local".into(),
                healthy: true,
                error: None,
                models: vec![ai::AiModel {
                    name: "llama3:8b".into(),
                    digest: Some("365c0bd3c000".into()),
                    size_bytes: 4_661_224_676,
                    vram_bytes: Some(5_137_025_024),
                    context_length: Some(8192),
                    loaded: true,
                }],
            }],
        }),
    );
}

#[test]
fn controller_messages() {
    check(
        "controller_renewed",
        &ControllerMessage::CertificateRenewed {
            cert_der: vec![1, 1],
        },
    );
    check(
        "controller_renewal_refused",
        &ControllerMessage::RenewalRefused(refusal()),
    );
    check(
        "controller_settings",
        &ControllerMessage::SettingsChanged(settings()),
    );
    check(
        "controller_bye",
        &ControllerMessage::Bye {
            reason: "restart".into(),
        },
    );
    check(
        "controller_unsupported",
        &ControllerMessage::Unsupported { variant: 6 },
    );
    check(
        "controller_agent_releases",
        &ControllerMessage::AgentReleases(vec![release::AgentRelease {
            version: "0.2.0".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            path: "/downloads/nebula-agent-linux-x86_64".into(),
            base_url: "https://nebula.example.net".into(),
            sha256: [0x5a; 32],
            signature: vec![0xc3; 64],
            public_key: vec![0x11; 32],
        }]),
    );
}

#[test]
fn telemetry_datagram() {
    check("datagram_sample", &telemetry::Datagram::Sample(sample()));
}

#[test]
fn a_twenty_container_sample_fits_one_datagram() {
    let mut s = sample();
    s.containers = vec![s.containers[0].clone(); 20];
    s.host.per_core_percent = vec![50.0; 16];
    let bytes = encode(&telemetry::Datagram::Sample(s)).unwrap();
    // QUIC guarantees 1200-byte datagrams on any path.
    assert!(bytes.len() <= 1200, "{} bytes", bytes.len());
}

#[test]
fn every_refusal_code_is_pinned() {
    let codes = [
        RefusalCode::VersionMismatch,
        RefusalCode::TokenUnknown,
        RefusalCode::TokenExpired,
        RefusalCode::TokenExhausted,
        RefusalCode::TokenRevoked,
        RefusalCode::InvalidRequest,
        RefusalCode::NameTaken,
        RefusalCode::NodeRevoked,
        RefusalCode::CertificateRequired,
        RefusalCode::Internal,
        RefusalCode::Unsupported,
    ];
    for (i, code) in codes.iter().enumerate() {
        let bytes = bincode::serde::encode_to_vec(code, bincode::config::standard()).unwrap();
        assert_eq!(bytes, vec![i as u8], "{code:?} moved");
    }
}

#[test]
fn peek_version_reads_a_foreign_major_hello() {
    // A hypothetical 7.3 Hello whose body differs after the version.
    let mut payload = vec![7u8, 3];
    payload.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(
        peek_version(&payload).unwrap(),
        ProtocolVersion { major: 7, minor: 3 }
    );
    assert!(decode::<Hello>(&payload).is_err());
}

#[test]
fn random_bytes_never_panic_the_decoders() {
    // Deterministic xorshift so a failure is reproducible.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = decode::<Hello>(&bytes);
        let _ = decode::<EnrollRequest>(&bytes);
        let _ = decode::<EnrollResponse>(&bytes);
        let _ = decode::<ServerHello>(&bytes);
        let _ = decode::<AgentMessage>(&bytes);
        let _ = decode::<ControllerMessage>(&bytes);
        let _ = decode::<telemetry::Datagram>(&bytes);
        let _ = peek_version(&bytes);
    }
}

fn job_id() -> Uuid {
    Uuid::from_u128(0x0193_7c2e_5a1b_7c3d_8e9f_0a1b_2c3d_4e60)
}

#[test]
fn job_control() {
    use jobs::*;
    let req = |spec| {
        JobControl::Request(JobRequest {
            id: job_id(),
            attempt: 1,
            deadline_unix_ms: Some(1_764_000_060_000),
            logs_from: 0,
            spec,
        })
    };
    check("job_request_noop", &req(JobSpec::Noop));
    check(
        "job_request_exec",
        &req(JobSpec::Exec(ExecSpec {
            op: "git-pull".into(),
            args: vec!["/srv/app".into()],
        })),
    );
    check(
        "job_request_probe_http",
        &req(JobSpec::Probe(ProbeSpec::Http {
            url: "http://127.0.0.1:8080/health".into(),
            timeout_ms: 2000,
        })),
    );
    check(
        "job_request_probe_tcp",
        &req(JobSpec::Probe(ProbeSpec::Tcp {
            address: "10.0.0.5:22".into(),
            timeout_ms: 500,
        })),
    );
    check("job_request_inventory", &req(JobSpec::Inventory));
    check(
        "job_request_deploy",
        &req(JobSpec::Deploy(Box::new(deploy_spec()))),
    );
    check(
        "job_request_deploy_with_host_access",
        &req(JobSpec::DeployWithHostAccess(Box::new(
            deploy::DeployWithHostAccess {
                deploy: deploy_spec(),
                host_access: deploy::HostAccess {
                    privileged: true,
                    network: deploy::NetworkMode::Host,
                    pid_host: true,
                    cap_add: vec!["NET_ADMIN".into(), "SYS_TIME".into()],
                    devices: vec![deploy::DeviceMapping {
                        host_path: "/dev/ttyUSB0".into(),
                        container_path: "/dev/ttyS0".into(),
                    }],
                },
            },
        ))),
    );
    check(
        "job_request_deploy_with_files",
        &req(JobSpec::DeployWithFiles(Box::new(
            deploy::DeployWithFiles {
                deploy: deploy_spec(),
                host_access: deploy::HostAccess::default(),
                files: vec![deploy::SecretFile {
                    target: "/run/secrets/db_password".into(),
                    secret: "db_password@3".into(),
                    mode: 0o400,
                }],
                contents: vec![deploy::SecretBytes(b"hunter2".to_vec())],
            },
        ))),
    );
    check(
        "job_request_wake",
        &req(JobSpec::Wake(WakeSpec {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            broadcast: "192.168.77.255".into(),
            port: 9,
        })),
    );
    check(
        "job_request_undeploy",
        &req(JobSpec::Undeploy(deploy::UndeploySpec {
            service: "web".into(),
            node: "0193a1b2-0000-7000-8000-00000000000a".into(),
        })),
    );
    check(
        "job_cancel",
        &JobControl::Cancel {
            reason: "cancelled by admin".into(),
        },
    );
    check(
        "job_model_pull",
        &JobControl::Request(JobRequest {
            id: job_id(),
            attempt: 1,
            deadline_unix_ms: Some(1_764_000_000_000),
            logs_from: 0,
            spec: JobSpec::Model(ai::ModelSpec {
                backend: Some("ollama-11434".into()),
                action: ai::ModelAction::Pull {
                    name: "llama3:8b".into(),
                },
            }),
        }),
    );
    check(
        "job_fenced",
        &JobControl::Fenced {
            term: 42,
            request: JobRequest {
                id: job_id(),
                attempt: 1,
                deadline_unix_ms: Some(1_764_000_000_000),
                logs_from: 0,
                spec: JobSpec::Noop,
            },
        },
    );
    check(
        "job_infer",
        &JobControl::Infer(ai::InferRequest {
            backend: "ollama-11434".into(),
            path: "/v1/chat/completions".into(),
            body: br#"{"model":"llama3","stream":true}"#.to_vec(),
            first_byte_timeout_ms: 30_000,
            total_timeout_ms: 600_000,
        }),
    );
    check(
        "job_logs",
        &JobControl::Logs(containers::LogsRequest {
            container: "ollama".into(),
            since_unix_ms: Some(1_764_000_000_000),
            tail: Some(100),
            follow: true,
        }),
    );
    check(
        "job_exec",
        &JobControl::Exec(containers::ExecRequest {
            container: "ollama".into(),
            command: vec!["sh".into()],
            tty: true,
            rows: 24,
            cols: 80,
        }),
    );
    check(
        "job_request_storage_prune",
        &req(JobSpec::Storage(containers::StorageAction::Prune {
            images: vec!["sha256:0c0c80f9".into()],
            volumes: vec!["old-data".into()],
        })),
    );
    check(
        "job_request_container",
        &req(JobSpec::Container(containers::ContainerJob {
            container: "ollama".into(),
            action: containers::ContainerAction::Restart,
        })),
    );
    check(
        "job_request_http",
        &req(JobSpec::Http(jobs::HttpSpec {
            method: "POST".into(),
            url: "http://127.0.0.1:8080/hook".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"a":1}"#.to_vec(),
            timeout_ms: 30_000,
            max_bytes: 1 << 20,
        })),
    );
    check(
        "job_request_infer",
        &req(JobSpec::Infer(nebula_protocol::ai::InferRequest {
            backend: "llama".into(),
            path: "/v1/chat/completions".into(),
            body: br#"{"model":"smol"}"#.to_vec(),
            first_byte_timeout_ms: 300_000,
            total_timeout_ms: 300_000,
        })),
    );
}

#[test]
fn log_events() {
    use containers::*;
    check(
        "log_lines",
        &LogEvent::Lines(vec![LogEntry {
            at_unix_ms: 1_764_000_000_123,
            stream: jobs::LogStream::Stdout,
            line: "listening on :11434".into(),
        }]),
    );
    check(
        "log_error",
        &LogEvent::Error {
            message: "no container named `x`".into(),
        },
    );
    check("log_end", &LogEvent::End);
    check("exec_data", &ExecInput::Data(b"ls\r".to_vec()));
    check(
        "exec_resize",
        &ExecInput::Resize {
            rows: 40,
            cols: 120,
        },
    );
    check("exec_eof", &ExecInput::Eof);
    check("exec_started", &ExecOutput::Started);
    check("exec_stdout", &ExecOutput::Stdout(b"bin  etc\r\n".to_vec()));
    check("exec_exit", &ExecOutput::Exit { code: Some(0) });
    check(
        "log_refused",
        &LogEvent::Refused {
            message: "refused by the node's docker.logs = \"none\" (agent config)".into(),
        },
    );
}

#[test]
fn infer_events() {
    check(
        "infer_head",
        &ai::InferEvent::Head {
            status: 200,
            content_type: "text/event-stream".into(),
        },
    );
    check(
        "infer_chunk",
        &ai::InferEvent::Chunk(b"data: {}\n\n".to_vec()),
    );
    check("infer_end", &ai::InferEvent::End);
    check(
        "infer_error",
        &ai::InferEvent::Error {
            message: "backend closed the connection".into(),
            timeout: false,
        },
    );
}

fn deploy_spec() -> deploy::DeploySpec {
    use deploy::*;
    DeploySpec {
        service: "web".into(),
        revision: "3f9c2a7d81e0".into(),
        node: "0193a1b2-0000-7000-8000-00000000000a".into(),
        replicas: 2,
        container: ContainerSpec {
            image: "nebula-test/web:v2".into(),
            command: Some(vec!["/bin/httpd".into(), "-f".into()]),
            env: vec![("MODE".into(), "prod".into())],
            ports: vec![PortMapping {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(8080),
                container_port: 80,
                protocol: PortProtocol::Tcp,
            }],
            volumes: vec![VolumeMount {
                source: "web-data".into(),
                target: "/data".into(),
                read_only: false,
            }],
            restart: RestartPolicy::OnFailure {
                max_retries: Some(5),
            },
            gpus: GpuRequest::Count(1),
            health: Some(HealthCheck {
                probe: HealthProbe::Http {
                    port: 80,
                    path: "/healthz".into(),
                },
                interval_ms: 2000,
                timeout_ms: 1000,
                retries: 3,
                start_period_ms: 5000,
            }),
        },
        strategy: UpdateStrategy::StopFirst,
        health_timeout_ms: 60_000,
    }
}

#[test]
fn job_events() {
    use jobs::*;
    check("job_accepted", &JobEvent::Accepted { resumed: true });
    check("job_started", &JobEvent::Started);
    check(
        "job_log",
        &JobEvent::Log(LogLine {
            seq: 7,
            at_unix_ms: 1_764_000_001_234,
            stream: LogStream::Stderr,
            line: "Already up to date.".into(),
        }),
    );
    check(
        "job_progress",
        &JobEvent::Progress {
            percent: 42.5,
            message: "pulling layers".into(),
        },
    );
    check(
        "job_finished_exec",
        &JobEvent::Finished(JobResult {
            status: JobStatus::Failed,
            exit_code: Some(128),
            error: Some("exited with status 128".into()),
            output: JobOutput::None,
        }),
    );
    check(
        "job_finished_probe",
        &JobEvent::Finished(JobResult {
            status: JobStatus::Succeeded,
            exit_code: None,
            error: None,
            output: JobOutput::Probe(ProbeOutput {
                ok: true,
                status: Some(200),
                latency_us: 1830,
                error: None,
            }),
        }),
    );
    check(
        "job_finished_http",
        &JobEvent::Finished(JobResult {
            status: JobStatus::Succeeded,
            exit_code: None,
            error: None,
            output: JobOutput::Http(jobs::HttpOutput {
                status: 200,
                content_type: "application/json".into(),
                body: br#"{"ok":true}"#.to_vec(),
                truncated: false,
                latency_us: 2100,
            }),
        }),
    );
    check(
        "job_finished_storage",
        &JobEvent::Finished(JobResult {
            status: JobStatus::Succeeded,
            exit_code: None,
            error: None,
            output: JobOutput::Storage(containers::StorageReport {
                images: vec![containers::ImageInfo {
                    id: "sha256:0c0c80f9".into(),
                    tags: vec!["nebula-test/busybox:1".into()],
                    size_bytes: 1_982_338,
                    created_unix: 1_764_000_000,
                    containers: vec!["web-1".into()],
                }],
                volumes: vec![containers::VolumeInfo {
                    name: "web-data".into(),
                    driver: "local".into(),
                    size_bytes: Some(4096),
                    containers: Vec::new(),
                }],
                containers_bytes: 12_288,
                removed: vec!["old-data".into()],
                skipped: vec![("sha256:1e63b4a1".into(), "in use by db".into())],
                reclaimed_bytes: 8192,
            }),
        }),
    );
    check(
        "job_finished_inventory",
        &JobEvent::Finished(JobResult {
            status: JobStatus::Succeeded,
            exit_code: None,
            error: None,
            output: JobOutput::Inventory(Box::new(InventoryReport {
                agent_version: "0.1.0".into(),
                facts: facts(),
                containers: inventory().containers,
                container_states: BTreeMap::from([("4f1c2a".into(), "running".into())]),
                repositories: vec![GitRepository {
                    path: "/srv/app".into(),
                    branch: Some("main".into()),
                    commit: "3f2a9c0d1e".into(),
                    dirty: false,
                }],
            })),
        }),
    );
    check(
        "job_finished_deploy",
        &JobEvent::Finished(JobResult {
            status: JobStatus::Failed,
            exit_code: None,
            error: Some("rolled back: not healthy within 60s".into()),
            output: JobOutput::Deploy(deploy::DeployReport {
                outcome: deploy::DeployOutcome::RolledBack,
                previous: vec!["3f9c2a7d81e0".into()],
                containers: vec!["web-1-k3x9qa".into()],
                health_output: Some("GET /healthz: 404 Not Found".into()),
            }),
        }),
    );
}
