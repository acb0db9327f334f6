//! Credits: exact amounts and the settlement guard that turns a request into
//! a reservation, then into a charge and a ledger row.

mod amount;
pub mod settlement;

pub use amount::{Credits, ParseCreditsError};
pub use settlement::Settlement;
