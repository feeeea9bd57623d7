//! The agent's request handlers: the agent's real ttrpc service (`runvm_agent::service::Agent`,
//! generated dispatch included) served in-process on a unix socket over a fake container
//! backend; each input is written as is to a new connection, as a hostile or broken host would
//! send it, and the answers are read to the end. Covers ttrpc's frame decoding, the request
//! protobufs, the dispatch, every handler and its error mapping. The network handlers run for
//! real, in a network namespace of the fuzzer's own (`isolate_network`).
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use runvm_agent::service::{Agent, BootTimes};
use runvm_fuzz::fake::FakeBackend;
use runvm_fuzz::{isolate_network, runtime, write_seeds_and_exit_if_asked};
use runvm_protocol::agent_ttrpc::create_agent_service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Notify;

struct Served {
    socket: PathBuf,
    backend: FakeBackend,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let dir = runvm_fuzz::scratch_dir("agent");
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let backend = FakeBackend::default();
        let boot = BootTimes {
            init_entered_us: 1,
            modules_loaded_us: 2,
            agent_listening_us: 3,
        };
        let agent = Agent::with_backend(boot, Arc::new(Notify::new()), backend.clone());
        let address = format!("unix://{}", socket.display());
        runtime().block_on(async {
            let mut server = ttrpc::r#async::Server::new()
                .bind(&address)
                .expect("bind the agent's socket")
                .register_service(create_agent_service(Arc::new(agent)));
            server.start().await.expect("start the agent's server");
            // Served for the life of the process.
            Box::leak(Box::new(server));
        });
        Served { socket, backend }
    })
}

fuzz_target!(
    init: {
        write_seeds_and_exit_if_asked("agent_service");
        isolate_network();
        served();
    },
    |data: &[u8]| {
        let served = served();
        served.backend.reset();
        runtime().block_on(async {
            let mut stream = UnixStream::connect(&served.socket).await.expect("connect to the agent");
            if stream.write_all(data).await.is_err() {
                return;
            }
            let _ = stream.shutdown().await;
            let mut answers = Vec::new();
            let read = stream.read_to_end(&mut answers);
            let _ = tokio::time::timeout(Duration::from_secs(30), read).await;
        });
    }
);
