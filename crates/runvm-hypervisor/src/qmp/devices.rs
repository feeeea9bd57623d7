//! QMP commands for hot-added devices: netdevs and PCI cards.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use serde::de::IgnoredAny;
use serde_json::json;
use tokio::time::Instant;

use super::{QmpClient, QmpError};

impl QmpClient {
    /// Runs `netdev_del`.
    pub async fn netdev_del(&mut self, id: &str) -> Result<(), QmpError> {
        self.execute::<IgnoredAny>("netdev_del", Some(json!({ "id": id })))
            .await?;
        Ok(())
    }

    /// Runs `device_add` with `properties` (an object holding at least `driver` and `id`).
    pub async fn device_add(&mut self, properties: serde_json::Value) -> Result<(), QmpError> {
        self.execute::<IgnoredAny>("device_add", Some(properties))
            .await?;
        Ok(())
    }

    /// Runs `device_del` and waits up to `timeout` for QEMU's `DEVICE_DELETED` event for `id`,
    /// which comes once the guest has let the device go. Returns whether it came.
    pub async fn device_del(&mut self, id: &str, timeout: Duration) -> Result<bool, QmpError> {
        let deleted = |client: &mut QmpClient| {
            client.events().any(|e| {
                e.event == "DEVICE_DELETED"
                    && e.data.get("device").and_then(|d| d.as_str()) == Some(id)
            })
        };
        self.execute::<IgnoredAny>("device_del", Some(json!({ "id": id })))
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            if deleted(self) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Any command reads the events that came before its reply.
            self.query_status().await?;
        }
    }
}

impl QmpClient {
    /// Runs `getfd`: passes `fd` to QEMU (SCM_RIGHTS on the monitor socket) under `name`, for
    /// a later command to use (`netdev_add` with `fd: name`).
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let command = "getfd";
        if self.write_interrupted {
            return Err(QmpError::Desynchronized { command });
        }
        let id = self.next_id;
        self.next_id += 1;
        let line = format!(
            "{}\n",
            json!({"execute": command, "arguments": {"fdname": name}, "id": id})
        );
        let io_err = |source| QmpError::Io { command, source };
        let stream: &tokio::net::UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        let sent = tokio::time::timeout(self.command_timeout, async {
            loop {
                stream.writable().await.map_err(io_err)?;
                let attempt = stream.try_io(tokio::io::Interest::WRITABLE, || {
                    let iov = [std::io::IoSlice::new(line.as_bytes())];
                    let cmsg = [ControlMessage::ScmRights(&fds)];
                    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                        .map_err(std::io::Error::from)
                });
                match attempt {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(io_err(e)),
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout {
            command,
            timeout: self.command_timeout,
        })??;
        if sent != line.len() {
            // The rest never went: the stream is no longer in step with QEMU.
            self.write_interrupted = true;
            return Err(QmpError::Desynchronized { command });
        }
        let timeout = self.command_timeout;
        match tokio::time::timeout(timeout, self.read_reply(command, id)).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(QmpError::Timeout { command, timeout }),
        }
    }

    /// Runs `netdev_add` for a tap backend given earlier with [`getfd`](Self::getfd) as
    /// `fdname`, with vhost-net if `vhostfd` names its device given the same way.
    pub async fn netdev_add_fd(
        &mut self,
        id: &str,
        fdname: &str,
        vhostfd: Option<&str>,
    ) -> Result<(), QmpError> {
        let args = match vhostfd {
            Some(v) => {
                json!({ "type": "tap", "id": id, "fd": fdname, "vhost": true, "vhostfd": v })
            }
            None => json!({ "type": "tap", "id": id, "fd": fdname }),
        };
        self.execute::<IgnoredAny>("netdev_add", Some(args)).await?;
        Ok(())
    }
}

/// A CPU slot of the machine, as `query-hotpluggable-cpus` lists it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct HotpluggableCpu {
    /// The CPU device's QOM type (for `device_add`'s `driver`), e.g. `qemu64-x86_64-cpu`.
    #[serde(rename = "type")]
    pub cpu_type: String,
    /// Where the slot is (`socket-id`, `core-id`, `thread-id`, `node-id`...): the properties a
    /// `device_add` of this slot takes.
    pub props: serde_json::Map<String, serde_json::Value>,
    /// The QOM path of the CPU in the slot; `None` while the slot is free.
    #[serde(rename = "qom-path", default)]
    pub qom_path: Option<String>,
}

impl QmpClient {
    /// Runs `query-hotpluggable-cpus`: the machine's CPU slots, taken or free.
    pub async fn query_hotpluggable_cpus(&mut self) -> Result<Vec<HotpluggableCpu>, QmpError> {
        self.execute("query-hotpluggable-cpus", None).await
    }

    /// Runs `qom-set`: sets `property` of the object at `path`.
    pub async fn qom_set(
        &mut self,
        path: &str,
        property: &str,
        value: serde_json::Value,
    ) -> Result<(), QmpError> {
        let args = json!({ "path": path, "property": property, "value": value });
        self.execute::<IgnoredAny>("qom-set", Some(args)).await?;
        Ok(())
    }

    /// Runs `qom-get`: reads `property` of the object at `path`.
    pub async fn qom_get<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        property: &str,
    ) -> Result<T, QmpError> {
        let args = json!({ "path": path, "property": property });
        self.execute("qom-get", Some(args)).await
    }
}
