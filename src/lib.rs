//! tollgate: an authenticated, credit-metered gateway in front of Ollama.
//!
//! The modules follow the way a request travels:
//!
//! - [`config`] reads the environment (and nothing else does);
//! - [`routes`] maps paths to thin handlers; [`auth`] tells who is calling;
//! - [`policy`] applies the per-key request rules;
//! - [`credits`] holds exact amounts and the settlement guard that reserves
//!   and settles a request's cost, talking to the [`store`];
//! - [`proxy`] forwards to Ollama and relays its reply chunk by chunk,
//!   reporting usage to the settlement guard;
//! - [`admin`] is key management, for the admin API and the CLI;
//! - [`error`] maps every error tollgate answers to one response shape;
//! - [`app`] ties it together; [`server`] serves its HTTP/1.1 connections;
//!   [`tally`] counts what shutdown waits for.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod credits;
pub mod error;
pub mod limits;
pub mod policy;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod store;
pub mod tally;
pub mod telemetry;
pub mod tls;
