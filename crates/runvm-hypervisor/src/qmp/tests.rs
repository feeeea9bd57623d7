//! Unit tests of the QMP client against a mock QMP server.

use std::collections::HashSet;
use std::error::Error as _;
use std::future::Future;

use serde_json::json;
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 11, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u13"}, "capabilities": ["oob"]}}"#;

/// The server side of one QMP connection.
struct MockQmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl MockQmp {
    async fn accept(listener: &UnixListener) -> Self {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, writer) = stream.into_split();
        MockQmp {
            reader: BufReader::new(read),
            writer,
        }
    }

    /// Sends one line, terminated like QEMU does (`\r\n`).
    async fn send(&mut self, line: &str) {
        self.send_raw(line.as_bytes()).await;
        self.send_raw(b"\r\n").await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("mock write");
    }

    /// Reads and parses one request line.
    async fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.expect("mock read");
        assert!(
            n > 0,
            "client closed the socket instead of sending a request"
        );
        assert!(
            line.ends_with('\n'),
            "request not newline-terminated: {line:?}"
        );
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("request {line:?} is not JSON: {e}"))
    }

    /// Reads a request, asserts it is exactly `{"execute": command, "id": <number>}`, and
    /// returns the id.
    async fn expect(&mut self, command: &str) -> u64 {
        let request = self.recv().await;
        let id = request["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("request without numeric id: {request}"));
        assert_eq!(request, json!({"execute": command, "id": id}));
        id
    }

    async fn reply(&mut self, id: u64, value: Value) {
        self.send(&json!({"return": value, "id": id}).to_string())
            .await;
    }

    async fn event(&mut self, name: &str, data: Value) {
        let event = json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": 1_700_000_000, "microseconds": 123_456},
        });
        self.send(&event.to_string()).await;
    }

    /// Sends the greeting and answers `qmp_capabilities`.
    async fn handshake(&mut self) -> u64 {
        self.send(GREETING).await;
        let id = self.expect("qmp_capabilities").await;
        self.reply(id, json!({})).await;
        id
    }

    /// Asserts the client sends nothing for `period`.
    async fn assert_silent(&mut self, period: Duration) {
        let mut line = String::new();
        let read = tokio::time::timeout(period, self.reader.read_line(&mut line)).await;
        assert!(read.is_err(), "client sent {line:?} too early");
    }

    /// Waits until the client closes the connection, ignoring what it sends.
    async fn wait_for_close(&mut self) {
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), self.reader.read_to_end(&mut sink))
            .await
            .expect("client never closed the connection")
            .expect("mock read");
    }
}

fn socket_path() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    (dir, path)
}

/// Listens on a fresh socket and runs `script` on the first connection.
fn serve<F, Fut>(script: F) -> (TempDir, PathBuf, JoinHandle<()>)
where
    F: FnOnce(MockQmp) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (dir, path) = socket_path();
    let listener = UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(async move {
        let mock = MockQmp::accept(&listener).await;
        script(mock).await;
    });
    (dir, path, server)
}

/// Waits for the mock server and surfaces its assertion failures.
async fn finish(server: JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("mock server hung")
        .expect("mock server failed");
}

async fn connect(path: &Path) -> QmpClient {
    QmpClient::connect(path, Duration::from_secs(5))
        .await
        .expect("connect")
}

#[tokio::test]
async fn greeting_version_is_parsed_and_capabilities_negotiated() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        // The client must wait for the greeting before sending anything.
        qmp.assert_silent(Duration::from_millis(100)).await;
        qmp.handshake().await;
        qmp.wait_for_close().await;
    });
    let client = connect(&path).await;
    assert_eq!(
        client.version(),
        QemuVersion {
            major: 7,
            minor: 2,
            micro: 11
        }
    );
    assert_eq!(client.version().to_string(), "7.2.11");
    assert!(
        client.version()
            >= QemuVersion {
                major: 7,
                minor: 0,
                micro: 0
            }
    );
    assert_eq!(client.package(), "Debian 1:7.2+dfsg-7+deb12u13");
    assert_eq!(client.capabilities(), ["oob"]);
    assert_eq!(client.path(), path);
    assert_eq!(client.command_timeout(), DEFAULT_COMMAND_TIMEOUT);
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn query_status_is_parsed_into_running_and_paused() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        for status in ["running", "paused", "guest-panicked", "some-future-state"] {
            let id = qmp.expect("query-status").await;
            let running = status == "running";
            qmp.reply(
                id,
                json!({"status": status, "singlestep": false, "running": running}),
            )
            .await;
        }
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    assert_eq!(client.query_status().await.unwrap(), VmRunState::Running);
    assert_eq!(client.query_status().await.unwrap(), VmRunState::Paused);
    assert_eq!(
        client.query_status().await.unwrap(),
        VmRunState::GuestPanicked
    );
    assert_eq!(
        client.query_status().await.unwrap(),
        VmRunState::Other("some-future-state".into())
    );
    drop(client);
    finish(server).await;
}

