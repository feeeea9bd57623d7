//! runvm-agent: PID 1 of a runvm sandbox VM.
//!
//! As PID 1 it mounts the kernel file systems, loads the kernel modules listed in
//! `/lib/modules/load-order`, reaps orphans, serves the agent API (ttrpc) on vsock port 1024
//! and port-forward streams on vsock port 1026 (`portfwd`). A `Shutdown` request or SIGTERM
//! makes it sync and power the VM off. Its log records are queued for the host, which reads
//! them with `ReadTelemetry` (`telemetry.rs`; on the console too until a host first reads).
//!
//! For tests on the host it can run as an ordinary process serving a unix socket:
//! `runvm-agent --listen unix:///tmp/agent.sock` (no mounts, no modules, exit instead of
//! power-off).

use std::sync::Arc;

use runvm_agent::service::{Agent, BootTimes};
use runvm_agent::{container, init, portfwd, reaper};
use runvm_protocol::agent_ttrpc::create_agent_service;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

/// What the agent logs on stderr outside a VM (tests): INFO, with youki's libraries quieter (libcgroups warns about every
/// controller it does not know, e.g. rdma and misc).
pub const LOG_FILTER: &str = "info,libcgroups=error,libcontainer=warn";

fn main() {
    // The agent re-executed as the single-threaded libcontainer helper (container/helper.rs).
    let mut args = std::env::args_os().skip(1);
    match args.next() {
        Some(a) if a == container::HIDDEN_ARG => container::helper_main::main(args.next()),
        // The zygote, re-executed after the one forked below died (container/zygote.rs).
        Some(a) if a == container::zygote::ZYGOTE_ARG => container::zygote_main::main(),
        // A createContainer hook, started by libcontainer (container/hook_root.rs).
        Some(a) if a == container::hook_root::HOOK_ARG => container::hook_root::main(args),
        _ => {}
    }
    let pid1 = std::process::id() == 1;
    let init_entered_us = init::boottime_us();
    if pid1 {
        init::mount_kernel_filesystems();
    }
    // While the process is single-threaded (no runtime, no logging yet): fork the zygote that
    // creates containers and processes (container/zygote.rs).
    container::zygote::fork_early();
    runvm_agent::telemetry::init_logging(pid1, LOG_FILTER);
    let listen = match listen_address(pid1) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("runvm-agent: {e}");
            std::process::exit(2);
        }
    };
    if pid1 {
        init::load_modules(std::path::Path::new(init::MODULE_ORDER_FILE));
    }
    let modules_loaded_us = init::boottime_us();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => init::fatal(pid1, &format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(serve(
        listen,
        BootTimes {
            init_entered_us,
            modules_loaded_us,
            agent_listening_us: 0,
        },
    ));
    if let Err(e) = result {
        init::fatal(pid1, &e);
    }
    drop(runtime);
    if pid1 {
        init::power_off();
    }
}

/// Where to serve: vsock as PID 1, or `--listen ADDR` (unix:// for tests).
fn listen_address(pid1: bool) -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] if pid1 => Ok(format!("vsock://-1:{}", runvm_protocol::AGENT_VSOCK_PORT)),
        [flag, addr] if flag == "--listen" => Ok(addr.clone()),
        [] => Err("not PID 1: pass --listen unix:///PATH to serve a unix socket".into()),
        other => Err(format!(
            "unexpected arguments {other:?}; usage: runvm-agent [--listen unix:///PATH]"
        )),
    }
}

async fn serve(listen: String, mut boot: BootTimes) -> Result<(), String> {
    let shutdown = Arc::new(Notify::new());
    if std::process::id() != 1 {
        // Outside a VM (tests): orphaned container processes must still come to us.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(error = %e, "cannot become a child subreaper");
        }
    }
    let reaper = reaper::Reaper::new();
    tokio::spawn(Arc::clone(&reaper).run());

    boot.agent_listening_us = init::boottime_us();
    let streams = container::streams::StreamRegistry::new();
    let agent = Agent::new(boot, Arc::clone(&shutdown), reaper, Arc::clone(&streams));
    let mut server =
        bind_with_retry(&listen)
            .await?
            .register_service(runvm_agent::telemetry::traced(create_agent_service(
                Arc::new(agent),
            )));
    server
        .start()
        .await
        .map_err(|e| format!("cannot serve on {listen}: {e}"))?;
    tracing::info!(address = %listen, version = env!("CARGO_PKG_VERSION"), "runvm-agent listening");
    if listen.starts_with("vsock://") {
        tokio::spawn(portfwd::serve_vsock());
        tokio::spawn(container::streams::serve_vsock(streams));
        tokio::spawn(announce_ready());
    }

    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    tokio::select! {
        _ = shutdown.notified() => tracing::info!("shutdown requested"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    // Let the Shutdown reply reach the host before the connection goes: the handler notifies
    // before it returns, and the server's shutdown closes connections at once.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await;
    Ok(())
}

/// Tells the host the agent listens: a connection to the host (CID 2) on
/// [`runvm_protocol::READY_VSOCK_PORT`] carrying one line. A host that does not listen there
/// refuses at once; it then finds the agent by polling.
async fn announce_ready() {
    use tokio::io::AsyncWriteExt;
    let addr = tokio_vsock::VsockAddr::new(2, runvm_protocol::READY_VSOCK_PORT);
    let sent = async {
        let mut stream = tokio_vsock::VsockStream::connect(addr).await?;
        stream.write_all(b"READY\n").await?;
        stream.shutdown(std::net::Shutdown::Write)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), sent).await {
        Ok(Ok(())) => tracing::debug!("readiness announced to the host"),
        Ok(Err(e)) => tracing::debug!(error = %e, "host does not take the readiness announcement"),
        Err(_) => tracing::debug!("readiness announcement timed out"),
    }
}

/// Binds the listener; vsock may need a moment after the transport module loads.
async fn bind_with_retry(listen: &str) -> Result<ttrpc::r#async::Server, String> {
    let mut last = String::new();
    for _ in 0..50 {
        match ttrpc::r#async::Server::new().bind(listen) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Err(format!("cannot listen on {listen}: {last}"))
}
