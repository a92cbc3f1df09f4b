//! Interactive commands in containers (`nebula container exec`), on a stream the controller
//! opens ([`JobControl::Exec`]): the runtime's exec API with a terminal when asked, input and
//! window sizes from the controller, output back as it comes, the exit status last. Allowed
//! within the agent's `docker.exec` (none, the containers Nebula manages here, or all).
//!
//! Flow control holds both ways: output is read from the runtime only as fast as the stream
//! takes it, and input is read from the stream only as fast as the command takes it.
//!
//! [`JobControl::Exec`]: nebula_protocol::jobs::JobControl::Exec

use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use bollard::query_parameters::ResizeExecOptions;
use futures::StreamExt;
use nebula_protocol::containers::{
    policy_refusal, valid_container_ref, ExecInput, ExecOutput, ExecRequest, PolicyKey, EXEC_CHUNK,
};
use nebula_protocol::{self as proto, FrameReader};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use crate::config::DockerConfig;

/// Serve one exec stream until the command ends or the controller goes away.
pub async fn serve(
    req: ExecRequest,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    policy: &DockerConfig,
    node_id: Option<uuid::Uuid>,
) {
    let last = match run(&req, &mut send, recv, policy, node_id).await {
        Ok(code) => ExecOutput::Exit { code },
        Err(Ended::Gone) => return,
        Err(Ended::Refused(message)) => ExecOutput::Refused { message },
        Err(Ended::Error(message)) => ExecOutput::Error { message },
    };
    if proto::write_message(&mut send, &last).await.is_ok() {
        let _ = send.finish();
    }
}

enum Ended {
    Gone,
    Refused(String),
    Error(String),
}

fn check(req: &ExecRequest) -> Result<(), Ended> {
    if !valid_container_ref(&req.container) {
        return Err(Ended::Error(format!(
            "`{}` is not a container name or id",
            req.container
        )));
    }
    if req.command.is_empty()
        || req.command.len() > 64
        || req
            .command
            .iter()
            .any(|a| a.len() > 4096 || a.contains('\0'))
    {
        return Err(Ended::Error(
            "a command is 1 to 64 arguments of at most 4096 bytes".into(),
        ));
    }
    Ok(())
}

async fn run(
    req: &ExecRequest,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    policy: &DockerConfig,
    node_id: Option<uuid::Uuid>,
) -> Result<Option<i64>, Ended> {
    check(req)?;
    let name = &req.container;
    let docker = crate::docker::connect(policy.socket.as_deref())
        .map_err(|e| Ended::Error(format!("no container runtime reachable: {e}")))?;
    let found = crate::docker::find(&docker, name, node_id)
        .await
        .map_err(Ended::Error)?;
    if let Some(refusal) = policy_refusal(PolicyKey::Exec, policy.exec, name, found.managed) {
        return Err(Ended::Refused(refusal));
    }
    if found.inspect.state.and_then(|s| s.running) != Some(true) {
        return Err(Ended::Error(format!("{name} is not running")));
    }
    let config = ExecConfig {
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(req.tty),
        cmd: Some(req.command.clone()),
        env: req.tty.then(|| vec!["TERM=xterm-256color".to_owned()]),
        console_size: req
            .tty
            .then(|| vec![usize::from(req.rows.max(1)), usize::from(req.cols.max(1))]),
        ..Default::default()
    };
    let exec = docker
        .create_exec(name, config)
        .await
        .map_err(|e| Ended::Error(format!("starting a command in {name}: {e}")))?;
    let started = docker
        .start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: false,
                tty: req.tty,
                output_capacity: Some(EXEC_CHUNK),
            }),
        )
        .await
        .map_err(|e| Ended::Error(format!("starting a command in {name}: {e}")))?;
    let StartExecResults::Attached {
        mut output,
        mut input,
    } = started
    else {
        return Err(Ended::Error(
            "the runtime did not attach the command".into(),
        ));
    };
    info!(container = %name, command = ?req.command, tty = req.tty, "exec started");
    proto::write_message(send, &ExecOutput::Started)
        .await
        .map_err(|_| Ended::Gone)?;
    if req.tty {
        let size = ResizeExecOptions {
            h: i32::from(req.rows.max(1)),
            w: i32::from(req.cols.max(1)),
        };
        let _ = docker.resize_exec(&exec.id, size).await;
    }
    let mut frames = FrameReader::new(EXEC_CHUNK + 64);
    let mut reading = true;
    loop {
        tokio::select! {
            out = output.next() => {
                let msg = match out {
                    Some(Ok(LogOutput::StdErr { message })) => ExecOutput::Stderr(message.to_vec()),
                    Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                        ExecOutput::Stdout(message.to_vec())
                    }
                    Some(Ok(LogOutput::StdIn { .. })) => continue,
                    Some(Err(e)) => {
                        debug!("exec output: {e}");
                        break;
                    }
                    None => break,
                };
                proto::write_message(send, &msg).await.map_err(|_| Ended::Gone)?;
            }
            frame = frames.read_message::<ExecInput, _>(&mut recv), if reading => match frame {
                Ok(ExecInput::Data(bytes)) => {
                    if input.write_all(&bytes).await.is_err() {
                        reading = false;
                    }
                    let _ = input.flush().await;
                }
                Ok(ExecInput::Resize { rows, cols }) => {
                    let size = ResizeExecOptions {
                        h: i32::from(rows.max(1)),
                        w: i32::from(cols.max(1)),
                    };
                    let _ = docker.resize_exec(&exec.id, size).await;
                }
                Ok(ExecInput::Eof) => {
                    let _ = input.shutdown().await;
                    reading = false;
                }
                // The controller went away: the command's input ends; it is not killed (a
                // shell sees end of file and exits).
                Err(_) => {
                    let _ = input.shutdown().await;
                    return Err(Ended::Gone);
                }
            },
        }
    }
    // The output can end a moment before the runtime records the exit: ask until it has.
    let mut code = None;
    for _ in 0..50 {
        match docker.inspect_exec(&exec.id).await {
            Ok(i) if i.running == Some(false) => {
                code = i.exit_code;
                break;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            Err(_) => break,
        }
    }
    info!(container = %name, ?code, "exec ended");
    Ok(code)
}