#[test]
fn run_state_names_round_trip() {
    let names = [
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    ];
    for name in names {
        let state = VmRunState::from(name);
        assert!(!matches!(state, VmRunState::Other(_)), "{name} not known");
        assert_eq!(state.as_str(), name);
        assert_eq!(VmRunState::from(name.to_owned()), state);
        let parsed: VmRunState = serde_json::from_value(json!(name)).unwrap();
        assert_eq!(parsed, state);
    }
    assert_eq!(VmRunState::from("bogus"), VmRunState::Other("bogus".into()));
    assert_eq!(VmRunState::Other("bogus".into()).to_string(), "bogus");
}

#[tokio::test]
async fn commands_send_the_expected_json() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        for command in ["stop", "cont", "system_powerdown"] {
            let id = qmp.expect(command).await;
            qmp.reply(id, json!({})).await;
        }
        let request = qmp.recv().await;
        let id = request["id"].as_u64().expect("numeric id");
        assert_eq!(
            request,
            json!({
                "execute": "human-monitor-command",
                "arguments": {"command-line": "info version"},
                "id": id,
            })
        );
        qmp.reply(id, json!("7.2.11 (Debian 1:7.2+dfsg-7+deb12u13)\r\n"))
            .await;
        let id = qmp.expect("quit").await;
        qmp.reply(id, json!({})).await;
    });
    let mut client = connect(&path).await;
    client.stop().await.unwrap();
    client.cont().await.unwrap();
    client.system_powerdown().await.unwrap();
    let version: String = client
        .execute(
            "human-monitor-command",
            Some(json!({"command-line": "info version"})),
        )
        .await
        .unwrap();
    assert!(version.starts_with("7.2.11"), "{version:?}");
    client.quit().await.unwrap();
    finish(server).await;
}

