//! QMP replies and events: the QMP client over one end of a socket pair whose other end sends
//! the fuzzed bytes as QEMU would (the greeting, then replies and events, line by line), while
//! the client runs the handshake and a few commands the input picks.
//!
//! Input: the first four bytes pick the commands, the rest is what "QEMU" sends.
#![no_main]

use std::path::Path;
use std::time::Duration;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use runvm_fuzz::runtime;
use runvm_hypervisor::qmp::{QmpClient, QmpError};
use serde::de::IgnoredAny;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

async fn command(qmp: &mut QmpClient, which: u8) -> Result<(), QmpError> {
    match which % 13 {
        0 => qmp.query_status().await.map(drop),
        1 => qmp.stop().await,
        2 => qmp.cont().await,
        3 => qmp.system_powerdown().await,
        4 => qmp.quit().await,
        5 => qmp.query_hotpluggable_cpus().await.map(drop),
        6 => qmp
            .qom_get::<u64>("/machine/peripheral/mem0", "size")
            .await
            .map(drop),
        7 => qmp.qom_get::<Value>("/machine", "type").await.map(drop),
        8 => qmp
            .device_del("cpu1", Duration::from_millis(120))
            .await
            .map(drop),
        9 => qmp.netdev_del("net0").await,
        10 => {
            qmp.device_add(json!({"driver": "virtio-net-pci", "id": "net0"}))
                .await
        }
        11 => {
            qmp.qom_set("/machine/peripheral/mem0", "requested-size", json!(0))
                .await
        }
        _ => qmp
            .execute::<IgnoredAny>("query-version", None)
            .await
            .map(drop),
    }
}

fuzz_target!(init: runvm_fuzz::write_seeds_and_exit_if_asked("qmp"), |data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut commands = [0u8; 4];
    for c in &mut commands {
        *c = u.arbitrary().unwrap_or(0);
    }
    let qemu_says = u.take_rest();
    runtime().block_on(async {
        let (client, mut qemu) = UnixStream::pair().expect("a socket pair");
        qemu.write_all(qemu_says).await.expect("the fuzz input fits the socket buffer");
        // QEMU stops talking but keeps reading: the client's requests still go through.
        qemu.shutdown().await.expect("shut the QEMU side's writes");
        let connected = QmpClient::from_stream(client, Path::new("qmp.sock"), Duration::from_secs(5));
        let Ok(qmp) = connected.await else {
            return;
        };
        let mut qmp = qmp.with_command_timeout(Duration::from_secs(1));
        let _ = (qmp.version(), qmp.package().len(), qmp.capabilities().len());
        for which in commands {
            if let Err(QmpError::Closed { .. }) = command(&mut qmp, which).await {
                break;
            }
        }
        assert!(qmp.events().count() <= runvm_hypervisor::qmp::EVENT_BUFFER_CAPACITY);
        let _ = qmp.saw_event("SHUTDOWN");
        drop(qemu);
    });
});
