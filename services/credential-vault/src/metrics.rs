//! The vault's own metrics, beside the HTTP and event metrics every service has.

use std::time::Duration;

use common::metrics::register;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Decrypting one value is AES-GCM twice over a few KiB: microseconds. Buckets from
/// 10 µs to 10 ms show both the normal case and a starved CPU.
const DECRYPT_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
];

/// One audit batch is one database transaction: sub-millisecond on a local SQLite file,
/// a few milliseconds on PostgreSQL, seconds only when something is wrong.
const AUDIT_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Batch sizes: 1 when idle, up to the writer's cap (256) under load.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug, Clone)]
pub struct VaultMetrics {
    /// Operations by kind and outcome (the audit record's action and outcome).
    pub operations: IntCounterVec,
    /// Time to open one sealed value (unwrap the data key, decrypt).
    pub decrypt_seconds: Histogram,
    /// Time to write one batch of audit records, changes included.
    pub audit_append_seconds: Histogram,
    /// Records per audit batch (group commit at work).
    pub audit_batch_size: Histogram,
    /// Requests refused because their audit record could not be written.
    pub audit_failures: IntCounter,
    /// Encryptions under each master key by this process (AES-GCM with random nonces
    /// must rotate its key well before 2^32 of them).
    pub master_key_encryptions: IntCounterVec,
    /// Credential versions sealed under each master key, counted in the database: the
    /// figure that lasts across replicas and restarts, for the alert well before 2^32.
    pub master_key_sealed_versions: IntGaugeVec,
}

impl VaultMetrics {
    /// One operation, by its audit record's action and final outcome.
    pub fn operation(&self, action: &str, outcome: crate::audit::Outcome) {
        self.operations
            .with_label_values(&[action, outcome.as_str()])
            .inc();
    }

    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            operations: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "concierge_vault_operations_total",
                        "Vault operations, by kind and outcome.",
                    ),
                    &["operation", "outcome"],
                )?,
            )?,
            decrypt_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "concierge_vault_decrypt_duration_seconds",
                        "Time to open one sealed credential value.",
                    )
                    .buckets(DECRYPT_BUCKETS.to_vec()),
                )?,
            )?,
            audit_append_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "concierge_vault_audit_append_duration_seconds",
                        "Time to commit one batch of audit records with the changes they record.",
                    )
                    .buckets(AUDIT_BUCKETS.to_vec()),
                )?,
            )?,
            audit_batch_size: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "concierge_vault_audit_batch_size",
                        "Audit records committed per transaction.",
                    )
                    .buckets(BATCH_BUCKETS.to_vec()),
                )?,
            )?,
            audit_failures: register(
                registry,
                IntCounter::new(
                    "concierge_vault_audit_failures_total",
                    "Requests refused because their audit record could not be written.",
                )?,
            )?,
            master_key_encryptions: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "concierge_vault_master_key_encryptions_total",
                        "Encryptions under each master key by this process; rotate well before 2^32.",
                    ),
                    &["master_key_id"],
                )?,
            )?,
            master_key_sealed_versions: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "concierge_vault_master_key_sealed_versions",
                        "Credential versions sealed under each master key, counted in the database (all replicas, all restarts); AES-GCM with random nonces: rotate well before 2^32.",
                    ),
                    &["master_key_id"],
                )?,
            )?,
        })
    }

    pub fn observe_audit_batch(&self, size: usize, elapsed: Duration) {
        self.audit_batch_size.observe(size as f64);
        self.audit_append_seconds.observe(elapsed.as_secs_f64());
    }
}