#[tokio::test]
async fn events_before_a_reply_are_skipped_and_recorded() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        let id = qmp.expect("stop").await;
        qmp.event("STOP", Value::Null).await;
        qmp.event(
            "BLOCK_IO_ERROR",
            json!({"device": "drive0", "operation": "write", "action": "stop"}),
        )
        .await;
        qmp.reply(id, json!({})).await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    client.stop().await.unwrap();

    let names: Vec<&str> = client.events().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["STOP", "BLOCK_IO_ERROR"]);
    let io_error = client.events().nth(1).unwrap();
    assert_eq!(io_error.data["device"], "drive0");
    assert_eq!(
        io_error.timestamp,
        Some(QmpTimestamp {
            seconds: 1_700_000_000,
            microseconds: 123_456
        })
    );
    assert!(client.saw_event("STOP"));
    assert!(!client.saw_event("RESUME"));

    let taken = client.take_events();
    assert_eq!(taken.len(), 2);
    assert_eq!(taken[0].event, "STOP");
    assert_eq!(client.events().len(), 0);
    assert!(!client.saw_event("STOP"));
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn event_buffer_keeps_only_the_latest_events() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        let id = qmp.expect("cont").await;
        for i in 0..EVENT_BUFFER_CAPACITY + 6 {
            qmp.event(&format!("E{i}"), json!({"i": i})).await;
        }
        qmp.reply(id, json!({})).await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    client.cont().await.unwrap();
    assert_eq!(client.events().len(), EVENT_BUFFER_CAPACITY);
    assert_eq!(client.events().next().unwrap().event, "E6");
    assert_eq!(
        client.events().last().unwrap().event,
        format!("E{}", EVENT_BUFFER_CAPACITY + 5)
    );
    assert!(!client.saw_event("E5"));
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn qemu_error_reply_becomes_typed_error_with_class_and_desc() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        let id = qmp.expect("cont").await;
        let error = json!({
            "error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"},
            "id": id,
        });
        qmp.send(&error.to_string()).await;
        // An error without an id is QEMU rejecting the request itself: taken as ours.
        qmp.expect("stop").await;
        qmp.send(
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword"}}"#,
        )
        .await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    let err = client.cont().await.unwrap_err();
    match &err {
        QmpError::Qemu {
            command,
            class,
            desc,
        } => {
            assert_eq!(*command, "cont");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "Resetting the Virtual Machine is required");
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "QEMU refused cont: GenericError: Resetting the Virtual Machine is required"
    );

    let err = client.stop().await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Qemu { command: "stop", desc, .. } if desc.starts_with("JSON parse error")),
        "{err:?}"
    );
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn garbage_reply_gives_malformed_error_with_bounded_excerpt() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        qmp.expect("cont").await;
        qmp.send(&format!("this is not json {}", "y".repeat(1000)))
            .await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    let err = client.cont().await.unwrap_err();
    let QmpError::Malformed {
        command, excerpt, ..
    } = &err
    else {
        panic!("expected a malformed error, got {err:?}");
    };
    assert_eq!(*command, "cont");
    assert!(excerpt.starts_with("this is not json yyy"), "{excerpt:?}");
    assert!(excerpt.ends_with('…'), "{excerpt:?}");
    assert_eq!(excerpt.chars().count(), EXCERPT_CHARS + 1);
    // Display carries the excerpt but not the parse error, which is the source.
    let source = err.source().expect("parse error as source").to_string();
    assert!(!err.to_string().contains(&source), "{err}");
    assert!(err.to_string().contains("this is not json"), "{err}");
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn valid_json_of_the_wrong_shape_gives_unexpected_reply() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        qmp.expect("query-status").await;
        qmp.send(r#"{"hello": 1}"#).await;
        let id = qmp.expect("query-status").await;
        qmp.reply(id, json!(42)).await;
        qmp.expect("query-status").await;
        qmp.send("[1, 2]").await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    for _ in 0..3 {
        let err = client.query_status().await.unwrap_err();
        assert!(
            matches!(
                &err,
                QmpError::UnexpectedReply {
                    command: "query-status",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn unanswered_command_times_out_naming_the_command() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        qmp.expect("query-status").await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path)
        .await
        .with_command_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let err = client.query_status().await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(
        matches!(
            err,
            QmpError::Timeout {
                command: "query-status",
                timeout
            } if timeout == Duration::from_millis(200)
        ),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "QMP query-status timed out after 200ms");
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn late_reply_after_a_timeout_is_not_taken_for_the_next_command() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        let late = qmp.expect("query-status").await;
        let current = qmp.expect("query-status").await;
        assert_ne!(late, current);
        qmp.reply(late, json!({"status": "paused", "running": false}))
            .await;
        qmp.reply(current, json!({"status": "running", "running": true}))
            .await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path)
        .await
        .with_command_timeout(Duration::from_millis(200));
    let err = client.query_status().await.unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    assert_eq!(client.query_status().await.unwrap(), VmRunState::Running);
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn request_ids_are_unique_and_replies_to_other_ids_are_skipped() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        let mut ids = HashSet::new();
        assert!(ids.insert(qmp.handshake().await));
        for command in ["stop", "cont"] {
            let id = qmp.expect(command).await;
            assert!(ids.insert(id), "id {id} reused");
            qmp.reply(id, json!({})).await;
        }
        let id = qmp.expect("query-status").await;
        assert!(ids.insert(id), "id {id} reused");
        qmp.reply(id + 1000, json!({"status": "paused", "running": false}))
            .await;
        qmp.reply(id, json!({"status": "running", "running": true}))
            .await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    client.stop().await.unwrap();
    client.cont().await.unwrap();
    assert_eq!(client.query_status().await.unwrap(), VmRunState::Running);
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn eof_mid_command_gives_closed_error() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        qmp.expect("stop").await;
        // Half a reply, then the socket closes.
        qmp.send_raw(br#"{"return": "#).await;
    });
    let mut client = connect(&path).await;
    let err = client.stop().await.unwrap_err();
    assert!(
        matches!(err, QmpError::Closed { command: "stop" }),
        "{err:?}"
    );
    finish(server).await;
}

#[tokio::test]
async fn quit_followed_by_eof_is_ok() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        qmp.expect("quit").await;
        // QEMU exits without answering.
    });
    let mut client = connect(&path).await;
    client.quit().await.unwrap();
    finish(server).await;
}

#[tokio::test]
async fn quit_with_shutdown_event_then_eof_is_ok_and_records_the_event() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        qmp.expect("quit").await;
        qmp.event(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        )
        .await;
    });
    let mut client = connect(&path).await;
    client.quit().await.unwrap();
    assert!(client.saw_event("SHUTDOWN"));
    finish(server).await;
}

