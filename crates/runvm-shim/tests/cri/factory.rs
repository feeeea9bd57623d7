//! A CRI pod whose VM comes from the VM factory (`[factory] cache = 1`): the pooled VM (booted
//! at the configured 1 vCPU / 512 MiB) grows to the pod's size (its CPU and memory limits),
//! the pod's network is hot-added into it (taps made in the pod's namespace and handed to
//! QEMU), the pod's IP reaches a server in it, its VM joins the pod's cgroup, and nothing is
//! left after.

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};

use super::common::{run_ok, Env, SERIAL};
use super::{
    channel, exec_sync, http_get, pod_cgroup, pod_config, qemu_in, start_container, wait_for_images,
};

#[test]
fn cri_pod_runs_in_a_factory_vm_with_its_network_hot_added() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start_cri_configured("runvmfa0", "10.231.81.0/24", "[factory]\ncache = 1\n");
    let runvm = std::path::Path::new(env!("CARGO_BIN_EXE_containerd-shim-runvm-v2"))
        .with_file_name("runvm");
    assert!(runvm.exists(), "{} is not built", runvm.display());
    let factory = |verb: &[&str]| {
        let mut cmd = std::process::Command::new(&runvm);
        cmd.arg("--config").arg(env.runvm_config()).arg("factory");
        cmd.args(verb);
        run_ok(&mut cmd)
    };
    factory(&["init"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ch = channel(&env.socket).await;
        let mut rt = RuntimeServiceClient::new(ch.clone());
        wait_for_images(&mut ImageServiceClient::new(ch)).await;
        // 1 CPU and 256 MiB of limits: the VM grows to 2 vCPUs and 768 MiB.
        let pod = pod_config(&env);
        let pod_id = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: "runvm".into(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                env.dir
                    .path()
                    .join("runvm")
                    .join(&pod_id)
                    .join("sandbox.json"),
            )
            .expect("the pod's sandbox record"),
        )
        .unwrap();
        eprintln!("the pod's timeline: {}", record["timeline"]);
        assert!(
            record["factory_vm"].is_string(),
            "the pod's VM is not the factory's: {}",
            record["timeline"]
        );
        assert!(
            qemu_in(&pod_cgroup(&pod_id)),
            "the factory VM did not join the pod's cgroup"
        );
        let ip = rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.clone(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        assert!(ip.starts_with("10.231.81."), "CNI gave no address: {ip:?}");
        let web = start_container(
            &mut rt,
            &pod_id,
            &pod,
            "web",
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo warm-pod > /www/index.html && exec httpd -f -p 8080 -h /www",
            ],
            false,
        )
        .await;
        assert_eq!(
            record["pod_size"],
            serde_json::json!({"vcpus": 2, "memory_mib": 768}),
            "{}",
            record["timeline"]
        );
        let (cpus, _, _) =
            exec_sync(&mut rt, &web, &["cat", "/sys/devices/system/cpu/online"]).await;
        assert_eq!(
            cpus.trim(),
            "0-1",
            "the factory VM did not grow to the pod's 2 vCPUs"
        );
        let (addrs, _, _) = exec_sync(&mut rt, &web, &["ip", "-4", "addr"]).await;
        assert!(
            addrs.contains(&ip),
            "the guest lacks the pod's IP {ip}: {addrs}"
        );
        let page = http_get(&format!("{ip}:8080")).await;
        assert!(page.contains("warm-pod"), "{page:?}");
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .expect("StopPodSandbox");
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    });
    let status: serde_json::Value =
        serde_json::from_slice(&factory(&["status", "--format", "json"]).stdout).unwrap();
    assert_eq!(status["hits"], 1, "{status}");
    factory(&["destroy"]);
    env.assert_clean();
}
