//! The Kubernetes path, timed: containerd's CRI plugin driven as the kubelet drives it, with
//! runtime handler `runvm` and with `runc`, same containerd, same images, same CNI network.
//! Each round runs a pod (RunPodSandbox), starts a sleeper in it (CreateContainer and
//! StartContainer: "start a container in a running pod") and stops the pod with the sleeper
//! running (StopPodSandbox: "stop a pod"), then removes it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, PodSandboxConfig,
    PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::containerd::IMAGE;

/// The times of one runtime handler's rounds, in milliseconds.
#[derive(Debug, Default)]
pub struct Rounds {
    /// RunPodSandbox.
    pub run_pod: Vec<f64>,
    /// CreateContainer + StartContainer of a sleeper in the running pod.
    pub start_container: Vec<f64>,
    /// StopPodSandbox with the sleeper running.
    pub stop_pod: Vec<f64>,
}

/// `k` rounds through runtime handler `handler` over the CRI socket `socket`; `logs` is the
/// pods' log folder.
pub fn rounds(socket: &str, handler: &str, k: u32, logs: &std::path::Path) -> Result<Rounds> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start an async runtime")?;
    runtime.block_on(async {
        let mut rt = RuntimeServiceClient::new(channel(socket).await?);
        let mut out = Rounds::default();
        for i in 0..k {
            let name = format!("{handler}-{i}");
            round(&mut rt, handler, &name, logs, &mut out)
                .await
                .with_context(|| format!("CRI round {name}"))?;
        }
        Ok(out)
    })
}

async fn channel(socket: &str) -> Result<Channel> {
    let socket = socket.to_string();
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .context("connect to containerd's CRI service")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn round(
    rt: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    name: &str,
    logs: &std::path::Path,
    out: &mut Rounds,
) -> Result<()> {
    let pod = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("runvm-bench-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.join(name).display().to_string(),
        ..Default::default()
    };
    let started = Instant::now();
    let pod_id = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    out.run_pod.push(ms(started.elapsed()));
    let result = async {
        let container = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "sleeper".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: vec!["sleep".into(), "1000000".into()],
            log_path: "sleeper.log".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let id = rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(container),
                sandbox_config: Some(pod.clone()),
            })
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest { container_id: id })
            .await
            .context("StartContainer")?;
        out.start_container.push(ms(started.elapsed()));
        let started = Instant::now();
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .context("StopPodSandbox")?;
        out.stop_pod.push(ms(started.elapsed()));
        anyhow::Ok(())
    }
    .await;
    // Whatever happened, the pod goes (a stopped pod is removed; a running one is stopped
    // first by the removal).
    let removed = rt
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .context("RemovePodSandbox");
    result?;
    removed?;
    Ok(())
}