#[tokio::test]
async fn over_long_line_is_refused_without_waiting_for_its_end() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        qmp.expect("query-status").await;
        // More than the limit and no newline yet: the client must not wait for one.
        qmp.send_raw(&vec![b'x'; MAX_LINE_LEN + 1]).await;
        let id = qmp.expect("query-status").await;
        qmp.send_raw(b"xxx end of the long line\r\n").await;
        qmp.reply(id, json!({"status": "running", "running": true}))
            .await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    let started = Instant::now();
    let err = client.query_status().await.unwrap_err();
    assert!(
        matches!(
            err,
            QmpError::LineTooLong {
                command: "query-status",
                limit: MAX_LINE_LEN
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < DEFAULT_COMMAND_TIMEOUT);
    // The rest of the long line is skipped and the client keeps working.
    assert_eq!(client.query_status().await.unwrap(), VmRunState::Running);
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn line_of_exactly_the_limit_is_accepted() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.handshake().await;
        let id = qmp.expect("query-status").await;
        let mut reply = json!({"return": {"status": "running"}, "id": id}).to_string();
        let pad = MAX_LINE_LEN - reply.len();
        reply.insert_str(1, &" ".repeat(pad));
        assert_eq!(reply.len(), MAX_LINE_LEN);
        reply.push('\n');
        qmp.send_raw(reply.as_bytes()).await;
        qmp.wait_for_close().await;
    });
    let mut client = connect(&path).await;
    assert_eq!(client.query_status().await.unwrap(), VmRunState::Running);
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn connect_retries_until_the_socket_appears() {
    let (_dir, path) = socket_path();
    // A socket file nobody listens on yet: connecting is refused at first.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let server_path = path.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::remove_file(&server_path).expect("remove stale socket");
        let listener = UnixListener::bind(&server_path).expect("bind");
        let mut qmp = MockQmp::accept(&listener).await;
        qmp.handshake().await;
        qmp.wait_for_close().await;
    });
    let started = Instant::now();
    let client = connect(&path).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(client.version().major, 7);
    drop(client);
    finish(server).await;
}

#[tokio::test]
async fn connect_gives_up_after_the_timeout() {
    let (_dir, path) = socket_path();
    let started = Instant::now();
    let err = QmpClient::connect(&path, Duration::from_millis(200))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    let QmpError::Connect {
        path: err_path,
        source,
    } = &err
    else {
        panic!("expected a connect error, got {err:?}");
    };
    assert_eq!(err_path, &path);
    assert_eq!(source.kind(), io::ErrorKind::NotFound);
    // Display names the path but does not repeat the source.
    assert!(err.to_string().contains(&path.display().to_string()));
    assert!(!err.to_string().contains(&source.to_string()), "{err}");
}

#[tokio::test]
async fn missing_greeting_times_out() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.wait_for_close().await;
    });
    let err = QmpClient::connect(&path, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            QmpError::Timeout {
                command: "greeting",
                ..
            }
        ),
        "{err:?}"
    );
    finish(server).await;
}

#[tokio::test]
async fn bad_greeting_is_rejected() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.send(r#"{"return": {}}"#).await;
        qmp.wait_for_close().await;
    });
    let err = QmpClient::connect(&path, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            QmpError::UnexpectedReply {
                command: "greeting",
                ..
            }
        ),
        "{err:?}"
    );
    finish(server).await;
}

#[tokio::test]
async fn refused_capabilities_fail_the_connect() {
    let (_dir, path, server) = serve(|mut qmp| async move {
        qmp.send(GREETING).await;
        let id = qmp.expect("qmp_capabilities").await;
        let error = json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id});
        qmp.send(&error.to_string()).await;
        qmp.wait_for_close().await;
    });
    let err = QmpClient::connect(&path, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, QmpError::Qemu { command: "qmp_capabilities", class, .. } if class == "CommandNotFound"),
        "{err:?}"
    );
    finish(server).await;
}

#[test]
fn excerpt_is_bounded_on_character_boundaries() {
    assert_eq!(excerpt(b"  short\r\n"), "short");
    assert_eq!(excerpt(b"a\x07b"), "a\\u{7}b");
    let long = "é".repeat(EXCERPT_CHARS + 50);
    let cut = excerpt(long.as_bytes());
    assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
    assert!(cut.starts_with("éé") && cut.ends_with('…'));
    let huge = vec![b'z'; MAX_LINE_LEN];
    assert_eq!(excerpt(&huge).chars().count(), EXCERPT_CHARS + 1);
}
