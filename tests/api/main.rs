//! API tests against a real server on 127.0.0.1:0 (one test binary: tests/api/).

#[path = "../common/mod.rs"]
mod common;

mod support;

mod bad_input;
mod commands;
mod limits;
mod queries;
mod schema;
mod smoke;
mod subscribe;
