//! Generates the protobuf messages and the async ttrpc client and server from `protos/`.
//!
//! rust-protobuf emits inner attributes (`#![allow(...)]`), which `include!` cannot take, so
//! they are stripped here; `src/lib.rs` puts the equivalent `allow`s on the wrapping modules.
//! The server trait's default method bodies are rewritten to answer `UNIMPLEMENTED`.

use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let protos = ["protos/agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .out_dir(&out)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("generating the agent protocol failed");

    for entry in fs::read_dir(&out).expect("OUT_DIR is readable") {
        let path = entry.expect("OUT_DIR entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).expect("generated file is UTF-8");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("#!"))
                .filter(|l| !l.trim_start().starts_with("//!"))
                .collect();
            // The generated server trait answers NOT_FOUND for a method the implementation does
            // not override; the protocol promises UNIMPLEMENTED, which is what it means.
            let text = kept
                .join("\n")
                .replace("::ttrpc::Code::NOT_FOUND", "::ttrpc::Code::UNIMPLEMENTED")
                .replace(" is not supported\"", " is not implemented by this agent\"");
            fs::write(&path, text).expect("rewrite generated file");
        }
    }
}
