//! Integration tests: tollgate's real router on a real socket, in front of
//! a fake Ollama that speaks Ollama's wire format (see `support`).

#[allow(dead_code)] // Not every suite uses every helper.
mod support;

mod account_admin;
mod auth;
mod bad_input;
mod browser;
mod clients;
mod connections;
mod credits;
mod fake_selftest;
mod fidelity;
mod openai;
mod operations;
mod policy;
mod process;
mod recipe;
mod streaming;
mod tls;
