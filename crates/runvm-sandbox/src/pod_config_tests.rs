//! Tests of [`super`]: the allowlist, value parsing, refusals and sizing arithmetic.

use super::*;

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const HOST: HostCapacity = HostCapacity {
    cpus: 8,
    memory_mib: 16_384,
};

#[test]
fn patterns_match_whole_keys_with_star_as_any_run() {
    assert!(pattern_matches("hypervisor.vcpus", "hypervisor.vcpus"));
    assert!(!pattern_matches("hypervisor.vcpus", "hypervisor.vcpus2"));
    assert!(!pattern_matches("hypervisor.vcpus", "hypervisor.vcpu"));
    assert!(pattern_matches("hypervisor.*", "hypervisor.memory_mib"));
    assert!(pattern_matches("*", "guest.kernel"));
    assert!(pattern_matches("*.memory_mib", "hypervisor.memory_mib"));
    assert!(pattern_matches("h*r.*_mib", "hypervisor.memory_mib"));
    assert!(!pattern_matches("hypervisor.*", "guest.kernel"));
    assert!(!pattern_matches("", "guest.kernel"));
}

#[test]
fn malformed_patterns_are_refused_by_validate() {
    assert!(valid_pattern("hypervisor.*"));
    for bad in ["", "Hypervisor.vcpus", "guest/kernel", "a b"] {
        let mut c = Config::default();
        c.runtime.enable_annotations = vec![bad.into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("runtime.enable_annotations"), "{err}");
        assert!(err.contains(&format!("{bad:?}")), "{err}");
    }
}

#[test]
fn default_allowlist_is_the_sizes_only() {
    let c = Config::default();
    assert_eq!(
        c.runtime.enable_annotations,
        vec!["hypervisor.vcpus", "hypervisor.memory_mib"]
    );
}

#[test]
fn allowed_size_annotations_set_the_keys_parsed_as_toml_integers() {
    let c = apply_config_annotations(
        &Config::default(),
        &ann(&[
            ("io.runvm.config.hypervisor.vcpus", "2"),
            ("io.runvm.config.hypervisor.memory_mib", " 768 "),
            ("io.kubernetes.cri.sandbox-id", "abc"),
        ]),
    )
    .unwrap();
    assert_eq!(c.hypervisor.vcpus, 2);
    assert_eq!(c.hypervisor.memory_mib, 768);
    let mut other = c.clone();
    other.hypervisor.vcpus = 1;
    other.hypervisor.memory_mib = 512;
    assert_eq!(other, Config::default());
}

#[test]
fn no_config_annotations_leave_the_config_as_is() {
    let c = Config::default();
    assert_eq!(
        apply_config_annotations(&c, &ann(&[("other", "x")])).unwrap(),
        c
    );
}

