//! Guest replies on the host: the host's ttrpc agent client (`TtrpcAgent`) over one end of a
//! socket pair whose other end sends the fuzzed bytes as a hostile guest would (ttrpc frames
//! carrying protobuf responses), while the host makes a few calls the input picks. Covers the
//! ttrpc client's frame decoding, protobuf decoding and every check of `agent::convert`,
//! `agent::network`, `agent::guest_metrics`, `agent::telemetry` and the client (texts, sizes,
//! exit statuses, ids, interfaces, routes, guest metrics, guest log records).
//!
//! Input: the first four bytes pick the calls, the rest is what "the guest" sends.
#![no_main]

use std::time::Duration;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use runvm_fuzz::runtime;
use runvm_sandbox::agent::{
    Agent, GuestLogLevel, Interface, Neighbor, ProcessRef, Route, StdioSpec, TelemetryRequest,
    TtrpcAgent,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

async fn call(agent: &TtrpcAgent, which: u8) {
    let init = ProcessRef::init("c1");
    let exec = ProcessRef {
        container_id: "c1".into(),
        exec_id: "e1".into(),
    };
    let interface = Interface {
        name: "eth0".into(),
        mac: "02:00:00:00:00:01".into(),
        mtu: 1500,
        addresses: vec!["10.0.0.2/24".parse().expect("an address")],
        up: true,
    };
    let route = Route {
        destination: None,
        gateway: Some("10.0.0.1".parse().expect("an address")),
        device: "eth0".into(),
        source: None,
        scope: 0,
        metric: 0,
    };
    let neighbor = Neighbor {
        ip: "10.0.0.1".parse().expect("an address"),
        device: "eth0".into(),
        mac: "02:00:00:00:00:02".into(),
    };
    match which % 26 {
        0 => drop(agent.check().await),
        1 => drop(agent.version().await),
        2 => drop(agent.guest_details().await),
        3 => drop(agent.online_cpu_mem(2, Duration::from_secs(1)).await),
        4 => drop(agent.stats_container("c1").await),
        5 => drop(agent.list_processes("c1").await),
        6 => drop(agent.wait_process(&init).await),
        7 => drop(agent.resume_container("c1").await),
        8 => drop(agent.wait_process(&exec).await),
        9 => drop(agent.signal_process(&exec, 9, true).await),
        10 => drop(agent.oom_event().await),
        11 => drop(agent.update_interface(&interface).await),
        12 => drop(agent.list_interfaces().await),
        13 => drop(agent.update_routes(&[route]).await),
        14 => drop(agent.list_routes().await),
        15 => drop(agent.add_neighbors(&[neighbor]).await),
        16 => drop(agent.start_container("c1").await),
        17 => drop(agent.remove_container("c1", 5).await),
        18 => drop(agent.pause_container("c1").await),
        19 => drop(
            agent
                .update_container("c1", &json!({"cpu": {"shares": 2}}))
                .await,
        ),
        20 => drop(
            agent
                .exec_process(
                    &exec,
                    &json!({"args": ["sh"], "cwd": "/"}),
                    StdioSpec::default(),
                )
                .await,
        ),
        21 => drop(agent.signal_process(&init, 15, false).await),
        22 => drop(
            agent
                .exec_process(
                    &exec,
                    &json!({"args": ["cat"], "cwd": "/", "terminal": true}),
                    StdioSpec {
                        terminal: true,
                        stream_token: Some([7; 16]),
                        ..StdioSpec::default()
                    },
                )
                .await,
        ),
        23 => drop(agent.resize_tty(&exec, 24, 80).await),
        24 => drop(
            agent
                .read_telemetry(TelemetryRequest {
                    wait: Duration::ZERO,
                    level: GuestLogLevel::Debug,
                    max_records: 64,
                })
                .await,
        ),
        _ => drop(agent.guest_metrics().await),
    }
}

fuzz_target!(init: runvm_fuzz::write_seeds_and_exit_if_asked("agent_reply"), |data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut calls = [0u8; 4];
    for c in &mut calls {
        *c = u.arbitrary().unwrap_or(0);
    }
    let guest_says = u.take_rest();
    runtime().block_on(async {
        let (host, mut guest) = UnixStream::pair().expect("a socket pair");
        guest.write_all(guest_says).await.expect("the fuzz input fits the socket buffer");
        guest.shutdown().await.expect("shut the guest side's writes");
        let agent = TtrpcAgent::from_stream(host, Duration::from_secs(1));
        for which in calls {
            call(&agent, which).await;
        }
        drop(agent);
        drop(guest);
    });
});
