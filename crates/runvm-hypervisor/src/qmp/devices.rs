//! QMP commands for hot-added devices: netdevs and PCI cards.

use std::time::Duration;

use serde::de::IgnoredAny;
use serde_json::json;
use tokio::time::Instant;

use super::{QmpClient, QmpError};

impl QmpClient {
    /// Runs `netdev_add` for a tap backend: QEMU opens the tap `ifname` (in its network
    /// namespace) as netdev `id`; no scripts are run.
    pub async fn netdev_add_tap(
        &mut self,
        id: &str,
        ifname: &str,
        vhost: bool,
    ) -> Result<(), QmpError> {
        let args = json!({
            "type": "tap", "id": id, "ifname": ifname, "script": "no", "downscript": "no",
            "vhost": vhost,
        });
        self.execute::<IgnoredAny>("netdev_add", Some(args)).await?;
        Ok(())
    }

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