#[test]
fn kernel_and_program_annotations_are_refused_by_default_naming_them() {
    for (name, value) in [
        ("io.runvm.config.guest.kernel", "/tmp/evil"),
        ("io.runvm.config.guest.initrd", "/tmp/evil.img"),
        (
            "io.runvm.config.hypervisor.kernel_params",
            "[\"init=/bin/sh\"]",
        ),
        ("io.runvm.config.hypervisor.qemu", "/tmp/qemu"),
        ("io.runvm.config.hypervisor.max_vcpus", "64"),
    ] {
        let err = apply_config_annotations(&Config::default(), &ann(&[(name, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{err}");
        assert!(err.contains(value.replace('"', "\\\"").as_str()), "{err}");
        assert!(err.contains("not allowed"), "{err}");
        assert!(
            err.contains("\"hypervisor.vcpus\", \"hypervisor.memory_mib\""),
            "{err}"
        );
    }
}

#[test]
fn runtime_keys_are_never_allowed_even_by_a_catch_all_pattern() {
    let mut c = Config::default();
    c.runtime.enable_annotations = vec!["*".into()];
    for name in [
        "io.runvm.config.runtime.root",
        "io.runvm.config.runtime.enable_annotations",
    ] {
        let err = apply_config_annotations(&c, &ann(&[(name, "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains("never"), "{err}");
    }
}

#[test]
fn an_empty_allowlist_refuses_every_config_annotation() {
    let mut c = Config::default();
    c.runtime.enable_annotations = Vec::new();
    let err = apply_config_annotations(&c, &ann(&[("io.runvm.config.hypervisor.vcpus", "2")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("allows none"), "{err}");
}

#[test]
fn enabled_keys_of_other_types_parse_as_their_toml_type() {
    let mut c = Config::default();
    c.runtime.enable_annotations = vec!["hypervisor.*".into(), "guest.kernel".into()];
    let out = apply_config_annotations(
        &c,
        &ann(&[
            ("io.runvm.config.hypervisor.accelerator", "tcg"),
            (
                "io.runvm.config.hypervisor.kernel_params",
                "[\"quiet\", \"loglevel=3\"]",
            ),
            ("io.runvm.config.guest.kernel", "/opt/k/vmlinuz"),
        ]),
    )
    .unwrap();
    assert_eq!(out.hypervisor.accelerator, runvm_hypervisor::AccelMode::Tcg);
    assert_eq!(out.hypervisor.kernel_params, vec!["quiet", "loglevel=3"]);
    assert_eq!(out.guest.kernel, std::path::PathBuf::from("/opt/k/vmlinuz"));
    // A value smuggling a second key is not one TOML value.
    let err = apply_config_annotations(
        &c,
        &ann(&[(
            "io.runvm.config.hypervisor.kernel_params",
            "[]\n[guest]\nkernel = \"/x\"",
        )]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("kernel_params"), "{err}");
}

#[test]
fn bad_values_are_refused_naming_the_annotation_value_and_range() {
    for (name, value, valid) in [
        ("io.runvm.config.hypervisor.vcpus", "0", "1 to 255"),
        ("io.runvm.config.hypervisor.vcpus", "-1", "expected u32"),
        ("io.runvm.config.hypervisor.vcpus", "256", "1 to 255"),
        ("io.runvm.config.hypervisor.vcpus", "two", "an integer"),
        ("io.runvm.config.hypervisor.vcpus", "1.5", "an integer"),
        (
            "io.runvm.config.hypervisor.memory_mib",
            "0",
            "64 to 1048576",
        ),
        (
            "io.runvm.config.hypervisor.memory_mib",
            "63",
            "64 to 1048576",
        ),
        ("io.runvm.config.hypervisor.memory_mib", "", "an integer"),
    ] {
        let err = apply_config_annotations(&Config::default(), &ann(&[(name, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{name}={value:?}")), "{err}");
        assert!(err.contains(valid), "{err}");
    }
}

#[test]
fn an_enabled_pattern_does_not_invent_keys() {
    let mut c = Config::default();
    c.runtime.enable_annotations = vec!["hypervisor.*".into()];
    let err = apply_config_annotations(&c, &ann(&[("io.runvm.config.hypervisor.cpus", "2")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hypervisor.cpus is not a configuration key"),
        "{err}"
    );
}

#[test]
fn cri_annotations_add_quota_over_period_rounded_up_and_the_memory_limit() {
    let a = ann(&[
        (CRI_SANDBOX_CPU_PERIOD, "100000"),
        (CRI_SANDBOX_CPU_QUOTA, "220000"),
        (CRI_SANDBOX_CPU_SHARES, "2253"),
        (CRI_SANDBOX_MEMORY, "1073741824"),
    ]);
    assert_eq!(
        cri_workload(&a).unwrap(),
        Workload {
            vcpus: 3,
            memory_mib: 1024
        }
    );
    let size = boot_size(&Config::default(), &Config::default(), &a, HOST).unwrap();
    assert_eq!(
        size,
        BootSize {
            vcpus: 4,
            memory_mib: 1536
        }
    );
    // A partial MiB rounds up.
    let a = ann(&[(CRI_SANDBOX_MEMORY, "1048577")]);
    assert_eq!(cri_workload(&a).unwrap().memory_mib, 2);
}

#[test]
fn cri_annotations_without_limits_add_nothing() {
    for a in [
        ann(&[]),
        ann(&[
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_CPU_QUOTA, "0"),
        ]),
        ann(&[
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_CPU_QUOTA, "-1"),
        ]),
        ann(&[
            (CRI_SANDBOX_CPU_PERIOD, "0"),
            (CRI_SANDBOX_CPU_QUOTA, "50000"),
        ]),
        ann(&[(CRI_SANDBOX_MEMORY, "0"), (CRI_SANDBOX_CPU_SHARES, "1024")]),
    ] {
        assert_eq!(cri_workload(&a).unwrap(), Workload::default(), "{a:?}");
    }
}

#[test]
fn malformed_cri_annotations_are_refused_by_name() {
    for (name, value) in [
        (CRI_SANDBOX_CPU_QUOTA, "lots"),
        (CRI_SANDBOX_CPU_PERIOD, "1e5"),
        (CRI_SANDBOX_MEMORY, "-5"),
        (CRI_SANDBOX_MEMORY, "1Gi"),
    ] {
        let err = cri_workload(&ann(&[(name, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains(value), "{err}");
    }
}

#[test]
fn annotations_set_the_base_and_cri_adds_to_it() {
    let a = ann(&[
        ("io.runvm.config.hypervisor.vcpus", "2"),
        ("io.runvm.config.hypervisor.memory_mib", "768"),
        (CRI_SANDBOX_CPU_PERIOD, "100000"),
        (CRI_SANDBOX_CPU_QUOTA, "100000"),
        (CRI_SANDBOX_MEMORY, "268435456"),
    ]);
    let (effective, size) = pod_config(&Config::default(), &a, HOST).unwrap();
    // The base stays the base in the sandbox's configuration; the boot size adds the pod's.
    assert_eq!(effective.hypervisor.vcpus, 2);
    assert_eq!(effective.hypervisor.memory_mib, 768);
    assert_eq!(
        size,
        BootSize {
            vcpus: 3,
            memory_mib: 1024
        }
    );
}

#[test]
fn a_size_past_the_maximum_is_refused_naming_the_key_and_source() {
    let a = ann(&[("io.runvm.config.hypervisor.vcpus", "9")]);
    let err = pod_config(&Config::default(), &a, HOST)
        .unwrap_err()
        .to_string();
    assert!(err.contains("9 vCPUs"), "{err}");
    assert!(err.contains("io.runvm.config.hypervisor.vcpus"), "{err}");
    assert!(err.contains("hypervisor.max_vcpus = 8"), "{err}");

    let mut c = Config::default();
    c.hypervisor.max_memory_mib = 2048;
    let a = ann(&[(CRI_SANDBOX_MEMORY, "2147483648")]);
    let err = pod_config(&c, &a, HOST).unwrap_err().to_string();
    assert!(err.contains("2560 MiB"), "{err}");
    assert!(err.contains(CRI_SANDBOX_MEMORY), "{err}");
    assert!(err.contains("hypervisor.max_memory_mib = 2048"), "{err}");
    // At the maximum exactly: accepted.
    let a = ann(&[(CRI_SANDBOX_MEMORY, "1610612736")]);
    assert_eq!(pod_config(&c, &a, HOST).unwrap().1.memory_mib, 2048);
}

#[test]
fn max_zero_means_the_host_or_the_configured_base_if_larger() {
    let host = HostCapacity {
        cpus: 2,
        memory_mib: 1000,
    };
    let mut c = Config::default();
    c.hypervisor.vcpus = 4;
    c.hypervisor.memory_mib = 2048;
    // The operator's own base boots even past the host's capacity...
    assert_eq!(
        pod_config(&c, &ann(&[]), host).unwrap().1,
        BootSize {
            vcpus: 4,
            memory_mib: 2048
        }
    );
    // ...but a pod cannot ask for more.
    let a = ann(&[("io.runvm.config.hypervisor.vcpus", "5")]);
    let err = pod_config(&c, &a, host).unwrap_err().to_string();
    assert!(err.contains("hypervisor.max_vcpus = 4"), "{err}");
}

#[test]
fn new_max_keys_are_bounded_and_named() {
    let mut c = Config::default();
    c.hypervisor.max_vcpus = 256;
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("hypervisor.max_vcpus = 256")
            && err.contains("0 (the host's CPU count) to 255"),
        "{err}"
    );
    let mut c = Config::default();
    c.hypervisor.max_memory_mib = 63;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("hypervisor.max_memory_mib = 63"), "{err}");
}
