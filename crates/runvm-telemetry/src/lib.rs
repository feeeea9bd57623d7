//! runvm telemetry (being written).
