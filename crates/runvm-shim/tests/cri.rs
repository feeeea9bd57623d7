//! The Kubernetes path: containerd's CRI plugin runs a pod with runvm (runtime handler `runvm`),
//! driven by a CRI client as the kubelet would drive it. The pod gets one VM; its containers
//! join it; the VM outlives removed containers and goes with the pod.
//! The test boots one VM (about 5 s under TCG) and shares it between all its checks.

mod common;
#[path = "cri/factory.rs"]
mod factory;
#[path = "cri/hotplug.rs"]
mod hotplug;

use std::time::{Duration, Instant};

use common::{Env, SERIAL};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatsRequest,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    SecurityProfile, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const BRIDGE: &str = "runvmcri0";
const SUBNET: &str = "10.231.77.0/24";

type Runtime = RuntimeServiceClient<Channel>;

async fn channel(socket: &str) -> Channel {
    let socket = socket.to_string();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connecting to containerd's CRI service")
}

fn pod_config(env: &Env) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "4b1c7f36-0d6e-4a0e-9c51-runvm-test".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web-pod".into(),
        log_directory: env.dir.path().join("pod-logs").display().to_string(),
        // The pod's resources, as kubelet sends them: containerd passes them to the sandbox as
        // `io.kubernetes.cri.sandbox-*` annotations, and the VM boots at that size.
        linux: Some(LinuxPodSandboxConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 100_000,
                memory_limit_in_bytes: 256 << 20,
                ..Default::default()
            }),
            // As kubelet's cgroupfs driver: the VM goes into PARENT/POD_ID on the host.
            cgroup_parent: cri_cgroup_parent(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container's config as the kubelet sends it: its own PID namespace unless the pod shares
/// one (`shareProcessNamespace`, `share_pid`), the pod's network and IPC, the runtime's default
/// seccomp profile (`seccompProfile: RuntimeDefault`).
fn container_config(name: &str, command: &[&str], share_pid: bool) -> ContainerConfig {
    let pid = if share_pid {
        NamespaceMode::Pod
    } else {
        NamespaceMode::Container
    };
    ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: pid as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                seccomp: Some(SecurityProfile {
                    profile_type: k8s_cri::v1::security_profile::ProfileType::RuntimeDefault as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// Creates and starts container `name` in the pod; returns its id.
async fn start_container(
    rt: &mut Runtime,
    pod_id: &str,
    pod: &PodSandboxConfig,
    name: &str,
    command: &[&str],
    share_pid: bool,
) -> String {
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(container_config(name, command, share_pid)),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
    id
}

async fn exec_sync(rt: &mut Runtime, id: &str, cmd: &[&str]) -> (String, String, i32) {
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e}"))
        .into_inner();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.exit_code,
    )
}

async fn container_state(rt: &mut Runtime, id: &str) -> (ContainerState, i32) {
    let status = rt
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
        .into_inner()
        .status
        .expect("a status");
    (
        ContainerState::try_from(status.state).expect("a known state"),
        status.exit_code,
    )
}

/// Polls `done` for up to 15 s; whether it became true.
fn eventually(done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Polls `path` for up to 20 s until it contains `needle`.
fn wait_for_text(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// GET / from `address` (host:port), retried for up to 20 s while the server comes up.
async fn http_get(address: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(address).await?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut page = String::new();
            s.read_to_string(&mut page).await?;
            Ok::<_, std::io::Error>(page)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(page)) if !page.is_empty() => return page,
            other => {
                assert!(Instant::now() < deadline, "GET {address}: {other:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

fn netns_names() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn cri_cgroup_parent() -> String {
    format!("/runvmcri{}", std::process::id())
}

/// The pod's host cgroup in the memory hierarchy (v1) or the unified one (v2).
fn pod_cgroup(pod_id: &str) -> std::path::PathBuf {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let path = format!("{}/{pod_id}", cri_cgroup_parent());
    match root.join("cgroup.controllers").exists() {
        true => root.join(&path[1..]),
        false => root.join("memory").join(&path[1..]),
    }
}

/// Whether QEMU runs in the pod's host cgroup.
fn qemu_in(cgroup: &std::path::Path) -> bool {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    procs.lines().any(|pid| {
        std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
    })
}

fn qemus(env: &Env) -> usize {
    env.leftovers()
        .iter()
        .filter(|c| c.contains("qemu-system"))
        .count()
}

#[test]
fn cri_pod_shares_one_vm_between_its_containers_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start_cri(BRIDGE, SUBNET);
    let netns_before = netns_names();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ch = channel(&env.socket).await;
        let mut rt = RuntimeServiceClient::new(ch.clone());
        let mut images = ImageServiceClient::new(ch);
        let version = rt
            .version(VersionRequest::default())
            .await
            .expect("CRI Version")
            .into_inner();
        eprintln!("CRI: {version:?}");

        // The imported images reach the CRI plugin's store through containerd's events.
        let deadline = Instant::now() + Duration::from_secs(20);
        for image in [BUSYBOX, "docker.io/library/pause:latest"] {
            loop {
                let status = images
                    .image_status(ImageStatusRequest {
                        image: Some(ImageSpec {
                            image: image.into(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
                    .expect("ImageStatus")
                    .into_inner();
                if status.image.is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "{image} never reached CRI");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }

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
        let pod_status = rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.clone(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .expect("a pod status");
        assert_eq!(pod_status.state, 0, "pod not ready: {pod_status:?}");
        let ip = pod_status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        assert!(ip.starts_with("10.231.77."), "CNI gave no address: {ip:?}");
        assert_eq!(qemus(&env), 1, "one VM for the pod");
        let cgroup = pod_cgroup(&pod_id);
        assert!(qemu_in(&cgroup), "QEMU not in {}", cgroup.display());

        let c1 = start_container(
            &mut rt,
            &pod_id,
            &pod,
            "one",
            &[
                "sh",
                "-c",
                "echo hello-from-one; echo data > /tmp/f; exec sleep 1000",
            ],
            false,
        )
        .await;
        let c2 = start_container(
            &mut rt,
            &pod_id,
            &pod,
            "two",
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo hello-from-the-pod > /www/index.html && \
                 exec httpd -f -p 8080 -h /www",
            ],
            false,
        )
        .await;
        assert_eq!(qemus(&env), 1, "the pod's containers share its VM");
        assert_eq!(
            container_state(&mut rt, &c1).await.0,
            ContainerState::ContainerRunning
        );
        assert_eq!(
            container_state(&mut rt, &c2).await.0,
            ContainerState::ContainerRunning
        );

        // The pod's IP, which CNI gave its network namespace, reaches the VM (issue #6).
        let page = http_get(&format!("{ip}:8080")).await;
        assert!(page.contains("hello-from-the-pod"), "{page:?}");

        // stdout reaches the CRI log file (through containerd's FIFOs).
        let log = env.dir.path().join("pod-logs/one.log");
        let text = wait_for_text(&log, "hello-from-one");
        assert!(text.contains("stdout F hello-from-one"), "{text:?}");

        let (out, err, code) = exec_sync(
            &mut rt,
            &c1,
            &["sh", "-c", "cat /tmp/f; echo oops >&2; exit 7"],
        )
        .await;
        assert_eq!((out.as_str(), err.as_str(), code), ("data\n", "oops\n", 7));
        // The VM booted at the pod's size: the base (1 vCPU, 512 MiB) plus its resources.
        let (cpus, _, _) = exec_sync(&mut rt, &c1, &["nproc"]).await;
        assert_eq!(cpus.trim(), "2", "vCPUs of a pod with a 1-CPU limit");
        let (meminfo, _, _) = exec_sync(&mut rt, &c1, &["head", "-1", "/proc/meminfo"]).await;
        let kib: u64 = meminfo
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            (600 << 10..=768 << 10).contains(&kib),
            "MemTotal of a pod with a 256 MiB limit: {meminfo:?}"
        );
        // ExecSync (every `kubectl exec`) runs under the container's seccomp filter, as the
        // container's init does.
        for pid in ["self", "1"] {
            let (out, _, code) = exec_sync(
                &mut rt,
                &c1,
                &["grep", "Seccomp:", &format!("/proc/{pid}/status")],
            )
            .await;
            assert_eq!(code, 0);
            assert!(out.contains("\t2"), "/proc/{pid}: {out:?}");
        }
        // The containers are separate: two has its own root filesystem.
        let (_, _, code) = exec_sync(&mut rt, &c2, &["test", "-e", "/tmp/f"]).await;
        assert_eq!(
            code, 1,
            "/tmp/f of container one is visible in container two"
        );

        let stats = rt
            .container_stats(ContainerStatsRequest {
                container_id: c1.clone(),
            })
            .await
            .expect("ContainerStats")
            .into_inner()
            .stats
            .expect("stats");
        let cpu = stats
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map(|v| v.value);
        let memory = stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map(|v| v.value);
        assert!(cpu.unwrap_or(0) > 0, "no CPU usage: {cpu:?}");
        assert!(memory.unwrap_or(0) > 0, "no memory usage: {memory:?}");

        // httpd as PID 1 ignores SIGTERM: the stop escalates to SIGKILL after the timeout.
        rt.stop_container(StopContainerRequest {
            container_id: c2.clone(),
            timeout: 2,
        })
        .await
        .expect("StopContainer");
        let (state, code) = container_state(&mut rt, &c2).await;
        assert_eq!(state, ContainerState::ContainerExited);
        assert_eq!(code, 137, "exit code of a SIGKILLed httpd");
        rt.remove_container(RemoveContainerRequest {
            container_id: c2.clone(),
        })
        .await
        .expect("RemoveContainer");
        assert!(
            rt.container_status(ContainerStatusRequest {
                container_id: c2.clone(),
                verbose: false,
            })
            .await
            .is_err(),
            "removed container still known"
        );
        assert_eq!(qemus(&env), 1, "the VM lives while its pod does");

        // A new container joins the same pod (and VM) after another was removed.
        // This one shares the pod's PID namespace (`shareProcessNamespace`).
        let c3 = start_container(&mut rt, &pod_id, &pod, "three", &["sleep", "1000"], true).await;
        let (init, _, _) = exec_sync(&mut rt, &c3, &["cat", "/proc/1/cmdline"]).await;
        assert_eq!(
            init, "sleep\x002147483647\x00",
            "PID 1 of a shared PID namespace: the pause"
        );
        let (init, _, _) = exec_sync(&mut rt, &c1, &["cat", "/proc/1/cmdline"]).await;
        assert_eq!(
            init, "sleep\x001000\x00",
            "PID 1 of container one's own PID namespace"
        );
        // The pod's containers share its UTS and IPC namespaces (CRI's default), in the VM.
        let (out, _, code) = exec_sync(&mut rt, &c3, &["hostname"]).await;
        assert_eq!(
            (out.as_str(), code),
            ("web-pod\n", 0),
            "hostname of the pod"
        );
        let ipc = ["readlink", "/proc/self/ns/ipc"];
        let (ipc1, _, _) = exec_sync(&mut rt, &c1, &ipc).await;
        let (ipc3, _, _) = exec_sync(&mut rt, &c3, &ipc).await;
        assert!(ipc1.starts_with("ipc:["), "{ipc1:?}");
        assert_eq!(ipc1, ipc3, "the pod's containers share its IPC namespace");
        assert_eq!(qemus(&env), 1, "the new container joined the pod's VM");
        hotplug::check(&mut rt, &pod_id, &pod, env.dir.path(), &c1).await;

        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .expect("StopPodSandbox");
        for id in [&c1, &c3] {
            assert_eq!(
                container_state(&mut rt, id).await.0,
                ContainerState::ContainerExited,
                "{id} after StopPodSandbox"
            );
        }
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .expect("RemovePodSandbox");
        let left = rt
            .list_containers(k8s_cri::v1::ListContainersRequest::default())
            .await
            .expect("ListContainers")
            .into_inner()
            .containers;
        assert!(left.is_empty(), "containers left: {left:?}");
        // The VM powers off behind StopPodSandbox's answer: its cgroup goes with it.
        let gone = eventually(|| !cgroup.exists());
        for c in [
            "memory", "cpu", "cpuacct", "pids", "cpuset", "devices", "freezer", "blkio", "",
        ] {
            let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{c}{}", cri_cgroup_parent()));
        }
        assert!(
            gone,
            "the pod's host cgroup outlived it: {}",
            cgroup.display()
        );
    });
    env.assert_clean();
    let new_netns: Vec<_> = netns_names()
        .into_iter()
        .filter(|n| !netns_before.contains(n))
        .collect();
    assert!(
        new_netns.is_empty(),
        "network namespaces left: {new_netns:?}"
    );
}

/// POSIX shared memory as applications use it: `write NAME TEXT` creates the object
/// (`shm_open` + `ftruncate` + `mmap(MAP_SHARED)`), puts TEXT in it, says `wrote`, and waits (up
/// to 60 s) for a reader's answer to appear in its own mapping, which it prints (`answer: ...`);
/// `read NAME` maps the existing object, prints its text and writes `ack TEXT` into it.
const SHM_CHECK_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SIZE 4096

static int fail(const char *what) {
    printf("%s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int writer = strcmp(argv[1], "write") == 0;
    int fd = shm_open(argv[2], writer ? O_RDWR | O_CREAT : O_RDWR, 0666);
    if (fd < 0) return fail("shm_open");
    if (writer && ftruncate(fd, SIZE) != 0) return fail("ftruncate");
    volatile char *p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return fail("mmap");
    if (writer) {
        if (argc < 4) return 2;
        strcpy((char *)p, argv[3]);
        printf("wrote\n");
        fflush(stdout);
        for (int i = 0; i < 600 && strncmp((char *)p, "ack ", 4) != 0; i++) usleep(100000);
        printf("answer: %s\n", (char *)p);
        return 0;
    }
    char text[256];
    snprintf(text, sizeof text, "%s", (char *)p);
    printf("%s\n", text);
    snprintf((char *)p, SIZE, "ack %s", text);
    return 0;
}
"#;

/// Unmounts a host mount when dropped (a failed test leaves no mount behind).
struct HostMount(std::path::PathBuf);

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The mount on `dest` in a container's mountinfo: (fs type, super options).
async fn guest_mount(rt: &mut Runtime, id: &str, dest: &str) -> (String, String) {
    let (info, _, _) = exec_sync(rt, id, &["cat", "/proc/self/mountinfo"]).await;
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(dest))
        .unwrap_or_else(|| panic!("no mount on {dest} in {id}: {info}"))
        .to_string();
    let after: Vec<&str> = line
        .split(" - ")
        .nth(1)
        .unwrap_or_default()
        .split(' ')
        .collect();
    (
        after[0].to_string(),
        after.get(2).unwrap_or(&"").to_string(),
    )
}

/// Creates and starts container `name` (running `sh -c command`) with `mounts` in the pod.
async fn start_with_mounts(
    rt: &mut Runtime,
    (pod_id, pod): (&str, &PodSandboxConfig),
    mounts: &[k8s_cri::v1::Mount],
    name: &str,
    command: &str,
) -> String {
    let mut config = container_config(name, &["sh", "-c", command], false);
    config.mounts = mounts.to_vec();
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
    id
}

#[test]
fn cri_pods_shm_and_memory_empty_dir_are_guest_memory_shared_by_its_containers() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start_cri(BRIDGE, SUBNET);
    // The test program, in a folder every container gets read-only.
    let tools = env.dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(tools.join("shm_check.c"), SHM_CHECK_C).unwrap();
    let gcc = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(tools.join("shm_check"))
        .arg(tools.join("shm_check.c"))
        .output()
        .expect("run gcc");
    assert!(
        gcc.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&gcc.stderr)
    );
    // A memory-backed emptyDir as kubelet makes it: a tmpfs mount point under the pod's
    // volumes, with the volume's sizeLimit as its size.
    let empty_dir = env
        .dir
        .path()
        .join("kubelet/pods/4b1c7f36/volumes/kubernetes.io~empty-dir/cache");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&empty_dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs on {empty_dir:?}");
    let _unmount = HostMount(empty_dir.clone());
    let mounts = vec![
        k8s_cri::v1::Mount {
            container_path: "/opt/tools".into(),
            host_path: tools.display().to_string(),
            readonly: true,
            ..Default::default()
        },
        k8s_cri::v1::Mount {
            container_path: "/cache".into(),
            host_path: empty_dir.display().to_string(),
            ..Default::default()
        },
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut rt = RuntimeServiceClient::new(channel(&env.socket).await);
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
        let writer = start_with_mounts(
            &mut rt,
            (&pod_id, &pod),
            &mounts,
            "writer",
            "echo from-writer > /cache/f && /opt/tools/shm_check write runvm-pod hello-shm; \
             exec sleep 1000",
        )
        .await;
        let reader = start_with_mounts(
            &mut rt,
            (&pod_id, &pod),
            &mounts,
            "reader",
            "exec sleep 1000",
        )
        .await;
        let log = env.dir.path().join("pod-logs/writer.log");
        let text = wait_for_text(&log, "wrote");
        assert!(text.contains("stdout F wrote"), "{text:?}");
        assert_eq!(qemus(&env), 1, "one VM for the pod");

        // /dev/shm is one guest tmpfs of the pod's size (containerd's 64 MiB), and POSIX shared
        // memory made in one container is the same memory in the other: the reader's answer
        // shows in the writer's mapping.
        for id in [&writer, &reader] {
            let (fstype, options) = guest_mount(&mut rt, id, "/dev/shm").await;
            assert_eq!(fstype, "tmpfs", "/dev/shm of {id}");
            assert!(
                options.contains("size=65536k"),
                "/dev/shm of {id}: {options}"
            );
        }
        let (out, err, code) = exec_sync(
            &mut rt,
            &reader,
            &["/opt/tools/shm_check", "read", "runvm-pod"],
        )
        .await;
        assert_eq!((out.as_str(), code), ("hello-shm\n", 0), "{err}");
        let text = wait_for_text(&log, "answer:");
        assert!(text.contains("answer: ack hello-shm"), "{text:?}");

        // The memory-backed emptyDir is one guest tmpfs of the volume's size, shared by the
        // pod's containers; its data stays in the guest (the host's tmpfs never sees it).
        let (fstype, options) = guest_mount(&mut rt, &reader, "/cache").await;
        assert_eq!(fstype, "tmpfs", "/cache");
        assert!(options.contains("size=8192k"), "/cache: {options}");
        let (out, _, _) = exec_sync(&mut rt, &reader, &["cat", "/cache/f"]).await;
        assert_eq!(out, "from-writer\n");
        assert!(
            !empty_dir.join("f").exists(),
            "the emptyDir's data reached the host"
        );

        // Both outlive the containers: they are the pod's, and a container created after the
        // others were removed (as a restarted one is) finds their data.
        for id in [&writer, &reader] {
            rt.stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout: 1,
            })
            .await
            .expect("StopContainer");
            rt.remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .expect("RemoveContainer");
        }
        let later = start_with_mounts(
            &mut rt,
            (&pod_id, &pod),
            &mounts,
            "later",
            "exec sleep 1000",
        )
        .await;
        let (out, _, _) = exec_sync(&mut rt, &later, &["cat", "/dev/shm/runvm-pod"]).await;
        assert!(out.starts_with("ack hello-shm"), "{out:?}");
        let (out, _, _) = exec_sync(&mut rt, &later, &["cat", "/cache/f"]).await;
        assert_eq!(
            out, "from-writer\n",
            "the emptyDir after its containers went"
        );
        assert_eq!(qemus(&env), 1, "one VM for the pod");

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
    env.assert_clean();
}

/// Waits until the CRI plugin sees the imported images.
async fn wait_for_images(images: &mut ImageServiceClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for image in [BUSYBOX, "docker.io/library/pause:latest"] {
        loop {
            let status = images
                .image_status(ImageStatusRequest {
                    image: Some(ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    verbose: false,
                })
                .await
                .expect("ImageStatus")
                .into_inner();
            if status.image.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "{image} never reached CRI");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A minimal WebSocket client for the streaming server's port-forward endpoint (Kubernetes'
/// `v4.channel.k8s.io`: each binary message starts with its channel, 0 = data, 1 = error).
mod ws {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct Client {
        stream: TcpStream,
    }

    /// Opens `url` (`http://HOST:PORT/PATH`) with the WebSocket upgrade.
    pub async fn connect(url: &str) -> std::io::Result<Client> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| std::io::Error::other(format!("not an http URL: {url}")))?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut stream = TcpStream::connect(host).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cnVudm0tcG9ydGZ3ZC10ZXN0\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: v4.channel.k8s.io\r\nOrigin: http://{host}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await?);
            if head.len() > 8192 {
                return Err(std::io::Error::other("handshake answer too long"));
            }
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            return Err(std::io::Error::other(format!("handshake refused: {head}")));
        }
        Ok(Client { stream })
    }

    impl Client {
        /// Sends `data` on `channel` (one masked binary frame, as a client must).
        pub async fn send(&mut self, channel: u8, data: &[u8]) -> std::io::Result<()> {
            let payload: Vec<u8> = std::iter::once(channel)
                .chain(data.iter().copied())
                .collect();
            let mask = [0x5a, 0x17, 0xc3, 0x81];
            let mut frame = vec![0x82];
            match payload.len() {
                n if n < 126 => frame.push(0x80 | n as u8),
                n if n < 65536 => {
                    frame.push(0x80 | 126);
                    frame.extend((n as u16).to_be_bytes());
                }
                n => {
                    frame.push(0x80 | 127);
                    frame.extend((n as u64).to_be_bytes());
                }
            }
            frame.extend(mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            self.stream.write_all(&frame).await
        }

        /// The next data message: `(channel, bytes)`; `None` once the server closed.
        pub async fn recv(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
            loop {
                let b0 = match self.stream.read_u8().await {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(e),
                };
                let b1 = self.stream.read_u8().await?;
                let mut len = u64::from(b1 & 0x7f);
                if len == 126 {
                    len = u64::from(self.stream.read_u16().await?);
                } else if len == 127 {
                    len = self.stream.read_u64().await?;
                }
                let mask = if b1 & 0x80 != 0 {
                    let mut m = [0u8; 4];
                    self.stream.read_exact(&mut m).await?;
                    Some(m)
                } else {
                    None
                };
                let mut payload = vec![0u8; len as usize];
                self.stream.read_exact(&mut payload).await?;
                if let Some(m) = mask {
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= m[i % 4];
                    }
                }
                match b0 & 0x0f {
                    0x8 => return Ok(None),
                    0x1 | 0x2 if !payload.is_empty() => {
                        return Ok(Some((payload[0], payload[1..].to_vec())))
                    }
                    _ => continue,
                }
            }
        }
    }
}

/// The pod network namespace runvm recorded for `pod_id` and its port-forward rule's port.
fn recorded_netns(env: &Env, pod_id: &str) -> (String, Option<u64>) {
    let path = env
        .dir
        .path()
        .join("runvm")
        .join(pod_id)
        .join("sandbox.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let record: serde_json::Value = serde_json::from_str(&text).unwrap();
    let network = &record["network"];
    (
        network["netns"].as_str().expect("a pod netns").to_string(),
        network["port_forward"]["listen_port"].as_u64(),
    )
}

/// `iptables -t nat -S OUTPUT` inside the namespace at `netns`.
fn nat_output_rules(netns: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["iptables", "-w", "5", "-t", "nat", "-S", "OUTPUT"])
        .output()
        .expect("running nsenter iptables");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CRI `PortForward` through containerd's streaming server, as `kubectl port-forward` does:
/// until the page comes back (the server may still be starting), at most 30 s.
async fn port_forward_get(rt: &mut Runtime, pod_id: &str, port: i32) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        let url = rt
            .port_forward(k8s_cri::v1::PortForwardRequest {
                pod_sandbox_id: pod_id.into(),
                port: vec![port],
            })
            .await
            .expect("PortForward")
            .into_inner()
            .url;
        let attempt = async {
            let mut ws = ws::connect(&url).await?;
            ws.send(0, b"GET / HTTP/1.0\r\n\r\n").await?;
            let (mut data, mut errors) = (Vec::new(), Vec::new());
            // Each channel starts with the port (2 bytes, little-endian).
            let (mut data_prefix, mut error_prefix) = (true, true);
            while let Some((channel, bytes)) = ws.recv().await? {
                let (prefix, sink) = match channel {
                    0 => (&mut data_prefix, &mut data),
                    _ => (&mut error_prefix, &mut errors),
                };
                if *prefix {
                    assert_eq!(bytes[..2], (port as u16).to_le_bytes(), "port prefix");
                    *prefix = false;
                    sink.extend(&bytes[2..]);
                } else {
                    sink.extend(bytes);
                }
                if String::from_utf8_lossy(&data).contains("portfwd-page") {
                    break;
                }
            }
            Ok::<_, std::io::Error>((
                String::from_utf8_lossy(&data).into_owned(),
                String::from_utf8_lossy(&errors).into_owned(),
            ))
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok((page, _))) if page.contains("portfwd-page") => return page,
            other => last = format!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("port-forward to {port} never carried the page: {last}");
}

/// As containerd's forwarder does: connects to `127.0.0.1:port` inside the network namespace
/// `netns` (on a thread that joined it), sends `data`, half-closes, reads to the end.
fn loopback_exchange_in_netns(netns: &str, port: u16, data: &[u8]) -> std::io::Result<String> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(netns)?;
    let data = data.to_vec();
    std::thread::spawn(move || {
        // SAFETY: setns only changes this short-lived thread's namespace; `ns` is an open
        // namespace file.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&data)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .expect("the netns thread")
}

#[test]
fn cri_port_forward_reaches_a_loopback_port_in_the_pod_vm_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start_cri("runvmpf0", "10.231.79.0/24");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ch = channel(&env.socket).await;
        let mut rt = RuntimeServiceClient::new(ch.clone());
        wait_for_images(&mut ImageServiceClient::new(ch)).await;
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
        // The server listens on the guest's loopback only: nothing else could reach it.
        let _web = start_container(
            &mut rt,
            &pod_id,
            &pod,
            "web",
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo portfwd-page > /www/index.html && \
                 exec httpd -f -p 127.0.0.1:8080 -h /www",
            ],
            false,
        )
        .await;

        // The rule is in the pod's namespace, recorded, and catches only loopback TCP.
        let (netns, listen_port) = recorded_netns(&env, &pod_id);
        let listen_port = listen_port.expect("a recorded port-forward rule");
        let rules = nat_output_rules(&netns);
        let expected = format!(
            "-A OUTPUT -d 127.0.0.1/32 -o lo -p tcp -m comment --comment \"runvm-portfwd:{pod_id}\" \
             -j REDIRECT --to-ports {listen_port}"
        );
        assert!(rules.contains(&expected), "{rules}");
        assert!(
            !nat_output_rules(&format!("/proc/{}/ns/net", std::process::id()))
                .contains("runvm-portfwd"),
            "a rule in the host's (the test's) namespace"
        );

        // Data both ways through containerd's streaming server, twice (two connections).
        for _ in 0..2 {
            let page = port_forward_get(&mut rt, &pod_id, 8080).await;
            assert!(page.starts_with("HTTP/1."), "{page:?}");
            assert!(page.contains("portfwd-page"), "{page:?}");
        }

        // A half-close crosses the VM boundary: the guest's `wc -c` reads to EOF, then answers
        // on the same connection (200,000 bytes: many frames, vsock credit updates).
        let _echo = start_container(
            &mut rt,
            &pod_id,
            &pod,
            "count",
            &[
                "sh",
                "-c",
                "printf '#!/bin/sh\\nwc -c\\necho done\\n' > /count && chmod +x /count && \
                 exec nc -ll -p 9090 -e /count",
            ],
            false,
        )
        .await;
        // RUNVM_PORTFWD_BYTES sends more, to measure (docs/networking.md).
        let size: usize = std::env::var("RUNVM_PORTFWD_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let data = vec![b'x'; size];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let started = Instant::now();
            let got = loopback_exchange_in_netns(&netns, 9090, &data);
            match &got {
                Ok(text) if text.split_whitespace().eq([size.to_string().as_str(), "done"]) => {
                    eprintln!(
                        "port-forward: {size} bytes in, answer out in {:?}",
                        started.elapsed()
                    );
                    break;
                }
                _ => assert!(Instant::now() < deadline, "half-close exchange: {got:?}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // Keep the namespace alive past the pod, to see that runvm removed its rule (rather
        // than the rule going with the namespace).
        let held = std::fs::File::open(&netns).expect("opening the pod's netns");
        let held_path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&held)
        );
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
        // The VM's teardown (behind StopPodSandbox's answer) removes the rule.
        eventually(|| !nat_output_rules(&held_path).contains("runvm-portfwd"));
        let rules = nat_output_rules(&held_path);
        assert!(!rules.contains("runvm-portfwd"), "rule left: {rules}");
        drop(held);
    });
    env.assert_clean();
}
