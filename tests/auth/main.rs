//! Authentication and authorization tests (GitHub issue 4) against a real server on
//! 127.0.0.1:0: logins, tokens (expired, forged, other algorithms), roles, the login throttle,
//! token refresh, user administration, the security log, password-hash confidentiality, the
//! offline `user` CLI and the first-start bootstrap.

#[path = "../common/mod.rs"]
mod common;

mod bootstrap;
mod cli;
mod leaks;
mod login;
mod refresh;
mod roles;
mod security_log;
mod support;
mod throttle;
mod tokens;
mod users;
